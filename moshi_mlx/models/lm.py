"""The Moshi LM: a temporal transformer over time steps and a small "depformer" over the
audio codebooks of each step (Kyutai's `moshi.models.lm.LMModel`, 0.2.13).

Token layout per time step (K = 1 + n_q streams): stream 0 is text, streams 1 … dep_q are
Moshi's audio codebooks, the rest the user's. A token of −1 contributes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoints import lm as lm_ckpt
from ..config import ConfigMixin
from ..cpu import host as cpu_host
from ..errors import CheckpointError
from ..modules.conditioners import ConditionProvider, Conditions
from ..modules.embedding import ScaledEmbedding, embed
from ..modules.sampling import RandomKeys, Sampler
from ..modules.transformer import Transformer, TransformerConfig, TransformerState, make_norm
from ..quantize import QuantizationSpec, cast_floating, compute_dtype, eval_by_layer, quantize_model, scales_dtype
from .base import assign

ZERO_TOKEN = -1  # input token that contributes a zero embedding
UNGENERATED_TOKEN = -2  # placeholder in LMGen's delay buffer


@dataclass
class LmConfig(ConfigMixin):
    """Kyutai's LM kwargs (the fields of their `config.json` files); defaults = Moshi 7B
    (`moshi_7b_202409`), which Moshiko/Moshika releases imply by shipping no config.json."""

    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    n_q: int = 16
    dep_q: int = 8
    card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    causal: bool = True
    layer_scale: float | None = None
    context: int | None = 3000
    max_period: float = 10_000.0
    gating: str = "silu"
    norm: str = "rms_norm_f32"
    positional_embedding: str = "rope"
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int | None = 4224
    depformer_layer_scale: float | None = None
    depformer_multi_linear: bool = True
    depformer_context: int | None = 8
    depformer_max_period: float = 10_000.0
    depformer_gating: str = "silu"
    depformer_pos_emb: str = "none"
    depformer_weights_per_step: bool = True
    depformer_weights_per_step_schedule: list[int] | None = None
    delays: list[int] = field(default_factory=lambda: [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1])
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    # TTS models (kyutai/tts-1.6b-en_fr): two text streams muxed in one token, low-rank
    # depformer embeddings, cross-attention to the conditioners' "cross" source.
    demux_second_stream: bool = False
    depformer_low_rank_embeddings: int | None = None
    cross_attention: bool = False
    conditioners: dict | None = None
    fuser: dict | None = None
    # Application fields (Kyutai's STT/TTS repos and our converted directories), kept for the apps.
    moshi_name: str | None = None
    mimi_name: str | None = None
    tokenizer_name: str | None = None
    model_type: str | None = None
    stt_config: dict | None = None
    tts_config: dict | None = None
    lm_gen_config: dict | None = None

    def __post_init__(self) -> None:
        problems = []
        if len(self.delays) != self.n_q + 1:
            problems.append(f"delays has {len(self.delays)} entries, expected n_q + 1 = {self.n_q + 1}")
        if self.dep_q > self.n_q:
            problems.append(f"dep_q {self.dep_q} > n_q {self.n_q}")
        if self.depformer_weights_per_step_schedule is not None and \
                len(self.depformer_weights_per_step_schedule) != self.dep_q:
            problems.append("depformer_weights_per_step_schedule must have dep_q entries")
        if self.dim % self.num_heads or self.depformer_dim % self.depformer_num_heads:
            problems.append("dims must be divisible by the head counts")
        if problems:
            raise ValueError("invalid LmConfig: " + "; ".join(problems))

    # Keys of Kyutai configs that only matter for training or for modules we do not have.
    _IGNORED = {"quantization", "text_card_out", "norm_emb", "bias_proj", "depformer_norm",
                "gradient_checkpointing"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LmConfig":
        unsupported = [k for k in ("norm_emb", "depformer_norm", "text_card_out", "bias_proj")
                       if d.get(k) not in (None, False, d.get("text_card") if k == "text_card_out" else None)]
        if bool(d.get("cross_attention")) and not (d.get("fuser") or {}).get("cross"):
            unsupported.append("cross_attention without a fuser 'cross' condition")
        if unsupported:
            raise ValueError(f"LM config uses features moshi_mlx does not support yet: {unsupported}")
        return super().from_dict(d)


    @property
    def num_codebooks(self) -> int:
        """Streams per step: text + n_q audio."""
        return self.n_q + 1

    @property
    def num_user_codebooks(self) -> int:
        return self.n_q - self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    def temporal(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
            dim_feedforward=int(self.hidden_scale * self.dim), context=self.context, causal=self.causal,
            max_period=self.max_period, positional_embedding=self.positional_embedding, norm=self.norm,
            gating=self.gating, layer_scale=self.layer_scale, cross_attention=self.cross_attention)

    def depformer(self) -> TransformerConfig:
        ff = self.depformer_dim_feedforward
        if ff is None:
            ff = int(self.hidden_scale * self.depformer_dim)
        return TransformerConfig(
            d_model=self.depformer_dim, num_heads=self.depformer_num_heads,
            num_layers=self.depformer_num_layers, dim_feedforward=ff,
            context=None,  # Kyutai forces this: the depformer attends to all steps of its frame
            causal=self.causal, max_period=self.depformer_max_period,
            positional_embedding=self.depformer_pos_emb, norm=self.norm, gating=self.depformer_gating,
            layer_scale=self.depformer_layer_scale,
            weights_per_step=self.dep_q if self.depformer_weights_per_step else 0,
            weights_per_step_schedule=self.depformer_weights_per_step_schedule)


def _embedding(num: int, dim: int, low_rank: int | None = None, demux: bool = False) -> nn.Module:
    """A plain table (quantizable) unless Kyutai's low-rank / demux options are on."""
    if low_rank or demux:
        return ScaledEmbedding(num, dim, low_rank, demux)
    return nn.Embedding(num, dim)


