"""Streaming generation: one LM step per 80 ms frame (Kyutai's `LMGen`, 0.2.13 semantics).

Each stream k is delayed by delays[k] steps. A small ring buffer of tokens (max_delay + 2
steps) holds what was generated or received; the input of step t is the buffer at t, with
each stream's initial token (text_card / card) until its delay has elapsed. The first
max_delay steps return None; afterwards each step returns the undelayed tokens of one
frame: [B, 1 + dep_q] = text, then Moshi's audio codebooks.

The session owns its state (the token ring and the LM's KV caches); the model holds only
weights, so several sessions run on one loaded model.
"""
from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import InputError
from ..models.lm import UNGENERATED_TOKEN, ZERO_TOKEN, LMModel
from ..modules.conditioners import Conditions
from ..modules.sampling import RandomKeys, Sampler


class LMGen:
    def __init__(self, model: "LMModel | object", temp: float = 0.8, temp_text: float = 0.7, top_k: int = 250,
                 top_k_text: int = 25, top_p: float = 0.0, top_p_text: float = 0.0, cfg_coef: float = 1.0,
                 cfg_is_no_text: bool = False, cfg_is_masked_until: list[int] | None = None,
                 on_text_hook: Callable[[mx.array], mx.array | None] | None = None, seed: int | None = None,
                 conditions: list[Conditions] | None = None,
                 on_text_logits_hook: Callable[[mx.array], mx.array] | None = None,
                 on_audio_hook: Callable[[mx.array], mx.array | None] | None = None):
        """`model`: an LMModel, or anything with an `.lm` LMModel (MoshiForConditionalGeneration).

        Temperatures of 0 mean greedy. cfg_coef != 1 runs classifier-free guidance: the batch
        is doubled and logits mixed as l_null + c · (l_cond − l_null); the null half has its
        text input zeroed (cfg_is_no_text) or its inputs masked for the first
        cfg_is_masked_until[b] steps, as in Kyutai's TTS, and its conditions all absent.

        conditions: one per batch item, for a conditioned LM (the TTS). Hooks (Kyutai's):
        on_text_logits_hook(logits [B, V]) → logits; on_text_hook(text [B]) → the text tokens
        to use instead (or None to keep them), before the depformer; on_audio_hook(audio
        [B, dep_q]) → audio tokens to use instead (or None).
        """
        lm = getattr(model, "lm", model)
        if not isinstance(lm, LMModel):
            raise TypeError(f"LMGen needs an LMModel (or a model with .lm), got {type(model).__name__}")
        self.lm = lm
        self.audio_sampler = Sampler(temp, top_k, top_p)
        self.text_sampler = Sampler(temp_text, top_k_text, top_p_text)
        self.cfg_coef = cfg_coef
        self.cfg_is_no_text = cfg_is_no_text
        self.cfg_is_masked_until = cfg_is_masked_until
        self.on_text_hook = on_text_hook
        self.on_text_logits_hook = on_text_logits_hook
        self.on_audio_hook = on_audio_hook
        if conditions is not None and not lm.conditioned:
            raise InputError("LMGen: conditions given to an LM without conditioners")
        if conditions is None and lm.conditioned:
            raise InputError("LMGen: this LM is conditioned (a TTS model): pass one Conditions per batch item")
        self.conditions = conditions
        self.condition_sum: mx.array | None = None
        cfg = lm.config
        self.delays = np.array(cfg.delays)
        self.max_delay = int(self.delays.max())
        self.keys = RandomKeys(seed)
        self.batch_size = 0
        self.cache: np.ndarray | None = None
        self.state = None  # the LM's KV caches (TransformerState), made by reset()
        self.transformer_out: mx.array | None = None  # the last step's (normed) temporal output

    @property
    def _cfg(self) -> bool:
        return self.cfg_coef != 1.0

    def reset(self, batch_size: int = 1) -> None:
        """Start a new session: fresh token ring and KV caches."""
        cfg = self.lm.config
        self.batch_size = batch_size
        self.cache = np.full((batch_size, cfg.num_codebooks, self.max_delay + 2), UNGENERATED_TOKEN, np.int64)
        self.offset = 0
        self.initial = np.array(self.lm.initial_tokens(1))[0, :, 0]  # [K]
        cross = cross_mask = None
        if self.conditions is not None:
            if len(self.conditions) != batch_size:
                raise InputError(f"LMGen: {len(self.conditions)} conditions for a batch of {batch_size}")
            batch = list(self.conditions)
            if self._cfg:
                batch += [c.nulled() for c in self.conditions]
            self.condition_sum, cross, cross_mask = self.lm.conditions(batch)
        self.state = self.lm.init_state(cross_source=cross, cross_mask=cross_mask)

    def _check_user_codes(self, user_codes) -> np.ndarray:
        cfg = self.lm.config
        codes = np.asarray(user_codes)
        if codes.ndim == 3 and codes.shape[-1] == 1:
            codes = codes[..., 0]
        n_user = cfg.num_user_codebooks
        if codes.ndim != 2 or codes.shape != (self.batch_size, n_user):
            raise InputError(f"LMGen.step: expected user codes [batch={self.batch_size}, {n_user}] "
                             f"(or [..., 1]), got {list(np.shape(user_codes))}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise InputError(f"LMGen.step: user codes must be integers, got {codes.dtype}")
        if codes.size and (codes.min() < ZERO_TOKEN or codes.max() >= cfg.card):
            raise InputError(f"LMGen.step: user codes must lie in [0, {cfg.card}) (or -1 for none), "
                             f"found [{codes.min()}, {codes.max()}]")
        return codes

    def step(self, user_codes, depformer_replace: np.ndarray | None = None) -> np.ndarray | None:
        """user_codes [B, n_user] (the user's Mimi codes for this frame) → [B, 1 + dep_q]
        tokens of the frame max_delay steps ago, or None while the delays warm up.
        depformer_replace [B, dep_q]: audio tokens to use instead of running the depformer
        (Kyutai's depformer_replace_tokens: the TTS's first, silent steps)."""
        if self.cache is None:
            self.reset(np.shape(user_codes)[0])
        codes = self._check_user_codes(user_codes)
        lm, cfg = self.lm, self.lm.config
        CT, dep_q = self.cache.shape[2], cfg.dep_q
        user_streams = np.arange(dep_q + 1, cfg.num_codebooks)
        write = (self.offset + self.delays[dep_q + 1:]) % CT
        self.cache[:, user_streams, write] = codes
        is_init = self.offset <= self.delays  # [K]
        inputs = self.cache[:, :, self.offset % CT].copy()
        inputs[:, is_init] = self.initial[is_init]
        if self._cfg:
            null = inputs.copy()
            if self.cfg_is_masked_until is not None:
                limit = self.delays[None, :] + np.asarray(self.cfg_is_masked_until)[:, None]
                null = np.where((self.offset <= limit) & ~is_init[None, :], ZERO_TOKEN, null)
            if self.cfg_is_no_text and not is_init[0]:
                null[:, 0] = ZERO_TOKEN
            inputs = np.concatenate([inputs, null], axis=0)
        transformer_out, text_logits = lm.step_text(mx.array(inputs[:, :, None].astype(np.int32)), self.state,
                                                    self.condition_sum)
        self.transformer_out = transformer_out[: self.batch_size]  # [B, 1, dim], for the extra heads
        text_logits = self._guide(text_logits[:, 0], text=True)
        if self.on_text_logits_hook is not None:
            text_logits = self.on_text_logits_hook(text_logits)
        text = self.text_sampler(text_logits, self.keys.next())
        if self.on_text_hook is not None:
            replaced = self.on_text_hook(text)
            text = text if replaced is None else mx.array(np.asarray(replaced, np.int32))
        audio = None
        if dep_q:
            if depformer_replace is None:
                audio = lm.sample_audio(text, transformer_out, self.audio_sampler, self.keys,
                                        self._guide if self._cfg else None)
            else:
                audio = mx.array(np.asarray(depformer_replace, np.int32))
            if self.on_audio_hook is not None:
                replaced = self.on_audio_hook(audio)
                audio = audio if replaced is None else mx.array(np.asarray(replaced, np.int32))
        self.offset += 1
        pos = self.offset % CT
        self.cache[:, 0, pos] = np.array(text)
        if audio is not None:
            self.cache[:, 1:dep_q + 1, pos] = np.array(audio)
        if self.offset <= self.max_delay:
            return None
        index = (self.offset - self.max_delay + self.delays[:dep_q + 1]) % CT
        return self.cache[:, np.arange(dep_q + 1), index].copy()

    def _guide(self, logits: mx.array, text: bool = False) -> mx.array:
        if not self._cfg:
            return logits
        cond, null = logits[: self.batch_size], logits[self.batch_size:]
        if text and self.cfg_is_no_text:
            return cond
        return null + (cond - null) * self.cfg_coef
