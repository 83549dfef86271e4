"""Mimi checkpoint layouts → (config dict, weights in moshi_mlx naming). Imports no model.

Layouts, told apart by key names (never by tensor shapes):
- "kyutai": Kyutai's release file (`tokenizer-e351c8d8-checkpoint125.safetensors`):
  `encoder.model.0.conv.conv.weight`, `...transformer.layers.N.self_attn.in_proj_weight`,
  `quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum`, … (torch conv layouts).
- "transformers": `model.safetensors` + `config.json` from transformers' MimiModel:
  `encoder.layers.0.conv.weight`, separate q/k/v projections with q/k rows permuted for
  rotate-half RoPE, `quantizer.acoustic_residual_vector_quantizer.layers.N.codebook.embed_sum`.
  Also embedded in transformers' Moshi checkpoints under `audio_encoder.`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import CheckpointError
from .hub import is_local, list_files, resolve_file
from .safetensors import read_safetensors
from .strict import few
from .tensors import codebook, conv_weight, convtr_weight, unpermute_rotate_half

MIMI_KYUTAI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"


@dataclass
class MimiCheckpoint:
    config: dict  # MimiConfig fields (transformers' names); {} = Kyutai's release defaults
    weights: dict[str, mx.array]  # moshi_mlx parameter names and layouts (lazy)
    source: str  # what to name in errors
    layout: str


_TRANSFORMER_RENAMES = {  # transformers → ours, inside `*_transformer.layers.N.`
    "self_attn.o_proj.weight": "self_attn.out_proj.weight",
    "mlp.fc1.weight": "linear1.weight",
    "mlp.fc2.weight": "linear2.weight",
    "input_layernorm.weight": "norm1.weight",
    "input_layernorm.bias": "norm1.bias",
    "post_attention_layernorm.weight": "norm2.weight",
    "post_attention_layernorm.bias": "norm2.bias",
    "self_attn_layer_scale.scale": "layer_scale_1.scale",
    "mlp_layer_scale.scale": "layer_scale_2.scale",
}


def mimi_layout(keys: set[str]) -> str:
    if any(k.startswith("encoder.model.") for k in keys) and any(k.startswith("quantizer.rvq_first.") for k in keys):
        return "kyutai"
    if any(k.startswith("encoder.layers.") for k in keys) and any(
            k.startswith("quantizer.semantic_residual_vector_quantizer.") for k in keys):
        return "transformers"
    raise CheckpointError(
        "unknown Mimi checkpoint layout: expected Kyutai's release keys (encoder.model.*, "
        "quantizer.rvq_first.*) or transformers' (encoder.layers.*, quantizer.semantic_residual_"
        f"vector_quantizer.*); found e.g. {few(sorted(keys), 5)}")


def _stack_codebooks(state: dict[str, mx.array], pattern: str, used: set[str], out: dict, prefix: str,
                     sum_name: str, usage_name: str) -> None:
    """Collect `pattern`-matching codebook layers into out[prefix + '.codebooks'] [n, bins, dim]."""
    rx = re.compile(pattern)
    layers: dict[int, dict[str, mx.array]] = {}
    for k, v in state.items():
        m = rx.fullmatch(k)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
            used.add(k)
    if not layers:
        return
    cbs = []
    for i in range(max(layers) + 1):
        layer = layers.get(i, {})
        if sum_name not in layer or usage_name not in layer:
            raise CheckpointError(f"codebook {i} of {prefix}: missing {sum_name} or {usage_name}")
        cbs.append(codebook(layer[sum_name], layer[usage_name]))
    out[f"{prefix}.codebooks"] = mx.stack(cbs)


def from_kyutai(state: dict[str, mx.array]) -> tuple[dict, dict[str, mx.array]]:
    """Kyutai's release naming → (config, weights). The config only says how many
    codebooks the file has; everything else is the release's."""
    out: dict[str, mx.array] = {}
    used: set[str] = set()
    for q in ("rvq_first", "rvq_rest"):
        _stack_codebooks(state, rf"quantizer\.{q}\.vq\.layers\.(\d+)\._codebook\.(\w+)", used, out,
                         f"quantizer.{q}", "embedding_sum", "cluster_usage")
    for k, v in state.items():
        if k in used:
            continue
        if m := re.fullmatch(r"(encoder|decoder)\.model\.(\d+)\.((?:block\.\d+\.)?)conv\.conv\.(weight|bias)", k):
            out[f"{m[1]}.layers.{m[2]}.{m[3]}{m[4]}"] = conv_weight(v) if m[4] == "weight" else v
        elif m := re.fullmatch(r"decoder\.model\.(\d+)\.convtr\.convtr\.(weight|bias)", k):
            out[f"decoder.layers.{m[1]}.{m[2]}"] = convtr_weight(v) if m[2] == "weight" else v
        elif m := re.fullmatch(r"(encoder|decoder)_transformer\.transformer\.layers\.(\d+)\.(.+)", k):
            rest = {"self_attn.in_proj_weight": "self_attn.in_proj.weight",
                    "self_attn.in_projs.0.weight": "self_attn.in_proj.weight",
                    "self_attn.out_projs.0.weight": "self_attn.out_proj.weight"}.get(m[3], m[3])
            out[f"{m[1]}_transformer.layers.{m[2]}.{rest}"] = v
        elif k == "downsample.conv.conv.conv.weight":
            out["downsample.weight"] = conv_weight(v)
        elif k == "upsample.convtr.convtr.convtr.weight":
            out["upsample.weight"] = convtr_weight(v)
        elif m := re.fullmatch(r"quantizer\.(rvq_first|rvq_rest)\.(input_proj|output_proj)\.weight", k):
            out[f"quantizer.{m[1]}.{m[2]}.weight"] = v[..., 0] if v.ndim == 3 else v
        else:
            out[k] = v  # reported as unexpected by the strict check
    n_first = out["quantizer.rvq_first.codebooks"].shape[0] if "quantizer.rvq_first.codebooks" in out else 0
    n_rest = out["quantizer.rvq_rest.codebooks"].shape[0] if "quantizer.rvq_rest.codebooks" in out else 0
    return {"num_quantizers": n_first + n_rest, "num_semantic_quantizers": n_first}, out


