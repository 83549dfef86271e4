"""`moshi-mlx tts`: text to speech with Kyutai's TTS (kyutai/tts-1.6b-en_fr).

One text (argument, --input FILE or - for stdin) → an audio file, optionally played while
it is synthesized (--play) and with word timings (--words). A batch of dialogs in Kyutai's
request format (--jsonl: {"id", "turns", "voices"} per line) → one file per request.
Everything the user gave (text, voices, cfg, output paths, requests) is checked before the
model loads; outputs are written whole or not at all. Ctrl-C keeps what was produced.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "kyutai/tts-1.6b-en_fr"
NO_VOICE = "none"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tts", help="text to speech (Kyutai TTS): text or dialogs → audio, word timings",
                       description="Synthesize speech with Kyutai's TTS: a text (or --input FILE, - for stdin) "
                                   "to an audio file (-o) and/or the speakers (--play); dialogs in batch with "
                                   "--jsonl.")
    p.add_argument("text", nargs="?", default=None, help="the text to speak (or --input)")
    p.add_argument("--input", default=None, metavar="FILE", help="read the text from a file (- for stdin)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="audio file (.wav, .flac, .ogg, .mp3); with --jsonl, a directory")
    p.add_argument("--voice", action="append", default=None, metavar="NAME|FILE",
                   help="a voice of kyutai/tts-voices (e.g. expresso/ex03-ex01_happy_001_channel1_334s.wav), a "
                        "local .safetensors voice, or 'none' (the model's own); repeat for the speakers of a "
                        "dialog (default: Kyutai's default voice)")
    p.add_argument("--cfg", type=float, default=2.0,
                   help="classifier-free guidance strength (CFG-distilled models: 1.0 … 4.0 in steps of 0.5; "
                        "default 2.0)")
    p.add_argument("--temp", type=float, default=0.6, help="sampling temperature (0 = greedy; default 0.6)")
    p.add_argument("--seed", type=int, default=None, help="random seed (the same seed gives the same audio)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"TTS checkpoint: repo id, Kyutai or converted directory (default {DEFAULT_MODEL})")
    p.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize a full-precision checkpoint while loading")
    p.add_argument("--words", type=Path, default=None, metavar="FILE.json",
                   help="also write the word timings as JSON")
    p.add_argument("--jsonl", type=Path, default=None, metavar="FILE",
                   help="dialog requests, one JSON object per line: {\"id\", \"turns\": [...], \"voices\": "
                        "[...]}; writes DIR/ID.wav and DIR/ID.json into -o DIR")
    p.add_argument("--batch", type=int, default=8, help="requests synthesized together with --jsonl (default 8)")
    p.add_argument("--play", action="store_true", help="play while synthesizing")
    p.add_argument("--output-device", default=None, help="speakers for --play (index or name)")
    p.set_defaults(run=run)


@dataclass
class Request:
    id: str
    turns: list[str]
    voices: list[str]  # names or files; [] = the default voice


def read_text(args: argparse.Namespace) -> str:
    from moshi_mlx.errors import InputError
    from moshi_mlx.sessions.tts import has_words

    if args.text is not None and args.input is not None:
        raise InputError("give the text as an argument or with --input, not both")
    if args.input == "-":
        text = sys.stdin.read()
    elif args.input is not None:
        path = Path(args.input)
        if not path.is_file():
            raise InputError(f"{path}: no such text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
    elif args.text is not None:
        text = args.text
    else:
        raise InputError("give a text to speak (argument, --input FILE or --input -), or --jsonl")
    if not has_words(text):
        raise InputError("nothing to say: the text is empty or only punctuation")
    return text


def read_requests(path: Path) -> list[Request]:
    """Kyutai's request file, checked line by line (the line number names any problem)."""
    from moshi_mlx.errors import InputError
    from moshi_mlx.sessions.tts import MAX_SPEAKERS, has_words

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    requests, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected an object {{\"id\", \"turns\", \"voices\"}}")
        rid, turns, voices = obj.get("id"), obj.get("turns"), obj.get("voices", [])
        if not isinstance(rid, (str, int)) or not str(rid) or "/" in str(rid) or str(rid).startswith("."):
            raise InputError(f"{where}: \"id\" must be a non-empty name usable as a file name, got {rid!r}")
        if str(rid) in seen:
            raise InputError(f"{where}: id {rid!r} appears twice")
        seen.add(str(rid))
        if isinstance(turns, str):
            turns = [turns]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns) or \
                not any(has_words(t) for t in turns):
            raise InputError(f"{where}: \"turns\" must be a list of texts with something to say")
        if not isinstance(voices, list) or not all(isinstance(v, str) for v in voices) or \
                len(voices) > MAX_SPEAKERS:
            raise InputError(f"{where}: \"voices\" must be a list of at most {MAX_SPEAKERS} voice names")
        requests.append(Request(str(rid), turns, voices))
    if not requests:
        raise InputError(f"{path}: no requests")
    return requests


