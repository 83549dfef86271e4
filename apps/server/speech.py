"""Speech services of `moshi-mlx serve`, as Kyutai's Rust `moshi-server` offers them (so Unmute
and other clients of it work unchanged) and as OpenAI's speech endpoints (so the `openai`
client does):

  /api/asr-streaming   websocket, msgpack: Audio{pcm} / OggOpus{data} / Marker{id} in; Ready,
                       Word{text, start_time}, EndWord{stop_time}, Step{step_idx, prs,
                       buffered_pcm} (VAD heads only), Marker{id}, Error{message} out.
                       POST: a whole audio file → the JSON list of Word/EndWord.
  /api/tts_streaming   websocket: text frames, or msgpack Text{text} / Eos / Voice; `format=`
                       OggOpus | OggOpusMessagePack | Pcm | PcmMessagePack; out Ready, Audio{pcm}
                       or Ogg pages, Text{text, start_s, stop_s}, Error; closed after the last word.
  /v1/audio/transcriptions, /v1/audio/speech   OpenAI's request and response shapes.

The engines (SttEngine, TtsEngine) run on the models' thread (worker.py): the network thread
only appends to their input deques and drains their output deques.
"""
from __future__ import annotations

import collections
import io
import re
from pathlib import Path

import numpy as np

FRAME = 1920
RATE = 24000
# A client may queue this much audio (or text) ahead of the model; more is refused with an Error.
MAX_PENDING_SECONDS = 30.0
MAX_PENDING_TEXT = 100_000
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
TTS_FORMATS = ("OggOpus", "OggOpusMessagePack", "Pcm", "PcmMessagePack")
OPENAI_SPEECH_FORMATS = {"wav": ("WAV", "PCM_16", "audio/wav"), "flac": ("FLAC", "PCM_16", "audio/flac"),
                         "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"), "pcm": (None, None, "audio/pcm"),
                         "opus": (None, None, "audio/ogg")}
VOICE_NAME = re.compile(r"^[\w][\w.\-]*(/[\w][\w.\-]*)*$")


class ClientError(ValueError):
    """Input a client sent that the protocol or the model refuses (an Error message / HTTP 400)."""


def pack(message: dict) -> bytes:
    import msgpack

    return msgpack.packb(message, use_bin_type=True, use_single_float=True)


