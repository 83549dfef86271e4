"""Moshi LM checkpoint layouts → (config kwargs, weights in moshi_mlx naming, what is
quantized). Imports no model: the loader (models/loading.py) builds the model from these.

Layouts, told apart by key names (never by tensor shapes):
- "kyutai": Kyutai's release `model.safetensors` (text_emb, emb.K, transformer.layers.N.
  self_attn.in_proj_weight, norm1.alpha [1, 1, D], gating.linear_in, depformer_in.K,
  TTS: transformer.layers.N.cross_attention.in_proj_weight [3·D, D] (split here into q_proj
  and kv_proj), norm_cross, condition_provider.conditioners.NAME.*,
  depformer.layers.L.self_attn.in_proj_weight with the per-step weights stacked on dim 0,
  depformer.layers.L.gating.K.*, linears.K). moshi's own state_dict() names the attention
  weights in_projs.{i}.weight / out_projs.{i}.weight instead; both are accepted. Kyutai's
  8-bit releases (bitsandbytes LLM.int8: int8 `weight` + per-row `weight_scb`) are
  dequantized on the way.
- "transformers": MoshiForConditionalGeneration (`decoder.model.*`, `decoder.lm_head`,
  `embed_tokens.K`, `depth_decoder.*` with per-codebook weights stacked on dim 0, Mimi under
  `audio_encoder.*`) or MoshiForCausalLM (`model.*`, `lm_head`). q/k rows of the temporal
  transformer are permuted for rotate-half RoPE; the depth decoder has no RoPE.
- "kyutai-mlx": Kyutai's own MLX files (kyutai/moshiko-mlx-q4 …): `text_emb`, `audio_embs.K`,
  `norm1.weight`, `out_norm.weight`, and the depformer as `depformer.slices.I.{emb,
  linear_in, linear_out, transformer.layers.L.*}` (one transformer per step; their norms are
  copies of the shared ones, so slice 0's are used). Quantized with MLX's default predicate:
  4 bits / group 32 in `.q4.` files, 8 / 64 in `.q8.`.
- "moshi_mlx": written by `moshi-mlx convert`: our parameter names as they are; config.json
  has the LM kwargs, `quantization` and the format marker `moshi_mlx_format`.

What is quantized is read from the file: exactly the layers that have `.scales`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..errors import CheckpointError
from .hub import is_local, list_files, resolve_file
from .mimi import MIMI_KYUTAI_NAME, MimiCheckpoint, embedded
from .safetensors import read_safetensors
from .strict import few
from .tensors import unpermute_rotate_half

FORMAT = "moshi_mlx/1"  # the marker `moshi-mlx convert` writes in config.json
LM_KYUTAI_NAME = "model.safetensors"
DEFAULT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
# Fields of a Kyutai-style config.json that name files or describe the file, not the LM.
_FILE_FIELDS = ("moshi_name", "mimi_name", "tokenizer_name", "quantization", "moshi_mlx_format", "dtype",
                "mimi_config", "model_id", "lora_name", "mimi_config_name")


@dataclass(frozen=True)
class LmLayoutParams:
    """What the mappings need to know of the model config: head count (transformers'
    permuted q/k) and which weight set each depformer step uses (None: no per-step weights)."""

    num_heads: int
    dep_weight_sets: tuple[int, ...] | None

    @property
    def num_weight_sets(self) -> int:
        return max(self.dep_weight_sets) + 1 if self.dep_weight_sets else 0

    def weight_set(self, step: int) -> int:
        return self.dep_weight_sets[step] if self.dep_weight_sets else 0


@dataclass
class Quantization:
    bits: int
    group_size: int
    modules: frozenset[str]  # parameter paths of the quantized layers (those with `.scales`)


@dataclass
class LmCheckpoint:
    """An LM checkpoint, read lazily: map its tensors with `weights(params)` once the model
    config (built from `config`) is known."""

    config: dict  # LmConfig kwargs
    raw_config: dict  # the config.json as found ({} for Moshiko/Moshika releases)
    state: dict[str, mx.array]  # the file's tensors, lazy
    layout: str
    source: str  # file name(s), for errors
    home: str | Path  # directory or repo holding the sibling files (Mimi, tokenizer)
    paths: list[Path] = field(default_factory=list)

    def weights(self, params: LmLayoutParams) -> dict[str, mx.array]:
        """The LM's tensors in moshi_mlx naming and layout (quantized layers as weight /
        scales / biases where the file is quantized)."""
        state = {k: v for k, v in self.state.items() if not k.startswith("audio_encoder.")}
        if self.layout == "moshi_mlx":
            return state
        if self.layout == "kyutai-mlx":
            return from_kyutai_mlx(state, params)
        if self.layout == "transformers":
            return from_transformers(state, params)
        return from_kyutai(dequantize_bnb_int8(state), params)

    def quantization(self, weights: dict[str, mx.array]) -> Quantization | None:
        """What the file says is quantized (bits and group from its config or file name;
        the layers from the `.scales` tensors), checked for consistency."""
        modules = frozenset(k[: -len(".scales")] for k in weights if k.endswith(".scales"))
        if self.layout == "moshi_mlx":
            q = self.raw_config.get("quantization")
            bits_group = (q["bits"], q["group_size"]) if q else None
        elif self.layout == "kyutai-mlx":
            bits_group = _kyutai_mlx_bits(self.paths[0])
        else:
            bits_group = None
        if bool(modules) != (bits_group is not None):
            said = f"{bits_group[0]}-bit" if bits_group else "not quantized"
            raise CheckpointError(f"{self.source}: the file name or config says {said}, but "
                                  f"{'some' if modules else 'no'} layers have quantization scales")
        return Quantization(*bits_group, modules) if bits_group else None

    def embedded_mimi(self) -> MimiCheckpoint | None:
        """transformers' Moshi checkpoints carry their Mimi under `audio_encoder.`."""
        if not any(k.startswith("audio_encoder.") for k in self.state):
            return None
        return embedded(self.state, "audio_encoder.", self.raw_config.get("audio_encoder_config"), self.source)