def check_outputs(args: argparse.Namespace) -> None:
    from moshi_mlx.audio import output_format
    from moshi_mlx.errors import InputError

    if args.jsonl is not None:
        if args.output is None:
            raise InputError("--jsonl writes one file per request: give an output directory with -o DIR")
        if args.output.exists() and not args.output.is_dir():
            raise InputError(f"{args.output}: not a directory")
        if not args.output.exists() and not args.output.parent.exists():
            raise InputError(f"{args.output.parent}: directory does not exist")
        if args.play or args.words:
            raise InputError("--play and --words are for one text; --jsonl writes ID.wav and ID.json")
        return
    if args.output is None and not args.play:
        raise InputError("give an output file (-o out.wav), or --play")
    for path in (args.output, args.words):
        if path is not None and not path.parent.exists():
            raise InputError(f"{path.parent}: directory does not exist")
        if path is not None and path.is_dir():
            raise InputError(f"{path}: is a directory")
    if args.output is not None:
        output_format(args.output)
    if args.words is not None and args.words.suffix.lower() != ".json":
        raise InputError(f"{args.words}: word timings are written as JSON: name the file .json")


def resolve_voices(names: list[str] | None, config, cache: dict) -> list[np.ndarray]:
    """Voice names/files → latents, before the model loads (a wrong name fails fast)."""
    from moshi_mlx.checkpoints.voices import DEFAULT_VOICE
    from moshi_mlx.errors import InputError
    from moshi_mlx.sessions.tts import load_voice

    if config.speaker_dim is None:
        if names and any(n != NO_VOICE for n in names):
            raise InputError("this TTS model takes no voice embedding: leave out --voice")
        return []
    names = names or [DEFAULT_VOICE]
    if NO_VOICE in names:
        if len(names) > 1:
            raise InputError("--voice none cannot be combined with other voices")
        return []
    out = []
    for name in names:
        if name not in cache:
            cache[name] = load_voice(name, config)
        out.append(cache[name])
    return out


def run(args: argparse.Namespace) -> int:
    from moshi_mlx.checkpoints import lm as lm_ckpt
    from moshi_mlx.errors import InputError
    from moshi_mlx.modules.sampling import Sampler
    from moshi_mlx.sessions.tts import MAX_SPEAKERS, TextToSpeech, TtsConfig

    if args.jsonl is not None and (args.text is not None or args.input is not None):
        raise InputError("--jsonl reads its texts from the file: give no text or --input with it")
    requests = read_requests(args.jsonl) if args.jsonl is not None else None
    text = read_text(args) if requests is None else None
    check_outputs(args)
    Sampler(args.temp)  # a bad temperature is refused here, not after loading
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    if args.voice and len(args.voice) > MAX_SPEAKERS:
        raise InputError(f"{len(args.voice)} voices: the model has {MAX_SPEAKERS} speaker slots")
    ckpt = lm_ckpt.read(args.model)
    config = TtsConfig.from_config(ckpt.config, ckpt.raw_config, ckpt.source)
    config.check_cfg(args.cfg)
    cache: dict = {}
    voices = request_voices = None
    if requests is None:
        voices = resolve_voices(args.voice, config, cache)
    else:  # a request without voices gets --voice, else the default
        request_voices = [resolve_voices(r.voices or args.voice, config, cache) for r in requests]
    tts = TextToSpeech.from_checkpoint(ckpt, config, args.quantize)
    tts.model_id = str(args.model)
    if requests is not None:
        return run_requests(tts, args, requests, request_voices)
    return run_text(tts, args, text, voices)


