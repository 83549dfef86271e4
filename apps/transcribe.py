"""`moshi-mlx transcribe`: speech to text with Kyutai's STT models, from files or live.

Files: any format and rate (resampled to 24 kHz, stereo downmixed), read incrementally;
several files run as one batch of `--batch` streams; outputs as text, JSON (words with
times, end-of-turn events with --vad), SRT or WebVTT, each written whole once its file is
done. Every input is checked before the model loads. `--mic`: live captions, words
printed as they are decided; Ctrl-C ends and can write what was said (-o).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from . import args as check
from .formats import FORMATS, render

DEFAULT_MODEL = "kyutai/stt-1b-en_fr"
SILENT_PEAK = 1e-4  # -80 dBFS: below this there is nothing to transcribe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transcribe", help="speech to text (Kyutai STT): audio files or the microphone",
                       description="Transcribe audio files (or the microphone, --mic) with Kyutai's STT models: "
                                   "text, words with times, subtitles; semantic end-of-turn detection with --vad.")
    p.add_argument("files", nargs="*", type=Path, metavar="FILE", help="audio files (wav, flac, ogg, mp3, any rate)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"STT checkpoint: repo id, Kyutai or converted directory (default {DEFAULT_MODEL}; "
                        f"VAD heads are in kyutai/stt-1b-en_fr-candle)")
    p.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize a full-precision checkpoint while loading")
    p.add_argument("--format", choices=list(FORMATS), default=None,
                   help="output format (default: from -o's extension, else text)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output file (one input), or directory (one file per input, named after it)")
    p.add_argument("--vad", action="store_true",
                   help="semantic VAD: end-of-turn events (needs a checkpoint with extra heads)")
    p.add_argument("--vad-threshold", type=_probability, default=0.6,
                   help="end of turn when the smoothed pause probability exceeds this (default 0.6)")
    p.add_argument("--batch", type=check.positive, default=8, help="files transcribed together (default 8)")
    p.add_argument("--mic", action="store_true", help="live captions from the microphone (Ctrl-C to stop)")
    p.add_argument("--input-device", default=None, help="microphone for --mic (index or name)")
    p.set_defaults(run=run)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


def output_paths(files: list[Path], output: Path | None, fmt: str | None) -> tuple[str, list[Path | None]]:
    """(format, where each file's transcript goes: None = stdout), checked before any work."""
    from moshi_mlx.errors import InputError

    if fmt is None:
        by_ext = {ext: name for name, ext in FORMATS.items()}
        fmt = by_ext.get(output.suffix.lower(), "text") if output is not None and not output.is_dir() else "text"
    ext = FORMATS[fmt]
    if output is None:
        if len(files) > 1 and fmt in ("srt", "vtt"):
            raise InputError(f"{len(files)} files as {fmt}: give an output directory with -o DIR")
        return fmt, [None] * len(files)
    if output.is_dir() or len(files) > 1:
        if output.exists() and not output.is_dir():
            raise InputError(f"{output}: not a directory (several input files need -o DIR)")
        if not output.exists() and not output.parent.exists():
            raise InputError(f"{output.parent}: output directory does not exist")
        paths = [output / (f.stem + ext) for f in files]
        if len(set(paths)) < len(paths):
            raise InputError("several input files have the same name: their outputs would overwrite each other")
        return fmt, paths
    if not output.parent.exists():
        raise InputError(f"{output.parent}: output directory does not exist")
    return fmt, [output]


def scan_audio(path: Path) -> float:
    """Decode the whole file once (no model yet): refuse unreadable, empty or silent audio.
    Returns its duration in seconds."""
    import soundfile as sf

    from moshi_mlx.audio import check_audio
    from moshi_mlx.errors import InputError

    info = check_audio(path)
    peak = 0.0
    try:
        for block in sf.blocks(str(path), blocksize=1 << 18, dtype="float32", always_2d=True):
            if not np.all(np.isfinite(block)):
                raise InputError(f"{path}: the audio contains NaN or Inf samples")
            peak = max(peak, float(np.abs(block).max(initial=0.0)))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot decode audio ({e})") from None
    if peak < SILENT_PEAK:
        raise InputError(f"{path}: the audio is silent (peak {20 * np.log10(max(peak, 1e-12)):.0f} dBFS): "
                         f"nothing to transcribe")
    return info.seconds


def run(args: argparse.Namespace) -> int:
    from moshi_mlx.errors import InputError

    if args.mic:
        if args.files:
            raise InputError("--mic transcribes the microphone: give no files with it")
        if args.output is not None and args.output.is_dir():
            raise InputError(f"{args.output}: is a directory (--mic writes one file)")
        fmt, _ = output_paths([Path("mic")], args.output, args.format)
        return run_mic(args, fmt)
    if not args.files:
        raise InputError("give audio files to transcribe, or --mic")
    fmt, outputs = output_paths(args.files, args.output, args.format)
    durations = [scan_audio(f) for f in args.files]
    stt = load(args)
    if args.output is not None and len(args.files) > 1:
        args.output.mkdir(exist_ok=True)
    results = transcribe_files(stt, args, durations)
    many = len(args.files) > 1
    if fmt == "json" and many and outputs[0] is None:
        import json

        print(json.dumps([json.loads(render(t, fmt, stt.model_id, str(f), args.vad)) for f, t in results],
                         ensure_ascii=False, indent=1))
        return 0
    for (f, t), out in zip(results, outputs):
        text = render(t, fmt, stt.model_id, str(f), args.vad)
        if out is None:
            if many:
                print(f"# {f}")
            sys.stdout.write(text)
        else:
            from moshi_mlx.audio import atomic_write

            atomic_write(out, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
            print(f"wrote {out}", file=sys.stderr)
    return 0


def load(args: argparse.Namespace):
    from moshi_mlx.errors import InputError
    from moshi_mlx.sessions.stt import SpeechToText

    stt = SpeechToText.from_pretrained(args.model, quantize=args.quantize)
    if args.vad and not stt.has_vad:
        raise InputError(f"{args.model}: this checkpoint has no semantic-VAD heads (--vad); Kyutai ships them in "
                         f"kyutai/stt-1b-en_fr-candle")
    return stt


def transcribe_files(stt, args: argparse.Namespace, durations: list[float]):
    """[(file, Transcript)] in input order, `args.batch` files at a time."""
    from moshi_mlx.sessions.words import TurnConfig

    from .chat import _FileProgress

    turn = TurnConfig(threshold=args.vad_threshold)
    total = sum(durations)
    progress = _FileProgress(total, 1.0)
    done_before = 0.0
    results = []
    t0 = time.perf_counter()
    try:
        for i in range(0, len(args.files), args.batch):
            files = args.files[i:i + args.batch]
            lengths = durations[i:i + args.batch]
            padded = stt.config.audio_silence_prefix_seconds

            def on_step(steps: int, lengths=lengths, before=done_before):
                t = max(0.0, steps * 0.08 - padded)
                progress.update(before + sum(min(t, d) for d in lengths))

            for f, t in zip(files, stt.transcribe_batch(files, turn=turn, quiet=False, on_step=on_step)):
                results.append((f, t))
            done_before += sum(lengths)
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0
    print(f"transcribed {total:.1f} s of audio in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.2f}x real time)",
          file=sys.stderr)
    return results


def run_mic(args: argparse.Namespace, fmt: str) -> int:
    """Live captions: device blocks are queued by PortAudio's thread; the main thread runs
    the model (MLX streams are per thread) and prints each word as it is decided."""
    import collections
    import signal
    import threading

    import soxr

    from moshi_mlx.errors import MoshiMlxError
    from moshi_mlx.sessions.stt import Transcript
    from moshi_mlx.sessions.words import EndOfTurn, TurnConfig, Word, words_from_events

    from .chat import _device, _no_devices, _sounddevice

    sd = _sounddevice()
    if len(sd.query_devices()) == 0:
        raise MoshiMlxError(_no_devices(sd))
    try:
        info = sd.query_devices(_device(args.input_device), "input")
    except Exception as e:  # noqa: BLE001 - PortAudio's errors: no device, bad index/name
        raise MoshiMlxError(f"no usable microphone ({e}); see `moshi-mlx chat --list-devices`") from None
    stt = load(args)
    warm = stt.stream(1)
    for _ in range(3):  # compile/allocate before the microphone opens
        warm.step(np.zeros(stt.frame_size, np.float32))
    stream = stt.stream(1, TurnConfig(threshold=args.vad_threshold))
    rate = int(info["default_samplerate"])
    to_model = soxr.ResampleStream(rate, stt.sample_rate, 1, dtype="float32") if rate != stt.sample_rate else None
    blocks: collections.deque = collections.deque(maxlen=512)  # ~20 s of device blocks, bounded
    events: list = []

    def on_input(indata, frames, time_info, status):  # PortAudio thread: copy and return
        blocks.append(indata[:, 0].copy())

    def show(new: list) -> None:
        for e in new:
            if isinstance(e, Word):
                print(e.text, end=" ", flush=True)
            elif isinstance(e, EndOfTurn) and args.vad:
                print("⏎", flush=True)
        events.extend(new)

    # Ctrl-C sets a flag checked between frames, so it never lands inside a model step and
    # the stream can still be flushed for the last words.
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with sd.InputStream(device=_device(args.input_device), channels=1, samplerate=rate, dtype="float32",
                            callback=on_input):
            print("listening (Ctrl-C to stop)", file=sys.stderr)
            while not stop.is_set():
                if not blocks:
                    time.sleep(0.01)
                    continue
                block = blocks.popleft()
                show(stream.step(to_model.resample_chunk(block) if to_model else block))
    except sd.PortAudioError as e:
        raise MoshiMlxError(f"audio device error: {e} (see `moshi-mlx chat --list-devices`)") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    show(stream.flush())  # the words still in the model's delay
    print(flush=True)
    duration = stream.samples_in / stt.sample_rate
    print(f"{duration:.1f} s of audio, {sum(isinstance(e, Word) for e in events)} words", file=sys.stderr)
    if args.output is not None:
        from moshi_mlx.audio import atomic_write

        words = words_from_events(events)
        text = " ".join(w.text for w in words)
        t = Transcript(np.zeros(0, np.int64), text, words, None,
                       [e.time for e in events if isinstance(e, EndOfTurn)], duration)
        body = render(t, fmt, stt.model_id, "microphone", args.vad)
        atomic_write(args.output, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