def lm_layout(keys: set[str]) -> str:
    if "decoder.model.embed_tokens.weight" in keys or "model.embed_tokens.weight" in keys:
        return "transformers"
    if "text_emb.weight" in keys and any(k.startswith("transformer.layers.") for k in keys):
        if any(k.startswith("depformer.slices.") or k.startswith("audio_embs.") for k in keys):
            return "kyutai-mlx"
        if any(k.endswith(".self_attn.in_proj.weight") or ".self_attn.in_projs." in k for k in keys) and \
                not any(k.endswith("in_proj_weight") for k in keys) and \
                not any(re.search(r"\.in_projs\.\d+\.weight$", k) and k.startswith("transformer.") for k in keys):
            return "moshi_mlx"
        return "kyutai"
    raise CheckpointError("unknown Moshi LM checkpoint layout: expected Kyutai's release keys (text_emb.weight, "
                          "transformer.layers.N.*, depformer.*) or transformers' (decoder.model.*, depth_decoder.*); "
                          f"found e.g. {few(sorted(keys), 5)}")


def _split_steps(w: mx.array, steps: int, key: str) -> list[mx.array]:
    if w.shape[0] % steps:
        raise CheckpointError(f"{key}: shape {list(w.shape)} does not split into {steps} per-step weights")
    return mx.split(w, steps, axis=0)