class LMModel(nn.Module):
    """Weights only; a stream's KV caches live in the `TransformerState` from `init_state()`
    (held by the generation session). Parameter names mirror Kyutai's release keys (see
    checkpoints/lm.py for the few renames)."""

    def __init__(self, config: LmConfig | None = None):
        super().__init__()
        cfg = config or LmConfig()
        self.config = cfg
        self.text_emb = _embedding(cfg.text_card + 1, cfg.dim, demux=cfg.demux_second_stream)
        self.emb = [nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)]
        self.transformer = Transformer(cfg.temporal())
        self.out_norm = make_norm(cfg.norm, cfg.dim)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        num_in = 1 if cfg.dep_q else 0  # dep_q 0: a text-only model (Helium, ASR)
        if cfg.depformer_multi_linear and cfg.dep_q:
            num_in = cfg.dep_q
            if cfg.depformer_weights_per_step_schedule:
                num_in = max(cfg.depformer_weights_per_step_schedule) + 1
        self.depformer_in = [nn.Linear(cfg.dim, cfg.depformer_dim, bias=False) for _ in range(num_in)]
        if cfg.dep_q > 0:
            low_rank = cfg.depformer_low_rank_embeddings
            self.depformer_emb = [_embedding(cfg.card + 1, cfg.depformer_dim, low_rank) for _ in range(cfg.dep_q - 1)]
            self.depformer_text_emb = _embedding(cfg.text_card + 1, cfg.depformer_dim, low_rank,
                                                 cfg.demux_second_stream)
            self.depformer = Transformer(cfg.depformer())
        self.linears = [nn.Linear(cfg.depformer_dim, cfg.card, bias=False) for _ in range(cfg.dep_q)]
        self.extra_heads = [nn.Linear(cfg.dim, cfg.extra_heads_dim, bias=False)
                            for _ in range(cfg.extra_heads_num_heads)]
        if cfg.conditioners:
            self.condition_provider = ConditionProvider(cfg.conditioners, cfg.fuser or {}, cfg.dim)

    # -- temporal transformer ---------------------------------------------------------------
    def _embed_step_tokens(self, tokens: mx.array, condition_sum: mx.array | None = None) -> mx.array:
        """tokens [B, K, T] (K = 1 + n_q) → summed embeddings [B, T, dim], plus the "sum"
        conditions [B, 1, dim] of a conditioned model."""
        dtype = compute_dtype()  # once per step, not per table
        if tokens.shape[-1] == 1 and dtype == mx.float32 and cpu_host.applies(self.transformer):
            # the step runs on the host: its input is needed there, not in an MLX graph
            return self._embed_one_step_on_host(tokens, condition_sum)
        x = embed(self.text_emb, tokens[:, 0], dtype)
        for k, table in enumerate(self.emb):
            x = x + embed(table, tokens[:, k + 1], dtype)
        if condition_sum is not None:
            x = x + condition_sum.astype(dtype)
        return x

    def _embed_one_step_on_host(self, tokens: mx.array, condition_sum: mx.array | None) -> mx.array:
        """_embed_step_tokens for one position whose transformer step runs on the host: the same
        float32 sums, in the same order, of rows read there (cpu/host.embedding_rows; MLX for
        other tables). Where the step runs in MLX, its lookups stay in the step's graph."""
        tables = [self.text_emb, *self.emb]
        x = None
        for k, (table, rows) in enumerate(zip(tables, cpu_host.embedding_rows(tables, np.array(tokens)[:, :, 0]))):
            if rows is None:
                rows = np.array(embed(table, tokens[:, k], mx.float32))[:, 0]
            x = rows if x is None else x + rows
        if condition_sum is not None:
            x = x + np.array(condition_sum.astype(mx.float32)).reshape(x.shape)
        return mx.array(x[:, None])

    @property
    def conditioned(self) -> bool:
        return "condition_provider" in self

    def conditions(self, batch: list[Conditions]) -> tuple[mx.array | None, mx.array | None, mx.array | None]:
        """Each batch item's conditions → (sum [B, 1, dim], cross-attention source [B, S, dim],
        its mask [B, S] or None)."""
        if not self.conditioned:
            raise ValueError("this LM has no conditioners")
        total, cross, mask = self.condition_provider.provide(batch)
        dtype = compute_dtype()
        return (None if total is None else total.astype(dtype)), (None if cross is None else cross.astype(dtype)), mask

    def _text_head(self, h: mx.array) -> tuple[mx.array, mx.array]:
        out = self.out_norm(h)
        return out, self.text_linear(out)

    def forward_text(self, tokens: mx.array, condition_sum: mx.array | None = None,
                     cross_source: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """Batch: input tokens [B, K, T] (already delayed) → (transformer_out [B, T, dim],
        text logits [B, T, text_card])."""
        x = self._embed_step_tokens(tokens, condition_sum)
        return self._text_head(self.transformer(x, cross_source))

    def init_state(self, kv_bits: int | str | None = "auto", cross_source: mx.array | None = None,
                   cross_mask: mx.array | None = None) -> TransformerState:
        """A fresh stream for the temporal transformer (its rotating KV caches; mlx-lm's
        `make_cache()`). kv_bits: see Transformer.init_state. cross_source: the conditions'
        cross-attention source of a conditioned model (its keys/values are computed once),
        cross_mask [B, S] which source positions each item attends to."""
        return self.transformer.init_state(kv_bits=kv_bits, cross_source=cross_source, cross_mask=cross_mask)

    def step_text(self, tokens: mx.array, state: TransformerState,
                  condition_sum: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """Streaming: one step's tokens [B, K, 1] after `state` → ([B, 1, dim], [B, 1,
        text_card]); `state` is updated in place."""
        return self._text_head(self.transformer.step(self._embed_step_tokens(tokens, condition_sum), state)[0])

    # -- depformer -------------------------------------------------------------------------------
    def _depformer_input(self, cb: int, prev_tokens: mx.array, transformer_out: mx.array,
                         projected: dict[int, mx.array] | None = None) -> mx.array:
        """Input of depformer step `cb`: its projection of the temporal output plus the
        embedding of the previous token (the text token at step 0). `projected` keeps the
        projections of one frame: steps that share a weight set (the TTS's schedule: 11 sets
        for 32 steps) compute theirs once."""
        cfg = self.config
        idx = 0
        if cfg.depformer_multi_linear:
            idx = cfg.depformer_weights_per_step_schedule[cb] if cfg.depformer_weights_per_step_schedule else cb
        if projected is None:
            x = self.depformer_in[idx](transformer_out)
        else:
            if idx not in projected:
                projected[idx] = self.depformer_in[idx](transformer_out)
            x = projected[idx]
        table = self.depformer_text_emb if cb == 0 else self.depformer_emb[cb - 1]
        return x + embed(table, prev_tokens)

    def forward_depformer(self, tokens: mx.array, transformer_out: mx.array) -> mx.array:
        """Teacher-forced depformer over all steps: tokens [B, K, T] are the *targets* of
        each step (text, then Moshi's audio); returns audio logits [B, dep_q, T, card]."""
        B, _, T = tokens.shape
        dep_q = self.config.dep_q
        inputs = [self._depformer_input(cb, tokens[:, cb], transformer_out) for cb in range(dep_q)]
        x = mx.stack(inputs, axis=2).reshape(B * T, dep_q, -1)  # each time step is a sequence
        y = self.depformer(x).reshape(B, T, dep_q, -1)
        return mx.stack([self.linears[cb](y[:, :, cb]) for cb in range(dep_q)], axis=1)

    def depformer_step(self, cb: int, prev_token: mx.array, transformer_out: mx.array,
                       state: TransformerState, projected: dict[int, mx.array] | None = None) -> mx.array:
        """Streaming depformer step `cb` of a frame (`state` from init_depformer_state):
        prev_token [B] (text token at cb 0), transformer_out [B, 1, dim] → logits [B, card].
        `projected`: one dict per frame, see _depformer_input."""
        x = self._depformer_input(cb, prev_token[:, None], transformer_out, projected)
        return self.linears[cb](self.depformer.step(x, state)[0])[:, 0]

    def init_depformer_state(self) -> TransformerState:
        """Fresh depformer state for one frame: its KV cache only ever holds that frame's steps."""
        return self.depformer.init_state(capacity=self.config.dep_q)

    def sample_audio(self, text: mx.array, transformer_out: mx.array, sampler: Sampler, keys: RandomKeys,
                     guide: Callable[[mx.array], mx.array] | None = None) -> mx.array:
        """The depformer loop of one frame: text [B] (this step's text token) and the
        temporal output [B', 1, dim] → audio tokens [B, dep_q], each codebook sampled from
        the depformer's logits given the previous one. With classifier-free guidance the
        temporal output holds the conditioned and the null halves (B' = 2B): each step's
        token is fed to both and `guide` mixes the halves' logits."""
        state = self.init_depformer_state()
        prev, tokens, projected = text, [], {}
        for cb in range(self.config.dep_q):
            inp = mx.concatenate([prev, prev]) if guide is not None else prev
            logits = self.depformer_step(cb, inp, transformer_out, state, projected)
            prev = sampler(guide(logits) if guide is not None else logits, keys.next())
            tokens.append(prev)
        return mx.stack(tokens, axis=1)

    def extra_head_probs(self, transformer_out: mx.array) -> mx.array:
        """The extra heads (STT's semantic VAD) on a step's normed temporal output [B, 1, dim]
        → softmax probabilities [B, heads, classes] (Kyutai's LMGen.step_with_extra_heads)."""
        return mx.stack([mx.softmax(head(transformer_out[:, 0]).astype(mx.float32), axis=-1)
                         for head in self.extra_heads], axis=1)

    def initial_tokens(self, batch: int) -> mx.array:
        """[B, K, 1]: text_card for text (the start token), card for every audio stream."""
        cfg = self.config
        tok = [cfg.text_card] + [cfg.card] * cfg.n_q
        return mx.broadcast_to(mx.array(tok, mx.int32)[None, :, None], (batch, cfg.num_codebooks, 1))


# -- loading ----------------------------------------------------------------------------------

def layout_params(cfg: LmConfig) -> lm_ckpt.LmLayoutParams:
    """What the checkpoint mappings need to know of this config."""
    dep = cfg.depformer()
    sets = tuple(dep.weight_set(i) for i in range(cfg.dep_q)) if cfg.depformer_weights_per_step and cfg.dep_q else None
    return lm_ckpt.LmLayoutParams(cfg.num_heads, sets)


def lm_config(ckpt: lm_ckpt.LmCheckpoint) -> LmConfig:
    """The LM config a checkpoint describes, or a one-line error naming the file."""
    try:
        return LmConfig.from_dict(ckpt.config)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt.source}: bad LM config: {e}") from None


def lm_from_checkpoint(ckpt: lm_ckpt.LmCheckpoint, dtype: mx.Dtype | None = None, quantize: int | None = None,
                       group_size: int | None = None, evaluate: bool = True,
                       extra: dict[str, mx.array] | None = None) -> LMModel:
    """Build the LM: strict assignment, then quantization (the file's, or `quantize` bits
    for a full-precision file), then the compute dtype; evaluated layer by layer, so a 7B
    model is never materialized at full precision. evaluate=False keeps it lazy (convert).
    `extra`: deltas added to named weights before quantizing (LoRA)."""
    cfg = lm_config(ckpt)
    model = LMModel(cfg)
    weights = ckpt.weights(layout_params(cfg))
    file_q = ckpt.quantization(weights)
    if file_q is not None:
        if quantize and (quantize, group_size or file_q.group_size) != (file_q.bits, file_q.group_size):
            raise CheckpointError(f"{ckpt.source} is already quantized to {file_q.bits} bits (group "
                                  f"{file_q.group_size}); convert the original to change the quantization")
        quantize_model(model, QuantizationSpec.make(file_q.bits, file_q.group_size), modules=file_q.modules)
        sd = scales_dtype(file_q.bits)
        weights = {k: v.astype(sd) if k.endswith((".scales", ".biases")) else v for k, v in weights.items()}
    for name, delta in (extra or {}).items():
        if name not in weights:
            raise CheckpointError(f"{name} has no base weight in {ckpt.source}")
        if tuple(weights[name].shape) != tuple(delta.shape):
            raise CheckpointError(f"{name}: delta shape {list(delta.shape)} != base shape {list(weights[name].shape)}")
        weights[name] = weights[name].astype(mx.float32) + delta
    assign(model, weights, ckpt.source, evaluate=False)
    if quantize and file_q is None:
        spec = QuantizationSpec.make(quantize, group_size)
        cast_floating(model, mx.float32)  # quantize from float32, whatever the file's dtype (lazy)
        quantize_model(model, spec)
    cast_floating(model, dtype or compute_dtype())
    if evaluate:
        eval_by_layer(model)
    return model