class _Stop:
    """Ctrl-C sets a flag checked between steps (never inside a model step), so what was
    produced can still be written."""

    def __enter__(self):
        import signal
        import threading

        self.event = threading.Event()
        self.previous = signal.signal(signal.SIGINT, lambda *_: self.event.set())
        return self.event

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGINT, self.previous)
        return False


def _progress(words: int):
    from .chat import _FileProgress

    return _FileProgress(float(words), 1.0, label="words")


def run_text(tts, args: argparse.Namespace, text: str, voices: list[np.ndarray]) -> int:
    stream = tts.stream(voice=voices, cfg=args.cfg, temp=args.temp, seed=args.seed)
    stream.push(text)
    stream.close()
    total = stream.items[0].state.words_known()
    progress = _progress(total)
    player = _Player(tts.sample_rate, args.output_device) if args.play else None
    t0 = time.perf_counter()
    interrupted = False
    try:
        with _Stop() as stop:
            while stream.ready and not stop.is_set():
                pcm = stream.step()[0]
                if pcm is not None and player is not None:
                    player.add(pcm)
                state = stream.items[0].state
                audio = len(stream.items[0].pcm) * 0.08
                progress.update(total - state.words_known(),
                                f"{audio / max(time.perf_counter() - t0, 1e-9):.2f}x real time")
            interrupted = stop.is_set()
    finally:
        progress.close()
        if player is not None:
            player.finish(interrupted)
    speech = stream.speech()
    elapsed = time.perf_counter() - t0
    print(f"{'interrupted: ' if interrupted else ''}{speech.duration:.1f} s of speech in {elapsed:.1f} s "
          f"({speech.duration / max(elapsed, 1e-9):.2f}x real time), {len(speech.words)} words", file=sys.stderr)
    write_outputs(speech, args.output, args.words, tts, args, text)
    return 130 if interrupted else 0


def write_outputs(speech, audio_path: Path | None, words_path: Path | None, tts, args, text) -> None:
    from moshi_mlx.audio import atomic_write, write_wav

    if audio_path is not None:
        write_wav(audio_path, speech.pcm, speech.sample_rate)
        print(f"wrote {audio_path}", file=sys.stderr)
    if words_path is not None:
        body = json.dumps(words_document(speech, tts, args, text), ensure_ascii=False, indent=1)
        atomic_write(words_path, lambda tmp: Path(tmp).write_text(body + "\n", encoding="utf-8"))
        print(f"wrote {words_path}", file=sys.stderr)


def words_document(speech, tts, args, text) -> dict:
    return {"model": tts.model_id, "text": text, "voice": args.voice, "cfg": args.cfg, "temp": args.temp,
            "seed": args.seed, "sample_rate": speech.sample_rate, "duration": round(speech.duration, 3),
            "words": [{"text": w.text, "start": round(w.start, 3),
                       "end": None if w.end is None else round(w.end, 3)} for w in speech.words]}