def _is_transposed_decoder_conv(index: int, keys: set[str]) -> bool:
    """transformers names SEANet's plain and transposed convolutions alike
    (`decoder.layers.N.conv.weight`). In the decoder each transposed convolution is the
    layer right before a residual block (layers [conv, (ELU, convtr, resblock…)×4, ELU,
    conv]): told apart by the names of the next layer, as the release's `convtr` names do."""
    return any(k.startswith(f"decoder.layers.{index + 1}.block.") for k in keys)


def from_transformers(state: dict[str, mx.array], hf_config: dict | None) -> tuple[dict, dict[str, mx.array]]:
    """transformers' naming (+ its config.json) → (config, weights)."""
    config = dict(hf_config or {})
    num_heads = config.get("num_attention_heads", 8)
    out: dict[str, mx.array] = {}
    used: set[str] = set()
    for src, q in (("semantic", "rvq_first"), ("acoustic", "rvq_rest")):
        _stack_codebooks(state, rf"quantizer\.{src}_residual_vector_quantizer\.layers\.(\d+)\.codebook\.(\w+)",
                         used, out, f"quantizer.{q}", "embed_sum", "cluster_usage")
    keys = set(state)
    qkv: dict[str, dict[str, mx.array]] = {}
    for k, v in state.items():
        if k in used:
            continue
        if m := re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.((?:block\.\d+\.)?)conv\.(weight|bias)", k):
            if m[4] == "weight":
                transposed = m[1] == "decoder" and not m[3] and _is_transposed_decoder_conv(int(m[2]), keys)
                v = convtr_weight(v) if transposed else conv_weight(v)
            out[f"{m[1]}.layers.{m[2]}.{m[3]}{m[4]}"] = v
        elif m := re.fullmatch(r"(encoder|decoder)_transformer\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", k):
            qkv.setdefault(f"{m[1]}_transformer.layers.{m[2]}", {})[m[3]] = v
        elif m := re.fullmatch(r"(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)", k):
            out[f"{m[1]}_transformer.layers.{m[2]}.{_TRANSFORMER_RENAMES.get(m[3], m[3])}"] = v
        elif k == "downsample.conv.weight":
            out["downsample.weight"] = conv_weight(v)
        elif k == "upsample.conv.weight":
            out["upsample.weight"] = convtr_weight(v)
        elif m := re.fullmatch(r"quantizer\.(semantic|acoustic)_residual_vector_quantizer\.(input_proj|output_proj)"
                               r"\.weight", k):
            q = "rvq_first" if m[1] == "semantic" else "rvq_rest"
            out[f"quantizer.{q}.{m[2]}.weight"] = v[..., 0] if v.ndim == 3 else v
        else:
            out[k] = v
    for prefix, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{prefix}.self_attn: needs q_proj, k_proj and v_proj weights, found {sorted(parts)}")
        q = unpermute_rotate_half(parts["q"], num_heads)
        k = unpermute_rotate_half(parts["k"], num_heads)
        out[f"{prefix}.self_attn.in_proj.weight"] = mx.concatenate([q, k, parts["v"]], axis=0)
    return config, out


