// The page of `moshi-mlx serve`: a full-duplex conversation with Moshi over Kyutai's
// websocket protocol (/api/chat): one kind byte, then the payload —
//   0x00 handshake (server: the session is ready), 0x01 Ogg/Opus audio (both ways),
//   0x02 Moshi's text, 0x05 an error; other kinds are ignored.
//
// Audio path (plain ES module, no build step):
//   microphone → duplex-worklet.js (chunks) → Opus encoder worker → websocket
//   websocket → Opus decoder worker → duplex-worklet.js (jitter buffer) → speakers
// The Opus workers are opus-recorder's (vendor/opus-recorder, see VENDORED.json).

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, METADATA: 4, ERROR: 5 };
const OPUS = "assets/vendor/opus-recorder/";
const MODEL_RATE = 24000;
const SETTINGS = ["text_temperature", "text_topk", "audio_temperature", "audio_topk"];

const $ = (id) => document.getElementById(id);

// Everything one connection owns; `null` when disconnected.
let conn = null;
// The conversation's audio as 16-bit stereo chunks (user, Moshi), for the download; the
// last RECORD_MINUTES only, so that a long conversation cannot exhaust the tab's memory.
let recording = null;
const RECORD_MINUTES = 15;

// What the browser test (and a curious user, from the console) can read.
window.moshi = { state: "idle", handshake: false, stats: null, pagesSent: 0, pagesReceived: 0, text: "", errors: [] };

$("connect").addEventListener("click", () => (conn ? disconnect("disconnected") : connect()));

function setStatus(text, state) {
  $("status").textContent = text;
  if (state) window.moshi.state = state;
}

