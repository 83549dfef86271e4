"""The one load call of the apps: LM, Mimi and text tokenizer from one checkpoint, with the
checkpoint's app settings (model type, STT/TTS/generation configs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..checkpoints import lm as lm_ckpt
from ..errors import CheckpointError
from ..tokenizer import TextTokenizer
from .lm import LmConfig, LMModel, lm_from_checkpoint
from .mimi import MimiModel


@dataclass
class LoadedModel:
    """An LM with its Mimi and text tokenizer, and the checkpoint's app settings."""

    lm: LMModel
    mimi: MimiModel
    tokenizer: TextTokenizer | None  # None when the checkpoint ships none
    checkpoint: lm_ckpt.LmCheckpoint

    @property
    def config(self) -> LmConfig:
        return self.lm.config

    @property
    def model_type(self) -> str:
        """"moshi" (duplex chat), "stt" or "tts", as Kyutai's config.json says."""
        return self.lm.config.model_type or "moshi"


def load(source: str | Path, revision: str | None = None, dtype: mx.Dtype | None = None,
         quantize: int | None = None, group_size: int | None = None, tokenizer: bool = True) -> LoadedModel:
    """LM, Mimi and tokenizer from one checkpoint (file, directory or repo id). The
    tokenizer is required when `tokenizer` (apps that show text), else loaded if present."""
    return load_checkpoint(lm_ckpt.read(source, revision), revision, dtype, quantize, group_size, tokenizer)


def load_checkpoint(ckpt: lm_ckpt.LmCheckpoint, revision: str | None = None, dtype: mx.Dtype | None = None,
                    quantize: int | None = None, group_size: int | None = None,
                    tokenizer: bool = True) -> LoadedModel:
    """`load` for a checkpoint already read (its config checked by the caller)."""
    tok_path = lm_ckpt.companion_files(ckpt, revision).get("tokenizer_name")
    if tok_path is None and tokenizer:  # before the weights load: fail fast
        raise CheckpointError(f"{ckpt.source}: no text tokenizer (expected `tokenizer_name` in config.json or "
                              f"{lm_ckpt.DEFAULT_TOKENIZER_NAME})")
    lm = lm_from_checkpoint(ckpt, dtype, quantize, group_size)
    mimi = MimiModel.for_lm(ckpt, revision)
    cfg = lm.config
    tok = None if tok_path is None else TextTokenizer(tok_path, cfg.existing_text_padding_id,
                                                       cfg.existing_text_end_padding_id)
    return LoadedModel(lm, mimi, tok, ckpt)
