"""Audio files in and out: any format libsndfile reads (wav, flac, ogg, mp3), resampled with soxr."""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError


@dataclass
class Audio:
    pcm: np.ndarray  # [samples] float32 mono at `sample_rate`
    sample_rate: int
    source_rate: int
    source_channels: int


def read_audio(path: str | Path, sample_rate: int, quiet: bool = True) -> Audio:
    """Read a file as mono float32 at `sample_rate` (stereo is averaged, with a notice)."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile's message plus the file name
        raise InputError(f"{path}: cannot decode audio ({e}); supported: wav, flac, ogg, mp3") from None
    if data.shape[0] == 0:
        raise InputError(f"{path}: the file contains no audio samples")
    channels = data.shape[1]
    if channels > 1 and not quiet:
        print(f"note: {path.name} has {channels} channels; downmixing to mono", file=sys.stderr)
    pcm = data.mean(axis=1) if channels > 1 else data[:, 0]
    if not np.all(np.isfinite(pcm)):
        raise InputError(f"{path}: the audio contains NaN or Inf samples")
    return Audio(resample(pcm, sr, sample_rate), sample_rate, sr, channels)


def resample(pcm: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return np.ascontiguousarray(pcm, dtype=np.float32)
    import soxr

    return soxr.resample(pcm, rate_in, rate_out, quality="HQ").astype(np.float32)


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Write atomically: a temporary file in the same directory, renamed when complete.

    `pcm` is [samples] or [samples, channels] float in [-1, 1]; written as 16-bit PCM.
    """
    import soundfile as sf

    path = Path(path)
    data = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
    atomic_write(path, lambda tmp: sf.write(tmp, data, sample_rate, subtype="PCM_16", format="WAV"))


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename onto `path`; on any failure nothing is left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