function socketUrl() {
  const params = new URLSearchParams();
  for (const name of SETTINGS) {
    const value = $(name).value.trim();
    if (value !== "") params.set(name, value);
  }
  const seed = $("seed").value.trim();
  if (seed !== "") {
    params.set("text_seed", seed);
    params.set("audio_seed", seed);
  }
  params.set("stats", "1");  // moshi_mlx's server then sends its session counters (METADATA)
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/api/chat?${params}`;
}

async function connect() {
  if (!navigator.mediaDevices || !window.AudioWorkletNode) {
    setStatus("This browser cannot capture audio here: use a current browser, on https or localhost.", "error");
    return;
  }
  setStatus("Starting the microphone…", "starting");
  $("connect").disabled = true;
  let stream;
  try {
    // Echo cancellation: Moshi must not hear itself through the user's speakers.
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (error) {
    setStatus(`No microphone: ${error.message}`, "error");
    $("connect").disabled = false;
    return;
  }
  const context = new AudioContext();
  await context.audioWorklet.addModule("assets/duplex-worklet.js");
  const rate = context.sampleRate;
  const node = new AudioWorkletNode(context, "moshi-duplex", {
    numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
    processorOptions: {
      chunkSize: 1024,
      startSamples: Math.round(0.12 * rate),  // 120 ms of jitter buffer before playing
      maxSamples: Math.round(0.5 * rate),     // never more than 500 ms queued
    },
  });
  const source = context.createMediaStreamSource(stream);
  source.connect(node);
  node.connect(context.destination);

  const c = {
    context, stream, node, source, rate,
    socket: null, encoder: null, decoder: null,
    handshake: false, micSent: 0, moshiPlayed: 0, serverDropped: 0,
  };
  conn = c;
  recording = { rate, chunks: [], maxChunks: Math.ceil(RECORD_MINUTES * 60 * rate / 1024) };
  $("transcript").textContent = "";
  window.moshi = { state: "connecting", handshake: false, stats: null, pagesSent: 0, pagesReceived: 0, text: "", errors: [] };

  c.decoder = new Worker(OPUS + "decoderWorker.min.js");
  c.decoder.postMessage({
    command: "init", decoderSampleRate: MODEL_RATE, outputBufferSampleRate: rate,
    bufferLength: Math.round(960 * rate / MODEL_RATE), resampleQuality: 0,
  });
  c.decoder.onmessage = (event) => {
    if (event.data && event.data[0]) node.port.postMessage({ type: "audio", pcm: event.data[0] }, [event.data[0].buffer]);
  };

  node.port.onmessage = (event) => onChunk(c, event.data);

  setStatus("Connecting to Moshi…", "connecting");
  const socket = new WebSocket(socketUrl());
  socket.binaryType = "arraybuffer";
  c.socket = socket;
  socket.onmessage = (event) => onMessage(c, event.data);
  socket.onclose = (event) => {
    if (conn === c) disconnect(event.reason ? `closed by the server: ${event.reason}` : "connection closed");
  };
  socket.onerror = () => {
    if (conn === c) disconnect("cannot reach the server");
  };
  $("connect").textContent = "Disconnect";
  $("connect").classList.add("stop");
  $("connect").disabled = false;
  $("download").classList.add("disabled");
}

function startEncoder(c) {
  c.encoder = new Worker(OPUS + "encoderWorker.min.js");
  c.encoder.postMessage({
    command: "init", encoderSampleRate: MODEL_RATE, originalSampleRate: c.rate, encoderFrameSize: 20,
    maxFramesPerPage: 2, numberOfChannels: 1, encoderApplication: 2049, streamPages: true, resampleQuality: 3,
  });
  c.encoder.postMessage({ command: "getHeaderPages" });  // the Ogg stream's first pages: OpusHead, OpusTags
  c.encoder.onmessage = (event) => {
    const page = event.data && event.data.page;
    if (!page || c.socket.readyState !== WebSocket.OPEN) return;
    const message = new Uint8Array(page.length + 1);
    message[0] = KIND.AUDIO;
    message.set(page, 1);
    c.socket.send(message);
    window.moshi.pagesSent += 1;
  };
}

function onMessage(c, data) {
  if (!(data instanceof ArrayBuffer) || data.byteLength === 0) return;
  const bytes = new Uint8Array(data);
  const payload = bytes.subarray(1);
  switch (bytes[0]) {
    case KIND.HANDSHAKE:
      c.handshake = true;
      window.moshi.handshake = true;
      startEncoder(c);
      setStatus("Connected: talk to Moshi.", "connected");
      break;
    case KIND.AUDIO:
      window.moshi.pagesReceived += 1;
      c.decoder.postMessage({ command: "decode", pages: payload.slice() });
      break;
    case KIND.TEXT: {
      const text = new TextDecoder().decode(payload);
      window.moshi.text += text;
      const box = $("transcript");
      box.textContent += text;
      box.scrollTop = box.scrollHeight;
      break;
    }
    case KIND.METADATA: {
      const stats = JSON.parse(new TextDecoder().decode(payload));
      c.serverDropped = stats.dropped_frames || 0;
      window.moshi.server = stats;
      $("step").textContent = `${Math.round(stats.step_ms)} ms`;
      break;
    }
    case KIND.ERROR: {
      const text = new TextDecoder().decode(payload);
      window.moshi.errors.push(text);
      setStatus(`Server error: ${text}`, "error");
      break;
    }
    default:  // control, metadata, ping…: unused in streaming
      break;
  }
}

function onChunk(c, chunk) {
  if (c.handshake && c.encoder) {
    c.encoder.postMessage({ command: "encode", buffers: [chunk.mic] });
    c.micSent += chunk.mic.length;
  }
  record(chunk.mic, chunk.played);
  window.moshi.stats = chunk.stats;
  c.moshiPlayed = chunk.stats.played;
  $("mic-level").style.width = `${level(chunk.mic)}%`;
  $("moshi-level").style.width = `${level(chunk.played)}%`;
  $("buffer").textContent = `${Math.round(1000 * chunk.stats.buffered / c.rate)} ms`;
  $("underruns").textContent = String(chunk.stats.underruns);
  if (c.moshiPlayed > 0) {
    // Moshi's frame t answers the user's frame t: what was sent but not yet heard back, less
    // the frames the server dropped because it fell behind (they never come back).
    const pending = c.micSent / c.rate - 0.08 * c.serverDropped - c.moshiPlayed / c.rate;
    const ms = Math.max(0, Math.round(1000 * pending));
    $("latency").textContent = `${ms} ms`;
    window.moshi.latencyMs = ms;
  }
}

// A meter reading in percent: RMS in dB, -60 dB → 0 %, 0 dB → 100 %.
function level(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  const db = 10 * Math.log10(sum / samples.length + 1e-12);
  return Math.max(0, Math.min(100, (db + 60) * (100 / 60)));
}

function disconnect(reason) {
  const c = conn;
  conn = null;
  if (!c) return;
  if (c.socket && c.socket.readyState <= WebSocket.OPEN) c.socket.close();
  if (c.encoder) c.encoder.terminate();
  if (c.decoder) c.decoder.terminate();
  c.stream.getTracks().forEach((track) => track.stop());
  c.context.close();
  if (window.moshi.state !== "error") setStatus(`Disconnected (${reason}).`, "idle");
  $("connect").textContent = "Connect";
  $("connect").classList.remove("stop");
  $("connect").disabled = false;
  offerDownload();
}

function record(mic, moshi) {
  const stereo = new Int16Array(2 * mic.length);
  for (let i = 0; i < mic.length; i++) {
    stereo[2 * i] = pcm16(mic[i]);
    stereo[2 * i + 1] = pcm16(moshi[i]);
  }
  recording.chunks.push(stereo);
  if (recording.chunks.length > recording.maxChunks) recording.chunks.shift();
}

function offerDownload() {
  if (!recording || recording.chunks.length === 0) return;
  const link = $("download");
  if (link.href) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(stereoWav(recording));
  link.classList.remove("disabled");
  link.removeAttribute("aria-disabled");
}

// 16-bit PCM stereo wav: left the user, right Moshi, as heard (the page's sample rate).
function stereoWav({ rate, chunks }) {
  const dataBytes = chunks.reduce((n, chunk) => n + chunk.byteLength, 0);
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => [...s].forEach((ch, i) => header.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF"); header.setUint32(4, 36 + dataBytes, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 2, true);
  header.setUint32(24, rate, true); header.setUint32(28, rate * 4, true); header.setUint16(32, 4, true);
  header.setUint16(34, 16, true); text(36, "data"); header.setUint32(40, dataBytes, true);
  return new Blob([header.buffer, ...chunks], { type: "audio/wav" });  // little-endian, as wav wants (every browser platform)
}

function pcm16(x) {
  return Math.max(-32768, Math.min(32767, Math.round(x * 32767)));
}
