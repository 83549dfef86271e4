"""`moshi-mlx chat`: full-duplex conversation with Moshi.

Live: microphone and speakers through sounddevice (PortAudio) at 24 kHz mono (resampled
when a device runs at another rate); the audio callbacks only move buffers, the main
thread runs echo cancellation, Mimi and the LM (moshi_mlx.duplex.LiveLoop), with lag
control and a status line. Or over a recording (`--input-file IN.wav --output-file OUT.wav`):
the same per-frame pipeline, at full speed.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "kyutai/moshiko-mlx-q4"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with Moshi: microphone and speakers, or a recording",
                       description="Full-duplex conversation with Moshi: live through the default audio devices "
                                   "(echo cancellation on), or over a recording with --input-file/--output-file.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"converted directory, Kyutai checkpoint directory or repo id (default {DEFAULT_MODEL})")
    p.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize a full-precision checkpoint while loading")
    p.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature (0 = greedy)")
    p.add_argument("--temp-text", type=float, default=0.7, help="text sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=250, help="audio top-k")
    p.add_argument("--top-k-text", type=int, default=25, help="text top-k")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--input-file", type=Path, default=None, help="the user's side, as an audio file")
    p.add_argument("--output-file", type=Path, default=None, help="write Moshi's side here (24 kHz wav)")
    p.add_argument("--record", type=Path, default=None, help="write both sides to a stereo wav (user, Moshi)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much audio")
    p.add_argument("--input-device", default=None, help="microphone (index or name; see --list-devices)")
    p.add_argument("--output-device", default=None, help="speakers (index or name; see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--no-aec", action="store_true", help="no echo cancellation (use headphones)")
    p.add_argument("--quiet-text", action="store_true",
                   help="do not print Moshi's words")
    p.set_defaults(run=run)


def load_session(args: argparse.Namespace):
    from moshi_mlx.duplex import DuplexSession
    from moshi_mlx.models.moshi import MoshiForConditionalGeneration
    from moshi_mlx.tokenizer import TextTokenizer

    model = MoshiForConditionalGeneration.from_pretrained(args.model, quantize=args.quantize)
    cfg = model.config
    tokenizer = TextTokenizer.from_pretrained(model.home, name=model.raw_config.get("tokenizer_name"),
                                              padding_id=cfg.existing_text_padding_id,
                                              end_of_padding_id=cfg.existing_text_end_padding_id)
    return DuplexSession(model, tokenizer=tokenizer, temp=args.temp, temp_text=args.temp_text, top_k=args.top_k,
                         top_k_text=args.top_k_text, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from moshi_mlx.errors import InputError

    if args.list_devices:
        print(_sounddevice().query_devices())
        return 0
    if args.input_file is None:
        return run_live(args)
    if args.output_file is None and args.record is None:
        raise InputError("--input-file needs --output-file and/or --record to write Moshi's side to")
    for out in (args.output_file, args.record):
        if out is not None and not out.parent.exists():
            raise InputError(f"{out.parent}: output directory does not exist")
    return run_file(args)


def run_file(args: argparse.Namespace) -> int:
    from moshi_mlx.audio import read_audio, write_wav

    session = load_session(args)
    rate, frame = session.mimi.sampling_rate, session.frame_size
    user = read_audio(args.input_file, rate, quiet=False).pcm
    if args.max_minutes is not None:
        user = user[: int(args.max_minutes * 60 * rate)]
    frames = -(-len(user) // frame)
    padded = np.pad(user, (0, frames * frame - len(user)))
    moshi = np.zeros_like(padded)
    t0 = time.perf_counter()
    for i in range(frames):
        out = session.step(padded[i * frame:(i + 1) * frame])
        moshi[i * frame:(i + 1) * frame] = out.pcm
        if out.text and not args.quiet_text:
            print(out.text, end="", flush=True)
    elapsed = time.perf_counter() - t0
    if not args.quiet_text:
        print(flush=True)
    moshi = moshi[: len(user)]
    if args.output_file is not None:
        write_wav(args.output_file, moshi, rate)
    if args.record is not None:
        write_wav(args.record, np.stack([user, moshi], axis=1), rate)
    seconds = len(user) / rate
    print(f"{frames} frames ({seconds:.1f} s) in {elapsed:.1f} s: {elapsed / max(frames, 1) * 1e3:.0f} ms per "
          f"80 ms frame ({seconds / max(elapsed, 1e-9):.2f}x real time)", file=sys.stderr)
    return 0


def _sounddevice():
    from moshi_mlx.errors import MoshiMlxError

    try:
        import sounddevice as sd
    except OSError as e:  # the module imports, but PortAudio's library is missing
        raise MoshiMlxError(f"PortAudio is not available ({e}); install it (Debian/Ubuntu: "
                            "sudo apt-get install libportaudio2; macOS: it ships with the sounddevice wheel)") from None
    return sd


def _device(value):
    return int(value) if isinstance(value, str) and value.isdigit() else value


def run_live(args: argparse.Namespace) -> int:
    import threading

    import soxr

    from moshi_mlx.aec import EchoCanceller
    from moshi_mlx.duplex import LiveLoop
    from moshi_mlx.errors import MoshiMlxError

    sd = _sounddevice()
    try:
        in_info = sd.query_devices(_device(args.input_device), "input")
        out_info = sd.query_devices(_device(args.output_device), "output")
    except Exception as e:  # noqa: BLE001 - PortAudio's errors: no device, bad index/name
        raise MoshiMlxError(f"no usable audio device ({e}); see `moshi-mlx chat --list-devices`, or use "
                            "--input-file/--output-file") from None
    session = load_session(args)
    rate = session.mimi.sampling_rate
    print("warming up the model…", file=sys.stderr)
    for _ in range(4):  # compile/allocate before the microphone opens
        session.step(np.zeros(session.frame_size, np.float32))
    session.reset()
    aec = None if args.no_aec else EchoCanceller(rate)
    in_rate, out_rate = int(in_info["default_samplerate"]), int(out_info["default_samplerate"])
    to_model = soxr.ResampleStream(in_rate, rate, 1, dtype="float32") if in_rate != rate else None
    to_device = soxr.ResampleStream(rate, out_rate, 1, dtype="float32") if out_rate != rate else None
    raw_in: collections.deque = collections.deque(maxlen=256)  # device blocks, bounded
    recorder = _Recorder(args.record, rate) if args.record is not None else None
    loop = LiveLoop(session, aec, on_frame=recorder.write if recorder else None)
    if not args.quiet_text:
        user_hook = loop.on_frame

        def show(user, out):
            if out.text:
                print(out.text, end="", flush=True)
            if user_hook:
                user_hook(user, out)
        loop.on_frame = show
    out_pending = np.zeros(0, np.float32)
    out_lock = threading.Lock()

    def on_input(indata, frames, time_info, status):  # PortAudio thread: copy and return
        raw_in.append(indata[:, 0].copy())

    def on_output(outdata, frames, time_info, status):  # PortAudio thread: copy and return
        nonlocal out_pending
        with out_lock:
            n = min(frames, len(out_pending))
            outdata[:n, 0] = out_pending[:n]
            outdata[n:, 0] = 0.0
            out_pending = out_pending[n:]

    def pump_once() -> None:  # resample device blocks, run the model, resample Moshi's audio
        nonlocal out_pending
        while raw_in:
            block = raw_in.popleft()
            loop.push_input(to_model.resample_chunk(block) if to_model else block)
        if not loop.process_one():
            time.sleep(0.005)
        with out_lock:
            need = int(0.16 * out_rate) - len(out_pending)  # keep ~2 frames queued for the device
        if need > 0 and loop.out_q:
            pcm = loop.pull_output(session.frame_size)
            pcm = to_device.resample_chunk(pcm) if to_device else pcm
            with out_lock:
                out_pending = np.concatenate([out_pending, pcm])

    def report() -> None:  # status line, twice a second
        while not loop.stop_event.wait(0.5):
            print(f"\r[{loop.step_ms:5.0f} ms/step, {80.0 / max(loop.step_ms, 1e-3):4.2f}x real time, "
                  f"latency {loop.latency_ms:5.0f} ms, dropped {loop.dropped_in}]", end="", file=sys.stderr)

    # The model runs on this (the main) thread, where it was loaded and warmed up: MLX's
    # streams are per thread (since MLX 0.31.2), and a process that used MLX from a second
    # thread can abort at exit. Ctrl-C arrives here as KeyboardInterrupt.
    reporter = threading.Thread(target=report, daemon=True)
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    try:
        with sd.InputStream(device=_device(args.input_device), channels=1, samplerate=in_rate, dtype="float32",
                            callback=on_input), \
                sd.OutputStream(device=_device(args.output_device), channels=1, samplerate=out_rate,
                                dtype="float32", callback=on_output):
            print("listening: talk to Moshi (Ctrl-C to stop)", file=sys.stderr)
            reporter.start()
            while deadline is None or time.time() < deadline:
                pump_once()
    except KeyboardInterrupt:
        pass
    except sd.PortAudioError as e:
        if recorder is not None:
            recorder.discard()
            recorder = None
        raise MoshiMlxError(f"audio device error: {e} (device busy or unsupported sample rate? "
                            "see --list-devices)") from None
    finally:
        loop.stop_event.set()
        if reporter.is_alive():
            reporter.join(2)
    print(file=sys.stderr)
    if recorder is not None:
        recorder.close()
    seconds = loop.frames * 0.08
    print(f"session: {seconds:.1f} s, {loop.frames} frames, {loop.dropped_in} dropped, {loop.underruns} "
          f"output underruns, {loop.step_ms:.0f} ms per step", file=sys.stderr)
    return 0


class _Recorder:
    """Both sides of a live session as a stereo wav (user, Moshi), written frame by frame
    (memory stays flat) to a temporary file renamed into place when the session ends."""

    def __init__(self, path: Path, rate: int):
        import os
        import tempfile

        import soundfile as sf

        self.path = path
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        self.file = sf.SoundFile(self.tmp, "w", samplerate=rate, channels=2, subtype="PCM_16", format="WAV")

    def write(self, user: np.ndarray, out) -> None:
        self.file.write(np.clip(np.stack([user, out.pcm], axis=1), -1.0, 1.0))

    def close(self) -> None:
        import os

        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        import os

        self.file.close()
        os.unlink(self.tmp)