def run_requests(tts, args: argparse.Namespace, requests: list[Request], voices: list[list[np.ndarray]]) -> int:
    """Batches of `--batch` requests; each request's files are written as soon as its batch ends."""
    args.output.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    total_audio = 0.0
    with _Stop() as stop:
        for i in range(0, len(requests), args.batch):
            batch, batch_voices = requests[i:i + args.batch], voices[i:i + args.batch]
            stream = tts.stream(cfg=args.cfg, temp=args.temp, seed=args.seed, batch_size=len(batch),
                                voices=batch_voices)
            for b, r in enumerate(batch):
                for k, turn in enumerate(r.turns):
                    stream.turn(k, b)
                    stream.push(turn, b)
                stream.close(b)
            total = sum(it.state.words_known() for it in stream.items)
            progress = _progress(total)
            try:
                while stream.ready and not stop.is_set():
                    stream.step()
                    progress.update(total - sum(it.state.words_known() for it in stream.items))
            finally:
                progress.close()
            for b, r in enumerate(batch):
                speech = stream.speech(b)
                total_audio += speech.duration
                write_outputs(speech, args.output / f"{r.id}.wav", args.output / f"{r.id}.json", tts, args,
                              r.turns)
            if stop.is_set():
                print("interrupted: the requests of this batch were written as far as synthesized", file=sys.stderr)
                return 130
    elapsed = time.perf_counter() - t0
    print(f"{len(requests)} requests, {total_audio:.1f} s of speech in {elapsed:.1f} s "
          f"({total_audio / max(elapsed, 1e-9):.2f}x real time)", file=sys.stderr)
    return 0


class _Player:
    """Plays frames as they come. It starts once PREBUFFER seconds are queued and, after an
    underrun (synthesis slower than real time), waits for as much again, so speech comes in
    whole stretches rather than stutters; faster than real time it plays without gaps."""

    PREBUFFER = 1.0

    def __init__(self, rate: int, device):
        import threading

        import soxr

        from moshi_mlx.errors import MoshiMlxError

        from .chat import _device, _no_devices, _sounddevice

        sd = _sounddevice()
        if len(sd.query_devices()) == 0:
            raise MoshiMlxError(_no_devices(sd))
        try:
            info = sd.query_devices(_device(device), "output")
        except Exception as e:  # noqa: BLE001 - PortAudio's errors: no device, bad index/name
            raise MoshiMlxError(f"no usable speakers ({e}); see `moshi-mlx chat --list-devices`") from None
        self.out_rate = int(info["default_samplerate"])
        self.resampler = soxr.ResampleStream(rate, self.out_rate, 1, dtype="float32") if self.out_rate != rate else None
        self.pending = np.zeros(0, np.float32)
        self.lock = threading.Lock()
        self.playing = False
        self.drained = threading.Event()
        self.stream = sd.OutputStream(device=_device(device), channels=1, samplerate=self.out_rate,
                                      dtype="float32", callback=self._callback)
        self.stream.start()

    def _callback(self, outdata, frames, time_info, status):  # PortAudio thread
        with self.lock:
            if not self.playing and len(self.pending) >= self.PREBUFFER * self.out_rate:
                self.playing = True
            n = min(frames, len(self.pending)) if self.playing else 0
            outdata[:n, 0] = self.pending[:n]
            outdata[n:, 0] = 0.0
            self.pending = self.pending[n:]
            if self.playing and not len(self.pending):
                self.playing = False
                self.drained.set()

    def add(self, pcm: np.ndarray) -> None:
        pcm = self.resampler.resample_chunk(pcm) if self.resampler is not None else pcm
        with self.lock:
            self.pending = np.concatenate([self.pending, pcm])
            self.drained.clear()

    def finish(self, interrupted: bool) -> None:
        """Play what is left (all of it: the prebuffer rule no longer holds), then close."""
        if not interrupted:
            if self.resampler is not None:
                tail = self.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                with self.lock:
                    self.pending = np.concatenate([self.pending, tail])
            with self.lock:
                self.playing = bool(len(self.pending))
            if self.playing:
                self.drained.wait(timeout=len(self.pending) / self.out_rate + 5.0)
        self.stream.stop()
        self.stream.close()