def unpack(data: bytes) -> dict:
    import msgpack

    try:
        message = msgpack.unpackb(data, raw=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises several kinds for garbage
        raise ClientError(f"not a msgpack message ({type(e).__name__})") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ClientError("a message must be a msgpack map with a \"type\" string")
    return message


# -- speech to text ---------------------------------------------------------------------------------

class SttEngine:
    """One client's live transcription. The network thread calls `push_audio` / `push_marker`
    (in the order the client sent them); each `process_one` (models' thread) runs one frame
    and queues the messages it produced in `out`."""

    @classmethod
    def for_file(cls, stt, pcm: np.ndarray) -> "SttEngine":
        """A whole recording at once (POST): no queue limit, flushed at the end."""
        engine = cls(stt, flush_at_end=True)
        engine.pending.extend([pcm.astype(np.float32), ("end",)])
        return engine

    def __init__(self, stt, flush_at_end: bool = False):
        self.stt = stt
        self.stream = stt.stream()
        self.delay = stt.config.steps_of_delay
        self.has_vad = stt.has_vad
        self.pending: collections.deque = collections.deque()  # np.ndarray | ("marker", id) | ("end",)
        self.pending_samples = 0
        self.buf = np.zeros(0, np.float32)
        self.frames_in = 0  # whole frames received (network side)
        self.frames_done = 0
        self.markers: collections.deque = collections.deque()  # (frame to reach, id)
        self.out: collections.deque = collections.deque()
        self.finished = False
        self.flush_at_end = flush_at_end

    # network thread
    def push_audio(self, pcm: np.ndarray) -> None:
        if self.pending_samples + len(pcm) > MAX_PENDING_SECONDS * RATE:
            raise ClientError(f"more than {MAX_PENDING_SECONDS:.0f} s of audio queued ahead of the model: send it "
                              "in real time")
        self.pending_samples += len(pcm)
        self.pending.append(pcm)

    def push_marker(self, marker_id: int) -> None:
        self.pending.append(("marker", marker_id))

    def end(self) -> None:
        self.pending.append(("end",))

    # models' thread
    def process_one(self) -> bool:
        worked = False
        while len(self.buf) < FRAME and self.pending:
            item = self.pending.popleft()
            worked = True
            if isinstance(item, np.ndarray):
                self.pending_samples -= len(item)
                self.buf = np.concatenate([self.buf, item])
            elif item[0] == "marker":
                received = self.frames_done + (len(self.buf) + FRAME - 1) // FRAME
                self.markers.append((received + self.delay, item[1]))
            else:
                self._finish()
                return True
        if len(self.buf) >= FRAME:
            frame, self.buf = self.buf[:FRAME], self.buf[FRAME:]
            self._messages(self.stream.step(frame))
            self.frames_done += 1
            if self.has_vad and self.stream.last_probs is not None:
                self.out.append({"type": "Step", "step_idx": self.frames_done,
                                 "prs": [float(p) for p in self.stream.last_probs[0, :, 0]],
                                 "buffered_pcm": int(len(self.buf) + self.pending_samples)})
            worked = True
        while self.markers and self.frames_done >= self.markers[0][0]:
            self.out.append({"type": "Marker", "id": self.markers.popleft()[1]})
        return worked

    def _finish(self) -> None:
        if self.flush_at_end:
            if len(self.buf):
                self._messages(self.stream.step(self.buf))
            self._messages(self.stream.flush())
        self.finished = True
        self.out.append({"type": "End"})

    def _messages(self, events) -> None:
        from moshi_mlx.sessions.words import EndWord, Word

        for e in events:
            if isinstance(e, Word):
                self.out.append({"type": "Word", "text": e.text, "start_time": float(e.start)})
            elif isinstance(e, EndWord):
                self.out.append({"type": "EndWord", "stop_time": float(e.stop)})


def decode_upload(data: bytes) -> np.ndarray:
    """A whole audio file (any format soundfile reads) → mono float32 at 24 kHz."""
    import soundfile as sf

    from moshi_mlx.audio import resample

    try:
        pcm, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile's errors
        raise ClientError(f"not an audio file soundfile can read ({e})") from None
    if len(pcm) == 0:
        raise ClientError("the audio file is empty")
    return resample(pcm.mean(axis=1), rate, RATE)


# -- text to speech ---------------------------------------------------------------------------------

class TtsEngine:
    """One client's synthesis. The network thread calls `push_text` / `end_text`; each
    `process_one` runs one step when the text allows it and queues ("audio", pcm),
    ("word", text, start, stop) and finally ("end",) in `out`."""

    @classmethod
    def for_text(cls, tts, text: str, **kwargs) -> "TtsEngine":
        """A whole text at once (POST)."""
        engine = cls(tts, **kwargs)
        engine.pending.extend([text, None])
        engine.pending_chars, engine.closed = len(text), True
        return engine

    def __init__(self, tts, voice, cfg: float, temp: float, seed: int | None):
        self.stream = tts.stream(voice=voice, cfg=cfg, temp=temp, seed=seed)
        self.pending: collections.deque = collections.deque()
        self.pending_chars = 0
        self.out: collections.deque = collections.deque()
        self.words_sent = 0
        self.closed = False
        self.finished = False

    def push_text(self, text: str) -> None:
        if self.closed:
            raise ClientError("text after Eos: the synthesis is closed")
        if self.pending_chars + len(text) > MAX_PENDING_TEXT:
            raise ClientError(f"more than {MAX_PENDING_TEXT} characters queued")
        self.pending_chars += len(text)
        self.pending.append(text)

    def end_text(self) -> None:
        if not self.closed:
            self.closed = True
            self.pending.append(None)

    def process_one(self) -> bool:
        if self.finished:
            return False
        worked = False
        while self.pending:
            text = self.pending.popleft()
            worked = True
            if text is None:
                self.stream.close()
            else:
                self.pending_chars -= len(text)
                self.stream.push(text)
        if self.stream.ready:
            pcm = self.stream.step()[0]
            if pcm is not None:
                self.out.append(("audio", pcm))
            worked = True
        self._words()
        if self.stream.done:
            self.finished = True
            self.out.append(("end",))
            worked = True
        return worked

    def _words(self) -> None:
        """Words whose end is known (the next word has started, or the text ended)."""
        for w in self.stream.words(0, start=self.words_sent):
            if w.end is None and not self.stream.done:
                break
            self.out.append(("word", w.text, float(w.start), float(w.end if w.end is not None else w.start)))
            self.words_sent += 1


def resolve_voice(name: str | None, voice_dir: Path | None, tts):
    """A client's voice name → what TextToSpeech.voice takes. Names only (never a client's
    path): a file under --voice-dir, else a voice of kyutai/tts-voices."""
    from moshi_mlx.checkpoints.voices import DEFAULT_VOICE

    if tts.config.speaker_dim is None:
        return None
    name = name or DEFAULT_VOICE
    if name == "none":
        return None
    if not VOICE_NAME.match(name) or ".." in name.split("/"):
        raise ClientError(f"bad voice name {name!r} (a name such as {DEFAULT_VOICE}, no path)")
    if voice_dir is not None:
        for candidate in (voice_dir / name, voice_dir / f"{name}.safetensors"):
            if candidate.is_file():
                return str(candidate)
    return name


