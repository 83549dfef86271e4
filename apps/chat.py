"""`moshi-mlx chat`: full-duplex conversation with Moshi.

Live: microphone and speakers through sounddevice (PortAudio) at 24 kHz mono (resampled
when a device runs at another rate); the audio callbacks only move buffers, the main
thread runs echo cancellation, Mimi and the LM (moshi_mlx.sessions.live.LiveLoop), with lag
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

from . import args as check

DEFAULT_MODEL = "kyutai/moshiko-mlx-q4"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with Moshi: microphone and speakers, or a recording",
                       description="Full-duplex conversation with Moshi: live through the default audio devices "
                                   "(echo cancellation on), or over a recording with --input-file/--output-file.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"converted directory, Kyutai checkpoint directory or repo id (default {DEFAULT_MODEL})")
    p.add_argument("-q", "--quantize", type=int, choices=[4, 8], default=None,
                   help="quantize a full-precision checkpoint while loading")
    p.add_argument("--temp", type=check.temperature, default=0.8, help="audio sampling temperature (0 = greedy)")
    p.add_argument("--temp-text", type=check.temperature, default=0.7, help="text sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=check.top_k, default=250, help="audio top-k (0 = no limit)")
    p.add_argument("--top-k-text", type=check.top_k, default=25, help="text top-k (0 = no limit)")
    p.add_argument("--top-p", type=check.top_p, default=0.0,
                   help="audio nucleus sampling, 0..1 (0 = off; takes precedence over top-k)")
    p.add_argument("--top-p-text", type=check.top_p, default=0.0,
                   help="text nucleus sampling, 0..1 (0 = off; takes precedence over top-k)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--input-file", type=Path, default=None, help="the user's side, as an audio file")
    p.add_argument("--output-file", type=Path, default=None,
                   help="write Moshi's side here (24 kHz; .wav, .flac, .ogg or .mp3)")
    p.add_argument("--record", type=Path, default=None,
                   help="write both sides as stereo (user, Moshi; .wav, .flac, .ogg or .mp3)")
    p.add_argument("--max-minutes", type=check.minutes, default=None, help="stop after this much audio (> 0)")
    p.add_argument("--input-device", default=None, help="microphone (index or name; see --list-devices)")
    p.add_argument("--output-device", default=None, help="speakers (index or name; see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--no-aec", action="store_true", help="no echo cancellation (use headphones)")
    p.add_argument("--quiet-text", action="store_true",
                   help="do not print Moshi's words")
    p.set_defaults(run=run)


def load_session(args: argparse.Namespace):
    from moshi_mlx.checkpoints import lm as lm_ckpt
    from moshi_mlx.models.loading import load_checkpoint
    from moshi_mlx.sessions.duplex import DuplexSession, check_duplex_config

    ckpt = lm_ckpt.read(args.model)
    check_duplex_config(ckpt.config, ckpt.source)  # before the weights load
    model = load_checkpoint(ckpt, quantize=args.quantize)
    return DuplexSession(model.lm, model.mimi, model.tokenizer, temp=args.temp, temp_text=args.temp_text,
                         top_k=args.top_k, top_k_text=args.top_k_text, top_p=getattr(args, "top_p", 0.0),
                         top_p_text=getattr(args, "top_p_text", 0.0), seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from moshi_mlx.audio import check_audio, output_format
    from moshi_mlx.errors import InputError

    if args.list_devices:
        return list_devices()
    if args.input_file is not None and args.output_file is None and args.record is None:
        raise InputError("--input-file needs --output-file and/or --record to write Moshi's side to")
    # Everything that can be checked without the model is checked before it loads.
    for out in (args.output_file, args.record):
        if out is not None:
            if not out.parent.exists():
                raise InputError(f"{out.parent}: output directory does not exist")
            if out.is_dir():
                raise InputError(f"{out}: is a directory")
            output_format(out)
    if args.input_file is None:
        return run_live(args)
    check_audio(args.input_file)
    return run_file(args)


def run_file(args: argparse.Namespace) -> int:
    """The duplex loop over a recording. Ctrl-C stops it and keeps what was produced so far."""
    from moshi_mlx.audio import read_audio, write_wav

    session = load_session(args)
    rate, frame = session.mimi.sampling_rate, session.frame_size
    user = read_audio(args.input_file, rate, quiet=False).pcm
    if args.max_minutes is not None:
        user = user[: int(args.max_minutes * 60 * rate)]
    frames = -(-len(user) // frame)
    padded = np.pad(user, (0, frames * frame - len(user)))
    moshi = np.zeros_like(padded)
    # Moshi's words go to stdout as they come, unless they would tear the progress bar
    # (both on one terminal): then they show in the bar and in full at the end.
    show_text = not args.quiet_text
    progress = _FileProgress(len(user) / rate, frame / rate)
    stream_text = show_text and not (progress.bar is not None and sys.stdout.isatty())
    words: list[str] = []
    tail = ""  # the last words, shown in the bar
    done = 0
    t0 = time.perf_counter()
    try:
        for i in range(frames):
            out = session.step(padded[i * frame:(i + 1) * frame])
            moshi[i * frame:(i + 1) * frame] = out.pcm
            done = i + 1
            if out.text and show_text:
                words.append(out.text)
                tail = (tail + out.text)[-40:]
                if stream_text:
                    print(out.text, end="", flush=True)
            progress.update(done, tail if show_text and not stream_text else "")
    except KeyboardInterrupt:
        pass
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0
    if show_text:
        print("" if stream_text else "".join(words), flush=True)
    total = len(user)
    kept = min(done * frame, total)  # whole frames processed: the outputs stay on the frame clock
    if kept == 0 and done < frames:
        print("interrupted before the first frame: nothing written", file=sys.stderr)
        return 130
    user, moshi = user[:kept], moshi[:kept]
    if args.output_file is not None:
        write_wav(args.output_file, moshi, rate)
    if args.record is not None:
        write_wav(args.record, np.stack([user, moshi], axis=1), rate)
    seconds = kept / rate
    print(f"{done} frames ({seconds:.1f} s) in {elapsed:.1f} s: {elapsed / max(done, 1) * 1e3:.0f} ms per "
          f"80 ms frame ({seconds / max(elapsed, 1e-9):.2f}x real time)", file=sys.stderr)
    if done < frames:
        written = " and ".join(str(p) for p in (args.output_file, args.record) if p is not None)
        print(f"interrupted: kept the first {seconds:.1f} s of {total / rate:.1f} s in {written}",
              file=sys.stderr)
        return 130
    return 0


class _FileProgress:
    """Progress through a recording on stderr (chat's file mode, transcribe): a bar with ETA on
    a terminal; elsewhere (a log, a pipe) a plain line when the first unit is done (the model
    runs) and then every EVERY seconds. `update(done)` counts units of `unit_seconds` of audio
    (`label`: what the total counts, seconds by default; tts counts words)."""

    EVERY = 5.0

    def __init__(self, total_seconds: float, unit_seconds: float, label: str = "s"):
        self.total, self.frame_seconds, self.label = total_seconds, unit_seconds, label
        self.bar, self.next_line = None, 0.0
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=round(total_seconds, 1), unit=label, file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} " + label +
                                       " [{elapsed}<{remaining}]{postfix}")

    def update(self, done: float, text: str = "") -> None:
        seconds = min(done * self.frame_seconds, self.total)
        if self.bar is not None:
            self.bar.n = round(seconds, 1)
            if text:
                self.bar.set_postfix_str(text.replace("\n", " "), refresh=False)
            self.bar.refresh()
        elif time.monotonic() >= self.next_line:
            self.next_line = time.monotonic() + self.EVERY
            print(f"progress: {seconds:.1f} / {self.total:.1f} {self.label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def list_devices() -> int:
    sd = _sounddevice()
    devices = sd.query_devices()
    if len(devices) == 0:
        from moshi_mlx.errors import MoshiMlxError

        raise MoshiMlxError(_no_devices(sd))
    print(devices)
    return 0


def _no_devices(sd) -> str:
    """Why PortAudio lists nothing, in the terms a user can act on."""
    apis = ", ".join(api["name"] for api in sd.query_hostapis()) or "none"
    return (f"no audio devices found: PortAudio (host APIs: {apis}) sees no sound card and no sound server "
            "(PulseAudio/PipeWire): none running for this user, no permission on /dev/snd, or a container "
            "without audio; --input-file/--output-file work without devices")


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
    from moshi_mlx.sessions.live import LiveLoop
    from moshi_mlx.errors import MoshiMlxError

    sd = _sounddevice()
    if len(sd.query_devices()) == 0:
        raise MoshiMlxError(_no_devices(sd))
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
        # what the device got, and its own underrun flag: the summary and the status line count these
        loop.count_device_output(frames, n, underflow=bool(status.output_underflow))

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
            print("\r" + loop.status_line(), end="", file=sys.stderr)

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
    print(loop.summary(), file=sys.stderr)
    return 0


class _Recorder:
    """Both sides of a live session as a stereo wav (user, Moshi), written frame by frame
    (memory stays flat) to a temporary file renamed into place when the session ends."""

    def __init__(self, path: Path, rate: int):
        import os
        import tempfile

        import soundfile as sf

        from moshi_mlx.audio import file_mode, output_format

        self.path = path
        fmt, subtype = output_format(path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        os.chmod(self.tmp, file_mode())  # mkstemp's 0600 would ignore the umask
        self.file = sf.SoundFile(self.tmp, "w", samplerate=rate, channels=2, subtype=subtype, format=fmt)

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
