"""transformers-style entry points around the Moshi LM, its Mimi codec and text tokenizer."""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .lm import LmConfig, LMModel


class MoshiForConditionalGeneration:
    """The Moshi LM with the Mimi codec and tokenizer that go with it.

    `lm` is the LMModel (what LMGen drives); `mimi` and `tokenizer` are loaded on first use
    from the same checkpoint directory or repo.
    """

    def __init__(self, lm: LMModel, home: str | Path | None = None, raw_config: dict | None = None):
        self.lm = lm
        self.home = home
        self.raw_config = raw_config or {}
        self._mimi = None
        self._tokenizer = None

    @property
    def config(self) -> LmConfig:
        return self.lm.config

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, revision: str | None = None,
                        dtype: mx.Dtype | None = None, quantize: int | None = None,
                        group_size: int | None = None) -> "MoshiForConditionalGeneration":
        """A Kyutai-style directory or repo (config.json with the LM kwargs and file names,
        or none: the 7B defaults and release file names), a single weights file, or a repo id.

        quantize=4|8 quantizes while loading (group_size defaults: 32 for 4-bit, 64 for
        8-bit); dtype defaults to the backend's compute dtype (see quantize.compute_dtype).
        """
        from ..weights import load_lm

        lm, raw, home = load_lm(path_or_repo_id, revision=revision, dtype=dtype, quantize=quantize,
                                group_size=group_size)
        return cls(lm, home, raw)

    @property
    def mimi(self):
        if self._mimi is None:
            from .mimi import MimiModel

            self._mimi = MimiModel.from_pretrained(self.home)
        return self._mimi
