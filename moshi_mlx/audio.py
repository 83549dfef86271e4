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
        open(path, "rb").close()
    except OSError as e:  # libsndfile would call an unreadable file undecodable
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        info = sf.info(str(path))
    except Exception as e:  # noqa: BLE001 - libsndfile's message plus the file name
        raise InputError(f"{path}: cannot decode audio ({e}); supported: wav, flac, ogg, mp3") from None
    return AudioInfo(path, int(info.samplerate), int(info.channels), int(info.frames))


def check_audio(path: str | Path) -> AudioInfo:
    """Fail now, before a model is loaded, if `path` is missing, unreadable, not audio, empty,
    or cannot decode its first samples."""
    import soundfile as sf

    info = audio_info(path)
    if info.frames == 0:
        raise InputError(f"{path}: the file contains no audio samples")
    try:
        with sf.SoundFile(str(path)) as f:
            f.read(min(info.frames, 4096), dtype="float32")
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot decode audio ({e})") from None
    return info


def notify(message: str) -> None:
    """A notice or warning on stderr that survives a progress bar (tqdm redraws below it)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def iter_audio(path: str | Path, sample_rate: int, block_seconds: float = 10.0,
               quiet: bool = True) -> Iterator[np.ndarray]:
    """Mono float32 blocks at `sample_rate`, decoded and resampled incrementally (bounded
    memory for any file length). Stereo is averaged and a truncated file is read up to where
    it ends, each with a notice on stderr unless `quiet`."""
    import soundfile as sf
    import soxr

    info = audio_info(path)
    if info.frames == 0:
        raise InputError(f"{path}: the file contains no audio samples")
    if info.source_channels > 1 and not quiet:
        notify(f"note: {info.path.name} has {info.source_channels} channels; downmixing to mono")
    # libsndfile clamps a WAV's frame count to what the file holds: compare with the header.
    expected = max(info.frames, _wav_declared_frames(info.path) or 0)
    resampler = None
    if info.source_rate != sample_rate:
        resampler = soxr.ResampleStream(info.source_rate, sample_rate, 1, dtype="float32", quality="HQ")
    block = max(1, int(block_seconds * info.source_rate))
    decoded, flushed = 0, resampler is None
    try:
        blocks = sf.blocks(str(path), blocksize=block, dtype="float32", always_2d=True)
        for i, data in enumerate(blocks):
            pcm = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            if not np.all(np.isfinite(pcm)):
                raise InputError(f"{path}: the audio contains NaN or Inf samples (near {i * block_seconds:.0f} s)")
            decoded += len(pcm)
            if resampler is None:
                yield np.ascontiguousarray(pcm)
            else:
                flushed = decoded >= info.frames
                yield resampler.resample_chunk(pcm, last=flushed)
        if not flushed:  # fewer frames than announced: the resampler still holds the tail
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot decode audio ({e})") from None
    if decoded < expected and not quiet:
        rate = info.source_rate
        notify(f"warning: {path}: truncated: its header announces {expected / rate:.2f} s but the file holds "
               f"{decoded / rate:.2f} s; using what is there")


def _wav_declared_frames(path: Path) -> int | None:
    """Frames announced by a WAV file's `data` chunk header, or None (not a plain RIFF WAV,
    or a streamed one whose sizes were never filled in)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = 0
        while len(chunk := f.read(8)) == 8:
            cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"fmt ":
                fmt = f.read(size + (size & 1))
                block_align = int.from_bytes(fmt[12:14], "little") if len(fmt) >= 14 else 0
            elif cid == b"data":
                return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
            else:
                f.seek(size + (size & 1), 1)
    return None


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


# Extension → (libsndfile format, subtype) for the audio files we write.
_WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
                  ".mp3": ("MP3", "MPEG_LAYER_III")}


def output_format(path: str | Path) -> tuple[str, str]:
    """(format, subtype) that `path`'s extension names; an extension we cannot write is refused
    (checked before any work, so nothing is computed for a file that cannot be written)."""
    import soundfile as sf

    available = sf.available_formats()
    supported = {ext: fs for ext, fs in _WRITE_FORMATS.items()
                 if fs[0] in available and fs[1] in sf.available_subtypes(fs[0])}
    ext = Path(path).suffix.lower()
    if ext not in supported:
        raise InputError(f"{path}: cannot write {f'{ext!r}' if ext else 'a file without an extension'} audio; "
                         f"use one of {', '.join(supported)}")
    return supported[ext]


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Write atomically: a temporary file in the same directory, renamed when complete.

    `pcm` is [samples] or [samples, channels] float in [-1, 1]; written in the format the
    extension names (.wav and .flac as 16-bit PCM, .ogg as Vorbis, .mp3).
    """
    import soundfile as sf

    path = Path(path)
    fmt, subtype = output_format(path)
    data = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
    atomic_write(path, lambda tmp: sf.write(tmp, data, sample_rate, subtype=subtype, format=fmt))


write_audio = write_wav


def file_mode(directory: bool = False) -> int:
    """The mode open() would give a new file (0o666) or directory (0o777) under the umask:
    mkstemp/mkdtemp make theirs private (0600/0700), which must not leak into outputs."""
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename onto `path`; on any failure nothing is left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
    os.close(fd)
    try:
        os.chmod(tmp, file_mode())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
