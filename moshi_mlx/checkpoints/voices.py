"""TTS voices: Kyutai's speaker embeddings (`kyutai/tts-voices`) → [T, dim] arrays.

A voice file is a safetensors file with one tensor `speaker_wavs` [1, dim, T]: the Mimi
latents (dim 512) of ~10 s of speech (T = 125 frames). Kyutai names them after the clip
and the model they were made for: `{voice}.{sig}@{epoch}.safetensors` in kyutai/tts-voices,
e.g. `expresso/ex03-ex01_happy_001_channel1_334s.wav.1e68beda@240.safetensors` for
kyutai/tts-1.6b-en_fr (model_id sig 1e68beda, epoch 240).
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError, InputError
from .hub import resolve_file

VOICE_REPO = "kyutai/tts-voices"
DEFAULT_VOICE = "expresso/ex03-ex01_happy_001_channel1_334s.wav"  # the default of Kyutai's TTS scripts
VOICE_KEY = "speaker_wavs"


def voice_suffix(model_id: dict | None) -> str:
    """`.{sig}@{epoch}.safetensors` for a model_id {sig, epoch} (Kyutai's naming)."""
    if not isinstance(model_id, dict) or "sig" not in model_id or "epoch" not in model_id:
        return ".safetensors"
    return f".{model_id['sig']}@{model_id['epoch']}.safetensors"


def voice_path(voice: str | Path, model_id: dict | None, repo: str = VOICE_REPO) -> Path:
    """A local .safetensors path as is; otherwise a voice name of `repo` (downloaded)."""
    p = Path(voice)
    if p.suffix == ".safetensors" or p.exists():
        if not p.is_file():
            raise InputError(f"voice file not found: {p}")
        return p
    name = str(voice)
    try:
        return resolve_file(repo, name + voice_suffix(model_id))
    except CheckpointError as e:
        raise InputError(f"unknown voice {name!r} ({e}); pass a name from {repo} (e.g. {DEFAULT_VOICE}) "
                         f"or a local .safetensors voice file") from None


def read_voice(path: Path, dim: int) -> np.ndarray:
    """The voice's latents [T, dim], checked against the model's speaker dimension."""
    from .safetensors import read_safetensors

    state = read_safetensors([Path(path)])
    if VOICE_KEY not in state:
        raise InputError(f"{path}: not a voice file (no `{VOICE_KEY}` tensor; found {sorted(state)[:4]})")
    x = np.array(state[VOICE_KEY].astype(mx.float32))
    if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] != dim or x.shape[2] < 1:
        raise InputError(f"{path}: voice tensor `{VOICE_KEY}` has shape {list(x.shape)}, this model takes "
                         f"[1, {dim}, frames]")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{path}: voice tensor contains NaN or Inf")
    return x[0].T.copy()
