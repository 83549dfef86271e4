"""`moshi-mlx encode` / `moshi-mlx decode`: audio files ↔ Mimi codes, in bounded memory.

Files of any length are processed as exact segmented streaming (the result equals one
batch call on the whole file), so memory stays flat. Outputs are written to a temporary
file and renamed when complete: a failure never leaves a half-written file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DEFAULT_MIMI = "kyutai/mimi"
CODES_KEY = "audio_codes"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="audio file (wav/flac/ogg/mp3) → Mimi codes (.safetensors)",
                       description="Encode an audio file to Mimi codes. Any sample rate is resampled to "
                                   "24 kHz; stereo is downmixed to mono.")
    p.add_argument("input", type=Path, help="audio file: wav, flac, ogg or mp3")
    p.add_argument("output", type=Path, help="codes file to write (.safetensors)")
    p.add_argument("-n", "--num-quantizers", type=int, default=None,
                   help="codebooks to keep, 1..32 (default: all of the model's; Moshi uses 8)")
    p.add_argument("--model", default=DEFAULT_MIMI,
                   help=f"Mimi weights: file, directory or Hugging Face repo id (default {DEFAULT_MIMI})")
    # Only --quiet: across subcommands -q means "quantize" (convert, chat).
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary (notices and warnings stay)")
    p.set_defaults(run=run_encode)

    p = sub.add_parser("decode", help="Mimi codes (.safetensors) → audio file (wav/flac/ogg/mp3)",
                       description="Decode Mimi codes written by `moshi-mlx encode` to a 24 kHz audio file, in "
                                   "the format its extension names (.wav, .flac, .ogg, .mp3).")
    p.add_argument("input", type=Path, help="codes file (.safetensors) from `moshi-mlx encode`")
    p.add_argument("output", type=Path, help="audio file to write: .wav (16-bit), .flac, .ogg (Vorbis) or .mp3")
    p.add_argument("--model", default=None,
                   help="Mimi weights (default: the model recorded in the codes file, else "
                        f"{DEFAULT_MIMI})")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(run=run_decode)


def _progress(total: float, unit: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} {unit} [{elapsed}<{remaining}]")


def _check_output(path: Path) -> None:
    from moshi_mlx.errors import InputError

    if not path.parent.exists():
        raise InputError(f"{path.parent}: output directory does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")


def encode_file(mimi, input_path: Path, num_quantizers: int | None = None, quiet: bool = True,
                ) -> tuple[np.ndarray, int]:
    """Codes [1, n, T] for a whole file, streamed in exact segments; and the sample count at 24 kHz."""
    import mlx.core as mx

    from moshi_mlx.audio import audio_info, iter_audio

    info = audio_info(input_path)
    n = mimi._check_num_quantizers(num_quantizers)
    rate, frame = mimi.sampling_rate, mimi.frame_size
    segment = mimi.SEGMENT_FRAMES * frame
    codes, pending, samples = [], np.zeros(0, np.float32), 0
    state = mimi.init_state(1, exact=True)
    with _progress(round(info.seconds, 1), "s", quiet) as bar:
        def feed(pcm: np.ndarray) -> None:
            c, _ = mimi.encode_step(mx.array(pcm[None, None]), state, n)
            mx.eval(c)
            codes.append(np.array(c))
            bar.update(min(len(pcm) / rate, bar.total - bar.n))

        for block in iter_audio(input_path, rate, quiet=False):  # notices are not progress: always shown
            samples += len(block)
            pending = np.concatenate([pending, block])
            while len(pending) >= segment:
                feed(pending[:segment])
                pending = pending[segment:]
        if samples == 0:
            from moshi_mlx.errors import InputError

            raise InputError(f"{input_path}: the file contains no audio samples")
        if len(pending):  # zero-pad the last partial frame, as batch encoding does
            feed(np.pad(pending, (0, -len(pending) % frame)))
    return np.concatenate(codes, axis=-1), samples


def run_encode(args: argparse.Namespace) -> int:
    from safetensors.numpy import save_file

    from moshi_mlx import MimiModel
    from moshi_mlx.audio import atomic_write, check_audio

    _check_output(args.output)
    check_audio(args.input)  # a bad input fails before the (slow) model load
    mimi = MimiModel.from_pretrained(args.model)
    mimi._check_num_quantizers(args.num_quantizers)  # fail before reading the audio
    codes, samples = encode_file(mimi, args.input, args.num_quantizers, quiet=args.quiet)
    metadata = {
        "format": "moshi_mlx.codes/1",
        "sample_rate": str(mimi.sampling_rate),
        "frame_rate": str(mimi.config.frame_rate),
        "num_samples": str(samples),
        "num_quantizers": str(codes.shape[1]),
        "model": _model_reference(args.model),
        "source": args.input.name,
    }
    atomic_write(args.output, lambda tmp: save_file({CODES_KEY: np.ascontiguousarray(codes, dtype=np.int32)}, tmp, metadata=metadata))
    if not args.quiet:
        print(f"{args.input} → {args.output}: {codes.shape[2]} frames × {codes.shape[1]} codebooks "
              f"({samples / mimi.sampling_rate:.2f} s)", file=sys.stderr)
    return 0


def _model_reference(model: str) -> str:
    """What the codes file records as its model: a local path made absolute, so that `decode`
    finds it from any directory; a repo id as it is."""
    from moshi_mlx.checkpoints.hub import is_local

    return str(Path(model).expanduser().resolve()) if is_local(model) else str(model)


def _load_recorded_mimi(args: argparse.Namespace, meta: dict[str, str]):
    """The Mimi model for decoding: --model, else the one the codes file names."""
    from moshi_mlx import MimiModel
    from moshi_mlx.errors import MoshiMlxError

    if args.model is not None or not meta.get("model"):
        return MimiModel.from_pretrained(args.model or DEFAULT_MIMI)
    try:
        return MimiModel.from_pretrained(meta["model"])
    except MoshiMlxError as e:
        raise type(e)(f"{e} (the model recorded in {args.input}; pass --model to use another)") from None


def read_codes(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """Codes [1, n, T] and metadata from a file written by `moshi-mlx encode`."""
    from safetensors import safe_open

    from moshi_mlx.errors import InputError
    from moshi_mlx.checkpoints.safetensors import check_safetensors

    if not path.is_file():
        raise InputError(f"{path}: no such codes file")
    try:
        check_safetensors(path)
    except Exception as e:  # CheckpointError wording is about weights; restate for codes
        raise InputError(str(e).replace("download it again", "re-encode it")) from None
    with safe_open(str(path), framework="numpy") as f:
        keys = list(f.keys())
        if CODES_KEY not in keys:
            raise InputError(f"{path}: no '{CODES_KEY}' tensor (found {keys}); is it a `moshi-mlx encode` file?")
        codes = f.get_tensor(CODES_KEY)
        metadata = f.metadata() or {}
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
        raise InputError(f"{path}: '{CODES_KEY}' must be integer codes [1, n, frames], got "
                         f"{codes.dtype} {list(codes.shape)}")
    return codes, metadata


def run_decode(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import soundfile as sf

    from moshi_mlx.audio import atomic_write, output_format
    from moshi_mlx.errors import InputError

    _check_output(args.output)
    fmt, subtype = output_format(args.output)  # inputs and outputs are checked before the model loads
    codes, meta = read_codes(args.input)
    mimi = _load_recorded_mimi(args, meta)
    mimi._check_codes(codes)  # range and count checked before anything is written
    if codes.shape[0] != 1:
        raise InputError(f"{args.input}: holds {codes.shape[0]} streams; decode expects one")
    rate = mimi.sampling_rate
    total = int(meta.get("num_samples", codes.shape[2] * mimi.frame_size))
    seg = mimi.SEGMENT_FRAMES

    def write(tmp: str) -> None:
        written = 0
        state = mimi.init_state(1, exact=True)
        with sf.SoundFile(tmp, "w", samplerate=rate, channels=1, subtype=subtype, format=fmt) as out, \
                _progress(round(total / rate, 1), "s", args.quiet) as bar:
            for start in range(0, codes.shape[2], seg):
                pcm, _ = mimi.decode_step(mx.array(codes[..., start:start + seg]), state)
                pcm = np.array(pcm)[0, 0]
                pcm = pcm[: max(0, total - written)]
                out.write(np.clip(pcm, -1.0, 1.0))
                written += len(pcm)
                bar.update(min(len(pcm) / rate, bar.total - bar.n))

    atomic_write(args.output, write)
    if not args.quiet:
        print(f"{args.input} → {args.output}: {total / rate:.2f} s at {rate} Hz", file=sys.stderr)
    return 0