def from_kyutai(state: dict[str, mx.array], params: LmLayoutParams) -> dict[str, mx.array]:
    """Kyutai release (or moshi state_dict) naming → moshi_mlx's LMModel parameters."""
    dep_sets = params.num_weight_sets
    out: dict[str, mx.array] = {}
    for k, v in state.items():
        if k.endswith(".alpha"):  # RMSNorm: [1, 1, D] → [D]
            out[k] = v.reshape(-1)
        elif m := re.fullmatch(r"transformer\.layers\.(\d+)\.cross_attention\.(in_proj_weight|in_projs\.0\.weight|"
                               r"out_proj\.weight|out_projs\.0\.weight)", k):
            prefix = f"transformer.layers.{m[1]}.cross_attention"
            if m[2].startswith("in_proj"):  # [3·D, D]: queries, then keys and values of the source
                d = v.shape[0] // 3
                out[f"{prefix}.q_proj.weight"], out[f"{prefix}.kv_proj.weight"] = v[:d], v[d:]
            else:
                out[f"{prefix}.out_proj.weight"] = v
        elif m := re.fullmatch(r"(transformer|depformer)\.layers\.(\d+)\.self_attn\.(in_proj_weight|out_proj\.weight)", k):
            kind = "in_proj" if m[3] == "in_proj_weight" else "out_proj"
            prefix = f"{m[1]}.layers.{m[2]}.self_attn"
            if m[1] == "depformer" and dep_sets:
                for i, part in enumerate(_split_steps(v, dep_sets, k)):
                    out[f"{prefix}.{kind}s.{i}.weight"] = part
            else:
                out[f"{prefix}.{kind}.weight"] = v
        elif m := re.fullmatch(r"(transformer|depformer)\.layers\.(\d+)\.self_attn\.(in_projs|out_projs)\.(\d+)\.weight", k):
            prefix = f"{m[1]}.layers.{m[2]}.self_attn"
            if m[1] == "depformer" and dep_sets:
                out[f"{prefix}.{m[3]}.{m[4]}.weight"] = v
            elif m[4] == "0":
                out[f"{prefix}.{m[3][:-1]}.weight"] = v
            else:
                out[k] = v  # unexpected: reported by assign()
        else:
            out[k] = v
    return out




def config_from_transformers(hf: dict, text_only: bool = False) -> dict:
    """LM kwargs (LmConfig fields) equivalent to a transformers MoshiConfig dict
    (text_only: a MoshiForCausalLM checkpoint, no audio streams)."""
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise CheckpointError("transformers Moshi config with grouped-query attention is not supported")
    dim = hf["hidden_size"]
    # transformers stores the gated FF as fc1 [2·hidden, d]; Kyutai's hidden is 2·dim_ff/3
    dim_ff = hf["ffn_dim"] * 3 // 4
    if dim_ff == 4 * dim:
        raise CheckpointError("transformers Moshi ffn_dim maps to Kyutai's 4·dim special case; unsupported")
    kw = dict(dim=dim, text_card=hf["vocab_size"], num_heads=hf["num_attention_heads"],
              num_layers=hf["num_hidden_layers"], hidden_scale=dim_ff / dim, context=hf.get("sliding_window", 3000),
              max_period=hf.get("rope_theta", 10000.0), gating="silu",
              norm="rms_norm_f32" if hf.get("rms_norm_eps", 1e-8) == 1e-8 else "rms_norm",
              positional_embedding="rope", layer_scale=None)
    K = hf.get("num_codebooks", 8)
    dep = hf.get("depth_decoder_config")
    if dep is None or text_only:
        return {**kw, "n_q": 0, "dep_q": 0, "delays": [0], "depformer_multi_linear": False}
    card = hf.get("audio_vocab_size") or (hf.get("audio_encoder_config") or {}).get("codebook_size", 2048)
    return {**kw, "n_q": 2 * K, "dep_q": K, "card": card, "delays": [0] + ([0] + [1] * (K - 1)) * 2,
            "depformer_dim": dep["hidden_size"], "depformer_num_heads": dep["num_attention_heads"],
            "depformer_num_layers": dep["num_hidden_layers"], "depformer_dim_feedforward": dep["ffn_dim"] * 3 // 4,
            "depformer_multi_linear": True, "depformer_weights_per_step": True, "depformer_pos_emb": "none",
            "depformer_context": K, "depformer_gating": "silu"}




def _kyutai_mlx_bits(path: Path) -> tuple[int, int] | None:
    name = Path(path).name
    if ".q4." in name:
        return 4, 32
    if ".q8." in name:
        return 8, 64
    return None