def from_state(state: dict[str, mx.array], hf_config: dict | None, source: str) -> MimiCheckpoint:
    """Any Mimi layout, told apart by its keys."""
    layout = mimi_layout(set(state))
    config, weights = from_kyutai(state) if layout == "kyutai" else from_transformers(state, hf_config)
    return MimiCheckpoint(config, weights, source, layout)


def embedded(state: dict[str, mx.array], prefix: str, hf_config: dict | None, source: str) -> MimiCheckpoint:
    """A Mimi embedded under `prefix` (transformers' Moshi: `audio_encoder.`)."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise CheckpointError(f"{source}: no Mimi weights under {prefix!r}")
    return from_state(sub, hf_config, f"{source} ({prefix.rstrip('.')})")


def mimi_files(source: str | Path, revision: str | None = None) -> tuple[list[Path], dict | None]:
    """Weight files (and transformers config, if any) for a file, directory or repo id."""
    p = Path(source).expanduser()
    if is_local(source) and p.is_file():
        cfg = p.parent / "config.json"
        hf = json.loads(cfg.read_text()) if cfg.exists() and p.name != MIMI_KYUTAI_NAME else None
        return [p], (hf if hf and hf.get("model_type") == "mimi" else None)
    if is_local(source) and not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    files = list_files(source, revision)
    if "config.json" in files:
        config = json.loads(resolve_file(source, "config.json", revision).read_text())
        if config.get("model_type") == "mimi":
            names = ["model.safetensors"]
            if "model.safetensors.index.json" in files:
                index = resolve_file(source, "model.safetensors.index.json", revision)
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [resolve_file(source, n, revision) for n in names], config
        if config.get("mimi_name"):  # Kyutai STT/TTS repos and our converted directories
            return [resolve_file(source, config["mimi_name"], revision)], config.get("mimi_config")
    if MIMI_KYUTAI_NAME in files:
        return [resolve_file(source, MIMI_KYUTAI_NAME, revision)], None
    candidates = [f for f in files if f.startswith("tokenizer-") and f.endswith(".safetensors")]
    if len(candidates) == 1:
        return [resolve_file(source, candidates[0], revision)], None
    raise CheckpointError(f"{source}: no Mimi weights found (expected {MIMI_KYUTAI_NAME}, or "
                          f"config.json with model_type 'mimi' + model.safetensors); files: {few(files)}")


def read(source: str | Path, revision: str | None = None) -> MimiCheckpoint:
    """The Mimi checkpoint at `source` (file, directory or repo id), tensors lazy."""
    paths, hf_config = mimi_files(source, revision)
    state = read_safetensors(paths)
    name = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} shards)"
    return from_state(state, hf_config, name)
