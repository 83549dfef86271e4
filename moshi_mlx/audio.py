"""Audio files in and out: any format libsndfile reads (wav, flac, ogg, mp3), resampled with soxr."""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError


@dataclass
class Audio:
    pcm: np.ndarray  # [samples] float32 mono at `sample_rate`
    sample_rate: int
    source_rate: int
    source_channels: int


@dataclass
class AudioInfo:
    path: Path
    source_rate: int
    source_channels: int
    frames: int  # samples per channel at the source rate

    @property
    def seconds(self) -> float:
        return self.frames / self.source_rate


def audio_info(path: str | Path) -> AudioInfo:
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such audio file")
    try:
        info = sf.info(str(path))
    except Exception as e:  # noqa: BLE001 - libsndfile's message plus the file name
        raise InputError(f"{path}: cannot decode audio ({e}); supported: wav, flac, ogg, mp3") from None
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames))


def iter_audio(path: str | Path, sample_rate: int, block_seconds: float = 10.0,
               quiet: bool = True) -> Iterator[np.ndarray]:
    """Mono float32 blocks at `sample_rate`, decoded and resampled incrementally (bounded
    memory for any file length). Stereo is averaged, with a notice unless `quiet`."""
    import soundfile as sf
    import soxr

    info = audio_info(path)
    if info.frames == 0:
        raise InputError(f"{path}: the file contains no audio samples")
    if info.source_channels > 1 and not quiet:
        print(f"note: {info.path.name} has {info.source_channels} channels; downmixing to mono", file=sys.stderr)
    resampler = None
    if info.source_rate != sample_rate:
        resampler = soxr.ResampleStream(info.source_rate, sample_rate, 1, dtype="float32", quality="HQ")
    block = max(1, int(block_seconds * info.source_rate))
    try:
        blocks = sf.blocks(str(path), blocksize=block, dtype="float32", always_2d=True)
        for i, data in enumerate(blocks):
            pcm = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            if not np.all(np.isfinite(pcm)):
                raise InputError(f"{path}: the audio contains NaN or Inf samples (near {i * block_seconds:.0f} s)")
            last = (i + 1) * block >= info.frames
            yield resampler.resample_chunk(pcm, last=last) if resampler else np.ascontiguousarray(pcm)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot decode audio ({e})") from None


def read_audio(path: str | Path, sample_rate: int, quiet: bool = True) -> Audio:
    """Read a whole file as mono float32 at `sample_rate` (see iter_audio)."""
    info = audio_info(path)
    pcm = np.concatenate(list(iter_audio(path, sample_rate, quiet=quiet)) or [np.zeros(0, np.float32)])
    return Audio(pcm.astype(np.float32), sample_rate, info.source_rate, info.source_channels)


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