def from_kyutai_mlx(state: dict[str, mx.array], params: LmLayoutParams) -> dict[str, mx.array]:
    dep_sets = params.num_weight_sets
    out: dict[str, mx.array] = {}
    for k, v in state.items():
        if m := re.fullmatch(r"audio_embs\.(\d+)\.(.+)", k):
            out[f"emb.{m[1]}.{m[2]}"] = v
        elif m := re.fullmatch(r"(transformer\.layers\.\d+\.norm[12]|out_norm)\.weight", k):
            out[f"{m[1]}.alpha"] = v
        elif m := re.fullmatch(r"depformer\.slices\.(\d+)\.(emb|linear_in|linear_out)\.(.+)", k):
            i, part, rest = int(m[1]), m[2], m[3]
            if part == "emb":
                out[(f"depformer_text_emb.{rest}" if i == 0 else f"depformer_emb.{i - 1}.{rest}")] = v
            else:
                out[f"{'depformer_in' if part == 'linear_in' else 'linears'}.{i}.{rest}"] = v
        elif m := re.fullmatch(r"depformer\.slices\.(\d+)\.transformer\.layers\.(\d+)\.(.+)", k):
            i, layer, rest = int(m[1]), m[2], m[3]
            prefix = f"depformer.layers.{layer}"
            if a := re.fullmatch(r"norm([12])\.weight", rest):
                if i == 0:
                    out[f"{prefix}.norm{a[1]}.alpha"] = v
            elif a := re.fullmatch(r"self_attn\.(in_proj|out_proj)\.(.+)", rest):
                if dep_sets:
                    out[f"{prefix}.self_attn.{a[1]}s.{params.weight_set(i)}.{a[2]}"] = v
                elif i == 0:
                    out[f"{prefix}.self_attn.{a[1]}.{a[2]}"] = v
            elif a := re.fullmatch(r"gating\.(.+)", rest):
                if dep_sets:
                    out[f"{prefix}.gating.{params.weight_set(i)}.{a[1]}"] = v
                elif i == 0:
                    out[f"{prefix}.gating.{a[1]}"] = v
            else:
                out[f"{prefix}.{rest}"] = v
        else:
            out[k] = v
    return out


