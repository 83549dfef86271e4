"""transformers-style entry points around the Moshi LM, its Mimi codec and text tokenizer.

`MoshiForConditionalGeneration.generate()` follows transformers' semantics (checked token
for token against it): an initial frame (text_card / card) is prepended to the prompt, the
three streams (text, user audio, Moshi audio) must have equal lengths, Moshi's audio is
delayed per the LM's delays, and after the prompt the user stream is Mimi's encoding of
silence. `MoshiForCausalLM` is the text-only model (Helium).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import InputError
from ..modules.sampling import RandomKeys, Sampler
from .lm import LmConfig, LMModel


@dataclass
class MoshiConditionalGenerationOutput:
    sequences: mx.array  # [B, L] text tokens, L = 1 (initial) + prompt + max_new_tokens
    audio_codes: mx.array | None  # [B, dep_q, frames] Moshi's audio codes, undelayed (as transformers)
    audio_sequences: mx.array | None  # [B, 1, (L − 2) · 1920] decoded waveform


def _sampler(do_sample: bool | None, temperature: float | None, top_k: int | None, top_p: float | None,
             default_temp: float, default_k: int) -> Sampler:
    if do_sample is False:
        return Sampler()
    return Sampler(default_temp if temperature is None else temperature, default_k if top_k is None else top_k,
                   top_p or 0.0)


class MoshiForConditionalGeneration:
    """The Moshi LM with the Mimi codec and tokenizer that go with it.

    `lm` is the LMModel (what LMGen drives); `mimi` and the tokenizer are loaded on first
    use from the same checkpoint directory or repo.
    """

    def __init__(self, lm: LMModel, checkpoint=None, mimi=None):
        self.lm = lm
        self.checkpoint = checkpoint  # checkpoints.lm.LmCheckpoint it came from, if any
        self._mimi = mimi

    @property
    def config(self) -> LmConfig:
        return self.lm.config

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, revision: str | None = None,
                        dtype: mx.Dtype | None = None, quantize: int | None = None,
                        group_size: int | None = None) -> "MoshiForConditionalGeneration":
        """A Kyutai-style directory or repo (config.json with the LM kwargs and file names,
        or none: the 7B defaults and release file names), a transformers-layout directory,
        a single weights file, a `moshi-mlx convert` directory, or a repo id.

        quantize=4|8 quantizes while loading (group_size defaults: 32 for 4-bit, 64 for
        8-bit); dtype defaults to the backend's compute dtype (see quantize.compute_dtype).
        """
        from ..checkpoints import lm as lm_ckpt
        from .lm import lm_from_checkpoint

        ckpt = lm_ckpt.read(path_or_repo_id, revision)
        return cls(lm_from_checkpoint(ckpt, dtype, quantize, group_size), ckpt)

    @property
    def mimi(self):
        """The Mimi codec: embedded (transformers layout) or beside the LM (Kyutai layout)."""
        if self._mimi is None:
            from .mimi import MimiModel

            if self.checkpoint is None:
                raise InputError("this model was built in memory: pass its Mimi explicitly")
            self._mimi = MimiModel.for_lm(self.checkpoint)
        return self._mimi

    # -- transformers-style generation -----------------------------------------------------------
    def get_unconditional_inputs(self, num_samples: int = 1) -> dict[str, mx.array]:
        """The initial frame alone: text [[text_card]], audio [B, dep_q, 1] of card."""
        cfg = self.config
        return {
            "input_ids": mx.full((num_samples, 1), cfg.text_card, mx.int32),
            "user_audio_codes": mx.full((num_samples, cfg.num_user_codebooks, 1), cfg.card, mx.int32),
            "moshi_audio_codes": mx.full((num_samples, cfg.dep_q, 1), cfg.card, mx.int32),
        }

    def _codes(self, codes: Any, values: Any, name: str) -> np.ndarray | None:
        if codes is not None and values is not None:
            raise InputError(f"pass either {name}_audio_codes or {name}_input_values, not both")
        if values is not None:
            v = mx.array(values) if not isinstance(values, mx.array) else values
            codes = self.mimi.encode(v, num_quantizers=self.config.dep_q).audio_codes
        if codes is None:
            return None
        codes = np.asarray(codes)
        n = self.config.dep_q
        if codes.ndim != 3 or codes.shape[1] != n:
            raise InputError(f"{name}_audio_codes must be [batch, {n}, frames], got {list(codes.shape)}")
        if codes.min() < 0 or codes.max() > self.config.card:
            raise InputError(f"{name}_audio_codes must lie in [0, {self.config.card}]")
        return codes.astype(np.int64)

    def generate(self, input_ids: Any = None, user_input_values: Any = None, user_audio_codes: Any = None,
                 moshi_input_values: Any = None, moshi_audio_codes: Any = None, max_new_tokens: int = 20,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, depth_decoder_do_sample: bool | None = None,
                 depth_decoder_temperature: float | None = None, depth_decoder_top_k: int | None = None,
                 depth_decoder_top_p: float | None = None, return_audio_waveforms: bool = True,
                 return_audio_codes: bool | None = None, concat_unconditional_inputs: bool = True,
                 seed: int | None = None) -> MoshiConditionalGenerationOutput:
        """Generate text and Moshi's audio after an optional prompt of the three streams.

        Greedy with do_sample=False / depth_decoder_do_sample=False; otherwise Kyutai's
        defaults (text: temperature 0.7, top-k 25; audio: 0.8, top-k 250) unless given.
        """
        cfg, lm = self.config, self.lm
        if cfg.dep_q == 0:
            raise InputError("this checkpoint has no depformer: use MoshiForCausalLM.generate")
        user = self._codes(user_audio_codes, user_input_values, "user")
        moshi = self._codes(moshi_audio_codes, moshi_input_values, "moshi")
        text = None if input_ids is None else np.asarray(input_ids).astype(np.int64)
        given = [x is not None for x in (text, user, moshi)]
        if any(given) and not all(given):
            raise InputError("input_ids, user audio and moshi audio must be given together (or none of them)")
        if not any(given):  # the prompt is the initial frame alone
            unc = self.get_unconditional_inputs(1)
            text, user, moshi = (np.asarray(unc[k]).astype(np.int64)
                                 for k in ("input_ids", "user_audio_codes", "moshi_audio_codes"))
            concat_unconditional_inputs = True
            text, user, moshi = text[:, :0], user[:, :, :0], moshi[:, :, :0]
        if text.ndim != 2:
            raise InputError(f"input_ids must be [batch, steps], got {list(text.shape)}")
        if not (text.shape[1] == user.shape[2] == moshi.shape[2]) or not (text.shape[0] == user.shape[0] == moshi.shape[0]):
            raise InputError("the three streams must be time-aligned: input_ids "
                             f"{list(text.shape)}, user audio {list(user.shape)}, moshi audio {list(moshi.shape)}")
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        B = text.shape[0]
        # transformers returns Moshi's audio without the initial frame (its codes are `card`,
        # not Mimi codes): the leading frames of the prompt that are all `card` are dropped.
        if concat_unconditional_inputs:
            text = np.concatenate([np.full((B, 1), cfg.text_card), text], 1)
            user = np.concatenate([np.full((B, cfg.dep_q, 1), cfg.card), user], 2)
            moshi = np.concatenate([np.full((B, cfg.dep_q, 1), cfg.card), moshi], 2)
        T = text.shape[1]  # prompt length, initial frame included
        L = T + max_new_tokens
        delays = np.array(cfg.delays)
        d_moshi, d_user = delays[1:cfg.dep_q + 1], delays[cfg.dep_q + 1:]
        # Delayed layouts [B, K, L]: stream k at position p holds frame p − delay_k; the first
        # delay_k positions hold the initial token; −2 marks what is still to be generated.
        seq = np.full((B, cfg.num_codebooks, L), -2, np.int64)
        seq[:, 0, :T] = text
        blank = np.array(self.mimi.encode(np.zeros((1, 1, self.mimi.frame_size), np.float32),
                                          num_quantizers=cfg.num_user_codebooks).audio_codes)[0, :, 0]
        for k in range(cfg.dep_q):
            seq[:, 1 + k, :d_moshi[k]] = cfg.card
            seq[:, 1 + k, d_moshi[k]:d_moshi[k] + T] = moshi[:, k, : L - d_moshi[k]]
            u = 1 + cfg.dep_q + k
            seq[:, u, :d_user[k]] = cfg.card
            seq[:, u, d_user[k]:d_user[k] + T] = user[:, k, : L - d_user[k]]
            seq[:, u, d_user[k] + T:] = blank[k]
        text_sampler = _sampler(do_sample, temperature, top_k, top_p, 0.7, 25)
        audio_sampler = _sampler(depth_decoder_do_sample, depth_decoder_temperature, depth_decoder_top_k,
                                 depth_decoder_top_p, 0.8, 250)
        keys = RandomKeys(seed)
        state = lm.init_state()
        for p in range(L - 1):
            h, logits = lm.step_text(mx.array(seq[:, :, p:p + 1].astype(np.int32)), state)
            if p + 1 < T:
                continue  # still inside the prompt: teacher forcing
            if seq[0, 0, p + 1] == -2:
                seq[:, 0, p + 1] = np.array(text_sampler(logits[:, 0], keys.next()))
            # The depformer samples all of Moshi's codes for position p + 1 from its own
            # samples; they are kept where the prompt left the position open.
            audio = np.array(lm.sample_audio(mx.array(seq[:, 0, p + 1].astype(np.int32)), h, audio_sampler, keys))
            for cb in range(cfg.dep_q):
                open_ = seq[:, 1 + cb, p + 1] == -2
                seq[open_, 1 + cb, p + 1] = audio[open_, cb]
        sequences = mx.array(seq[:, 0].astype(np.int32))
        # undelay: frame j of codebook k sits at position j + delay_k; leading initial frames
        # (all codes = card) are not Moshi's audio and are left out, as transformers does.
        start = 0
        while start < T and (moshi[:, :, start] == cfg.card).all():
            start += 1
        frames = L - start - int(d_moshi.max())
        audio = np.stack([seq[:, 1 + k, start + d_moshi[k]: start + d_moshi[k] + frames] for k in range(cfg.dep_q)], 1)
        audio_codes = mx.array(audio.astype(np.int32))
        waveforms = self.mimi.decode(audio_codes).audio_values if return_audio_waveforms else None
        if return_audio_codes is False:
            audio_codes = None
        return MoshiConditionalGenerationOutput(sequences, audio_codes, waveforms)


class MoshiForCausalLM:
    """The text-only Moshi LM (Helium): the temporal transformer and text head."""

    def __init__(self, lm: LMModel):
        self.lm = lm

    @property
    def config(self) -> LmConfig:
        return self.lm.config

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, **kwargs) -> "MoshiForCausalLM":
        """A transformers MoshiForCausalLM directory, or any Moshi checkpoint (its audio
        parts are then unused)."""
        return cls(MoshiForConditionalGeneration.from_pretrained(path_or_repo_id, **kwargs).lm)

    def generate(self, input_ids: Any, max_new_tokens: int = 20, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> mx.array:
        """input_ids [B, T] → [B, T + max_new_tokens]. Audio streams are absent (−1)."""
        ids = np.asarray(input_ids).astype(np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be [batch, steps] with steps ≥ 1, got {list(ids.shape)}")
        if ids.min() < 0 or ids.max() > self.config.text_card:
            raise InputError(f"input_ids must lie in [0, {self.config.text_card}]")
        sampler = _sampler(do_sample, temperature, top_k, top_p, 0.7, 25)
        keys = RandomKeys(seed)
        cfg, lm = self.config, self.lm
        B, T = ids.shape
        out = np.concatenate([ids, np.zeros((B, max_new_tokens), np.int64)], 1)
        state = lm.init_state()
        for p in range(T + max_new_tokens - 1):
            tokens = np.full((B, cfg.num_codebooks, 1), -1, np.int64)
            tokens[:, 0, 0] = out[:, p]
            _, logits = lm.step_text(mx.array(tokens.astype(np.int32)), state)
            if p + 1 >= T:
                out[:, p + 1] = np.array(sampler(logits[:, 0], keys.next()))
        return mx.array(out.astype(np.int32))
