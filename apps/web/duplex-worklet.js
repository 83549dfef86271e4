// The audio thread of the page: one AudioWorkletProcessor that both
//  * captures the microphone (its input) in fixed-size chunks for the Opus encoder, and
//  * plays Moshi's audio (its output) from a jitter buffer.
// Each chunk message carries the microphone samples and the samples played in the same
// quanta, so the page records both voices aligned (the stereo download) and meters them.
//
// Jitter buffer: playback starts once `startSamples` are queued; when the queue runs dry it
// counts an underrun and waits for `startSamples` again; beyond `maxSamples` queued, the
// oldest are dropped so that latency stays bounded.

class MoshiDuplex extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.chunkSize = o.chunkSize;         // microphone samples per message (constant: the encoder needs it)
    this.startSamples = o.startSamples;
    this.maxSamples = o.maxSamples;
    this.queue = [];                      // Float32Arrays of Moshi's audio, oldest first
    this.queueOffset = 0;                 // read position in queue[0]
    this.queued = 0;                      // samples waiting
    this.playing = false;
    this.mic = new Float32Array(this.chunkSize);
    this.played = new Float32Array(this.chunkSize);
    this.fill = 0;
    this.stats = { received: 0, played: 0, underruns: 0, dropped: 0 };
    this.port.onmessage = (event) => {
      if (event.data.type === "audio") this.enqueue(event.data.pcm);
    };
  }

  enqueue(pcm) {
    this.queue.push(pcm);
    this.queued += pcm.length;
    this.stats.received += pcm.length;
    while (this.queued - this.queueOffset > this.maxSamples && this.queue.length > 1) {
      const oldest = this.queue.shift();
      this.queued -= oldest.length;
      this.stats.dropped += oldest.length - this.queueOffset;
      this.queueOffset = 0;
    }
  }

  nextSample() {
    const head = this.queue[0];
    const value = head[this.queueOffset++];
    if (this.queueOffset === head.length) {
      this.queue.shift();
      this.queued -= head.length;
      this.queueOffset = 0;
    }
    return value;
  }

  process(inputs, outputs) {
    const input = inputs[0] && inputs[0][0];
    const output = outputs[0][0];
    if (!this.playing && this.queued - this.queueOffset >= this.startSamples) this.playing = true;
    for (let i = 0; i < output.length; i++) {
      let sample = 0;
      if (this.playing) {
        if (this.queue.length > 0) {
          sample = this.nextSample();
          this.stats.played += 1;
        } else {
          this.playing = false;
          this.stats.underruns += 1;
        }
      }
      output[i] = sample;
      this.mic[this.fill] = input ? input[i] : 0;
      this.played[this.fill] = sample;
      this.fill += 1;
      if (this.fill === this.chunkSize) {
        this.port.postMessage({
          type: "chunk", mic: this.mic, played: this.played,
          stats: { ...this.stats, buffered: this.queued - this.queueOffset },
        }, [this.mic.buffer, this.played.buffer]);
        this.mic = new Float32Array(this.chunkSize);
        this.played = new Float32Array(this.chunkSize);
        this.fill = 0;
      }
    }
    return true;
  }
}

registerProcessor("moshi-duplex", MoshiDuplex);