def from_transformers(state: dict[str, mx.array], params: LmLayoutParams) -> dict[str, mx.array]:
    """transformers Moshi naming → moshi_mlx's LMModel parameters (Mimi keys are skipped)."""
    out: dict[str, mx.array] = {}
    qkv: dict[str, dict[str, mx.array]] = {}
    prefix = "decoder.model." if "decoder.model.embed_tokens.weight" in state else "model."
    head = "decoder.lm_head.weight" if prefix == "decoder.model." else "lm_head.weight"
    for k, v in state.items():
        if k.startswith("audio_encoder."):
            continue
        if k == prefix + "embed_tokens.weight":
            out["text_emb.weight"] = v
        elif k == head:
            out["text_linear.weight"] = v
        elif k == prefix + "norm.weight":
            out["out_norm.alpha"] = v
        elif m := re.fullmatch(r"embed_tokens\.(\d+)\.weight", k):
            out[f"emb.{m[1]}.weight"] = v
        elif m := re.fullmatch(re.escape(prefix) + r"layers\.(\d+)\.(.+)", k):
            n, rest = m[1], m[2]
            if a := re.fullmatch(r"self_attn\.([qkv])_proj\.linear\.weight", rest):
                qkv.setdefault(f"transformer.layers.{n}", {})[a[1]] = v
                continue
            name = {"self_attn.o_proj.linear.weight": "self_attn.out_proj.weight",
                    "input_layernorm.weight": "norm1.alpha", "post_attention_layernorm.weight": "norm2.alpha",
                    "mlp.fc1.weight": "gating.linear_in.weight", "mlp.fc2.weight": "gating.linear_out.weight"}.get(rest)
            out[f"transformer.layers.{n}.{name or rest}"] = v
        elif k == "depth_decoder.input_projections.weight":
            for i in range(v.shape[0]):
                out[f"depformer_in.{i}.weight"] = v[i]
        elif k == "depth_decoder.lm_heads.weight":
            for i in range(v.shape[0]):
                out[f"linears.{i}.weight"] = v[i]
        elif k == "depth_decoder.text_embed_tokens.weight":
            out["depformer_text_emb.weight"] = v
        elif m := re.fullmatch(r"depth_decoder\.embed_tokens\.(\d+)\.weight", k):
            out[f"depformer_emb.{m[1]}.weight"] = v
        elif m := re.fullmatch(r"depth_decoder\.layers\.(\d+)\.(.+)", k):
            layer, rest = f"depformer.layers.{m[1]}", m[2]
            if a := re.fullmatch(r"self_attn\.([qkv])_proj\.linear\.weight", rest):
                qkv.setdefault(layer, {})[a[1]] = v
            elif rest == "self_attn.o_proj.linear.weight":
                for i in range(v.shape[0]):
                    out[f"{layer}.self_attn.out_projs.{i}.weight"] = v[i]
            elif rest in ("mlp.fc1.weight", "mlp.fc2.weight"):
                which = "linear_in" if rest == "mlp.fc1.weight" else "linear_out"
                for i in range(v.shape[0]):
                    out[f"{layer}.gating.{i}.{which}.weight"] = v[i]
            elif rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                out[f"{layer}.{'norm1' if rest.startswith('input') else 'norm2'}.alpha"] = v
            else:
                out[k] = v
        else:
            out[k] = v
    for layer, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{layer}: needs q_proj, k_proj and v_proj, found {sorted(parts)}")
        if layer.startswith("transformer."):
            heads = params.num_heads
            out[f"{layer}.self_attn.in_proj.weight"] = mx.concatenate(
                [unpermute_rotate_half(parts["q"], heads), unpermute_rotate_half(parts["k"], heads), parts["v"]], 0)
        else:  # depth decoder: [steps, d, d] each, no RoPE so no permutation
            for i in range(parts["q"].shape[0]):
                out[f"{layer}.self_attn.in_projs.{i}.weight"] = mx.concatenate(
                    [parts["q"][i], parts["k"][i], parts["v"][i]], 0)
    return out




def dequantize_bnb_int8(state: dict[str, mx.array]) -> dict[str, mx.array]:
    """Kyutai's 8-bit releases (bitsandbytes LLM.int8 vector-wise): `X.weight` int8 with its
    per-row absmax `X.weight_scb`; W = weight · scb / 127 (bitsandbytes' dequantization)."""
    out: dict[str, mx.array] = {}
    for k, v in state.items():
        if k.endswith("_scb") and k[: -len("_scb")] in state:
            continue
        scb = state.get(k + "_scb")
        if scb is not None:
            v = v.astype(mx.float32) * (scb.astype(mx.float32)[:, None] / 127.0)
        out[k] = v
    return out


def lora_deltas(adapter: dict[str, mx.array], scaling: float) -> dict[str, mx.array]:
    """Kyutai LoRA adapters (`P.lora_A.weight` [rank, in], `P.lora_B.weight` [out, rank]) →
    weight deltas `P.weight` = scaling · B @ A, in the adapter's (Kyutai) naming."""
    deltas = {}
    for k, a in adapter.items():
        if not k.endswith(".lora_A.weight"):
            continue
        prefix = k[: -len(".lora_A.weight")]
        b = adapter.get(prefix + ".lora_B.weight")
        if b is None:
            raise CheckpointError(f"LoRA adapter: {k} has no matching {prefix}.lora_B.weight")
        deltas[prefix + ".weight"] = scaling * (b.astype(mx.float32) @ a.astype(mx.float32))
    if not deltas:
        raise CheckpointError("LoRA adapter: no lora_A/lora_B weights found")
    return deltas


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def lm_files(source: str | Path, revision: str | None = None) -> tuple[list[Path], dict, str | Path]:
    """(LM weight files, config.json as a dict, where sibling files live) for a file, a
    directory or a repo. A config.json names the weights in `moshi_name` (Kyutai's STT/TTS
    repos, our converted directories); without one it is a Moshiko/Moshika release: the 7B
    defaults and `model.safetensors` (or Kyutai's 8-bit `model.q8.safetensors`)."""
    p = Path(source).expanduser()
    if is_local(source) and p.is_file():
        cfg_path = p.parent / "config.json"
        return [p], (_read_json(cfg_path) if cfg_path.exists() else {}), p.parent
    if is_local(source) and not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    files = list_files(source, revision)
    config = _read_json(resolve_file(source, "config.json", revision)) if "config.json" in files else {}
    name = config.get("moshi_name")
    if name is None:
        names = (LM_KYUTAI_NAME, "model.q8.safetensors", "model.q4.safetensors")
        name = next((n for n in names if n in files), LM_KYUTAI_NAME)
    index = f"{Path(name).stem}.safetensors.index.json"
    if name not in files and index not in files:
        raise CheckpointError(f"{source}: no LM weights {name!r} (files: {few(files)})")
    if index in files:
        names = sorted(set(_read_json(resolve_file(source, index, revision))["weight_map"].values()))
    else:
        names = [name]
    return [resolve_file(source, n, revision) for n in names], config, source


def read(source: str | Path, revision: str | None = None) -> LmCheckpoint:
    """The LM checkpoint at `source`, tensors lazy (nothing is read until evaluated)."""
    paths, raw, home = lm_files(source, revision)
    state = read_safetensors(paths)
    layout = lm_layout(set(state))
    name = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} shards)"
    if layout == "moshi_mlx" and raw.get("moshi_mlx_format", FORMAT) != FORMAT:
        raise CheckpointError(f"{name}: written in format {raw['moshi_mlx_format']!r}, this moshi_mlx reads "
                              f"{FORMAT!r}: upgrade moshi_mlx or convert the original checkpoint again")
    try:
        if layout == "transformers":
            config = config_from_transformers(raw, text_only="model.embed_tokens.weight" in state)
        else:
            config = {k: v for k, v in raw.items() if k not in _FILE_FIELDS}
    except KeyError as e:
        raise CheckpointError(f"{name}: config.json lacks {e}") from None
    config.update(_extra_heads(state, config, name))
    return LmCheckpoint(config, raw, state, layout, name, home, paths)


def _extra_heads(state: dict[str, mx.array], config: dict, name: str) -> dict:
    """Kyutai's `-candle` STT repo ships the semantic-VAD heads (`extra_heads.N.weight`
    [dim, d]) with a config.json that does not declare them: their count and size come
    from the file. A config that declares them must agree with it."""
    heads = sorted(int(m[1]) for k in state if (m := re.fullmatch(r"extra_heads\.(\d+)\.weight", k)))
    if not heads:
        return {}
    if heads != list(range(len(heads))):
        raise CheckpointError(f"{name}: extra heads numbered {heads}, expected 0 … {len(heads) - 1}")
    declared = config.get("extra_heads_num_heads")
    if declared is None:
        return {"extra_heads_num_heads": len(heads), "extra_heads_dim": int(state["extra_heads.0.weight"].shape[0])}
    if declared != len(heads):
        raise CheckpointError(f"{name}: config.json says extra_heads_num_heads {declared}, the file has "
                              f"{len(heads)} extra heads")
    return {}


def companion_files(ckpt: LmCheckpoint, revision: str | None = None) -> dict[str, Path]:
    """The files that travel with an LM (config role → path): its Mimi weights and text
    tokenizer, as named in config.json or by Kyutai's release names."""
    try:
        files = list_files(ckpt.home, revision)
    except CheckpointError:
        files = []
    out = {}
    mimi = ckpt.raw_config.get("mimi_name") or (MIMI_KYUTAI_NAME if MIMI_KYUTAI_NAME in files else None)
    if mimi:
        out["mimi_name"] = resolve_file(ckpt.home, mimi, revision)
    tok = ckpt.raw_config.get("tokenizer_name") or (DEFAULT_TOKENIZER_NAME if DEFAULT_TOKENIZER_NAME in files
                                                    else None)
    if tok:
        out["tokenizer_name"] = resolve_file(ckpt.home, tok, revision)
    return out
