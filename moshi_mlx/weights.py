"""Weight loading: the one place that knows every checkpoint layout.

Layouts are told apart by key names, never by tensor shapes. Each mapping turns a source
state dict into moshi_mlx's own parameter tree; loading is strict: missing, unexpected and
mis-shaped keys are all reported by name.

Mimi layouts:
- "kyutai": Kyutai's release file (`tokenizer-e351c8d8-checkpoint125.safetensors`):
  `encoder.model.0.conv.conv.weight`, `...transformer.layers.N.self_attn.in_proj_weight`,
  `quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum`, … (torch conv layouts).
- "transformers": `model.safetensors` + `config.json` from transformers' MimiModel:
  `encoder.layers.0.conv.weight`, separate q/k/v projections with q/k rows permuted for
  rotate-half RoPE, `quantizer.acoustic_residual_vector_quantizer.layers.N.codebook.embed_sum`.
"""
from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import CheckpointError
from .hub import is_local, list_files, resolve_file

if TYPE_CHECKING:
    from .models.lm import LMModel

MIMI_KYUTAI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"

# ----------------------------------------------------------------------------------------
# Reading safetensors files with useful errors


def check_safetensors(path: Path) -> dict:
    """Validate a safetensors header against the file size; return the header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: not a safetensors file (bad header length {n})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1]
        if end > data:
            raise CheckpointError(f"{path}: file is truncated (tensor {key!r} needs {end} data bytes, "
                                  f"the file has {data}); download it again")
    return header


def read_safetensors(paths: list[Path]) -> dict[str, mx.array]:
    state: dict[str, mx.array] = {}
    for path in paths:
        check_safetensors(path)
        try:
            part = mx.load(str(path))
        except Exception as e:  # noqa: BLE001 - MLX's message is terse; name the file
            raise CheckpointError(f"{path}: cannot load safetensors ({e})") from None
        state.update(part)
    return state


def weight_files(directory: Path, stem: str = "model") -> list[Path]:
    """`model.safetensors`, or the shards listed by `model.safetensors.index.json`."""
    index = directory / f"{stem}.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return [directory / f"{stem}.safetensors"]


# ----------------------------------------------------------------------------------------
# Strict assignment


def assign(model: nn.Module, weights: dict[str, mx.array], source: str, dtype: mx.Dtype | None = None,
           evaluate: bool = True) -> None:
    """Load `weights` (already in moshi_mlx naming and layout) into `model`, strictly.

    evaluate=False leaves the parameters lazy (to quantize before anything is materialized)."""
    check_names_and_shapes({k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}, weights, source)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    # Layout conversions are lazy strided views; make them contiguous once here, or every
    # matmul that reshapes a weight would copy it again on each call.
    weights = {k: mx.contiguous(v) for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    if evaluate:
        mx.eval(model.parameters())


def _few(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" … (+{len(keys) - n} more)" if len(keys) > n else "")


# ----------------------------------------------------------------------------------------
# Tensor layout conversions (torch → moshi_mlx)


def conv_weight(w: mx.array) -> mx.array:
    """torch Conv1d [out, in, k] → MLX [out, k, in]."""
    return w.transpose(0, 2, 1)


def convtr_weight(w: mx.array) -> mx.array:
    """torch ConvTranspose1d [in, out/groups, k] → [in, k, out], or [C, k] when depthwise."""
    if w.shape[1] == 1:
        return w[:, 0, :]
    return w.transpose(0, 2, 1)


def codebook(embedding_sum: mx.array, cluster_usage: mx.array) -> mx.array:
    usage = mx.maximum(cluster_usage.astype(mx.float32), 1e-5)
    return embedding_sum.astype(mx.float32) / usage[:, None]


def unpermute_rotate_half(w: mx.array, num_heads: int) -> mx.array:
    """Undo transformers' q/k row permutation (interleaved → rotate-half RoPE).

    transformers writes w.view(h, d/2, 2, D).transpose(1, 2); this is its inverse.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


# ----------------------------------------------------------------------------------------
# Mimi

_MIMI_TRANSFORMER_RENAMES = {  # transformers → ours, inside `*_transformer.layers.N.`
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
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(
        "unknown Mimi checkpoint layout: expected Kyutai's release keys (encoder.model.*, "
        "quantizer.rvq_first.*) or transformers' (encoder.layers.*, quantizer.semantic_residual_"
        f"vector_quantizer.*); found e.g. {sample}")


def _stack_codebooks(state: dict[str, mx.array], pattern: str, used: set[str], out: dict, prefix: str,
                     sum_name: str, usage_name: str, flag_name: str) -> None:
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


def mimi_weights_from_kyutai(state: dict[str, mx.array]) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    used: set[str] = set()
    for q in ("rvq_first", "rvq_rest"):
        _stack_codebooks(state, rf"quantizer\.{q}\.vq\.layers\.(\d+)\._codebook\.(\w+)", used, out,
                         f"quantizer.{q}", "embedding_sum", "cluster_usage", "_initialized")
    for k, v in state.items():
        if k in used:
            continue
        if m := re.fullmatch(r"(encoder|decoder)\.model\.(\d+)\.((?:block\.\d+\.)?)conv\.conv\.(weight|bias)", k):
            name = f"{m[1]}.layers.{m[2]}.{m[3]}{m[4]}"
            out[name] = conv_weight(v) if m[4] == "weight" else v
        elif m := re.fullmatch(r"decoder\.model\.(\d+)\.convtr\.convtr\.(weight|bias)", k):
            out[f"decoder.layers.{m[1]}.{m[2]}"] = convtr_weight(v) if m[2] == "weight" else v
        elif m := re.fullmatch(r"(encoder|decoder)_transformer\.transformer\.layers\.(\d+)\.(.+)", k):
            rest = m[3]
            rest = {"self_attn.in_proj_weight": "self_attn.in_proj.weight",
                    "self_attn.in_projs.0.weight": "self_attn.in_proj.weight",
                    "self_attn.out_projs.0.weight": "self_attn.out_proj.weight"}.get(rest, rest)
            out[f"{m[1]}_transformer.layers.{m[2]}.{rest}"] = v
        elif k == "downsample.conv.conv.conv.weight":
            out["downsample.weight"] = conv_weight(v)
        elif k == "upsample.convtr.convtr.convtr.weight":
            out["upsample.weight"] = convtr_weight(v)
        elif m := re.fullmatch(r"quantizer\.(rvq_first|rvq_rest)\.(input_proj|output_proj)\.weight", k):
            out[f"quantizer.{m[1]}.{m[2]}.weight"] = v[..., 0] if v.ndim == 3 else v
        else:
            out[k] = v  # reported as unexpected by assign()
    return out


def mimi_weights_from_transformers(state: dict[str, mx.array], num_heads: int) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    used: set[str] = set()
    for src, q in (("semantic", "rvq_first"), ("acoustic", "rvq_rest")):
        _stack_codebooks(state, rf"quantizer\.{src}_residual_vector_quantizer\.layers\.(\d+)\.codebook\.(\w+)",
                         used, out, f"quantizer.{q}", "embed_sum", "cluster_usage", "initialized")
    qkv: dict[str, dict[str, mx.array]] = {}
    # The decoder's transposed convs sit at the slots right after each ELU that follows a
    # stage: indices 2, 5, 8, 11 for 4 ratios (the same slots as Kyutai's `convtr`).
    for k, v in state.items():
        if k in used:
            continue
        if m := re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.((?:block\.\d+\.)?)conv\.(weight|bias)", k):
            name = f"{m[1]}.layers.{m[2]}.{m[3]}{m[4]}"
            out[name] = v  # layout fixed below, once we know which modules are transposed convs
        elif m := re.fullmatch(r"(encoder|decoder)_transformer\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", k):
            qkv.setdefault(f"{m[1]}_transformer.layers.{m[2]}", {})[m[3]] = v
        elif m := re.fullmatch(r"(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)", k):
            out[f"{m[1]}_transformer.layers.{m[2]}.{_MIMI_TRANSFORMER_RENAMES.get(m[3], m[3])}"] = v
        elif k == "downsample.conv.weight":
            out["downsample.weight"] = conv_weight(v)
        elif k == "upsample.conv.weight":
            out["upsample.weight"] = convtr_weight(v)
        elif m := re.fullmatch(r"quantizer\.(semantic|acoustic)_residual_vector_quantizer\.(input_proj|output_proj)\.weight", k):
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
    return out


def _fix_seanet_conv_layouts(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """transformers names plain and transposed SEANet convs alike (`layers.N.conv.weight`):
    pick the layout from the module the weight goes to (our own model's structure)."""
    from .modules.conv import StreamingConvTranspose1d

    modules = dict(model.named_modules())
    for k in list(weights):
        if re.fullmatch(r"(encoder|decoder)\.layers\.\d+\.(block\.\d+\.)?weight", k):
            mod = modules.get(k.rsplit(".", 1)[0])
            if isinstance(mod, StreamingConvTranspose1d):
                weights[k] = convtr_weight(weights[k])
            else:
                weights[k] = conv_weight(weights[k])


def _mimi_source(path_or_repo_id: str | Path, revision: str | None) -> tuple[list[Path], dict | None]:
    """Weight files (and transformers config, if any) for a file, directory or repo id."""
    p = Path(path_or_repo_id).expanduser()
    if is_local(path_or_repo_id) and p.is_file():
        cfg = p.parent / "config.json"
        return [p], (json.loads(cfg.read_text()) if cfg.exists() and p.name != MIMI_KYUTAI_NAME and
                     json.loads(cfg.read_text()).get("model_type") == "mimi" else None)
    if is_local(path_or_repo_id) and not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    files = list_files(path_or_repo_id, revision)
    config = None
    if "config.json" in files:
        config = json.loads(resolve_file(path_or_repo_id, "config.json", revision).read_text())
        if config.get("model_type") == "mimi":
            names = ["model.safetensors"]
            if "model.safetensors.index.json" in files:
                index = resolve_file(path_or_repo_id, "model.safetensors.index.json", revision)
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [resolve_file(path_or_repo_id, n, revision) for n in names], config
        if config.get("mimi_name"):  # Kyutai STT/TTS repos and our converted directories
            return [resolve_file(path_or_repo_id, config["mimi_name"], revision)], config.get("mimi_config")
    if MIMI_KYUTAI_NAME in files:
        return [resolve_file(path_or_repo_id, MIMI_KYUTAI_NAME, revision)], None
    candidates = [f for f in files if f.startswith("tokenizer-") and f.endswith(".safetensors")]
    if len(candidates) == 1:
        return [resolve_file(path_or_repo_id, candidates[0], revision)], None
    raise CheckpointError(f"{path_or_repo_id}: no Mimi weights found (expected {MIMI_KYUTAI_NAME}, or "
                          f"config.json with model_type 'mimi' + model.safetensors); files: {_few(files)}")


def load_mimi(path_or_repo_id: str | Path, revision: str | None = None, dtype: mx.Dtype = mx.float32):
    """Build a MimiModel from any supported Mimi checkpoint."""
    from .models.mimi import MimiConfig, MimiModel

    paths, hf_config = _mimi_source(path_or_repo_id, revision)
    state = read_safetensors(paths)
    layout = mimi_layout(set(state))
    source = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} shards)"
    if layout == "kyutai":
        n_rest = len({k.split(".")[4] for k in state if k.startswith("quantizer.rvq_rest.vq.layers.")})
        n_first = len({k.split(".")[4] for k in state if k.startswith("quantizer.rvq_first.vq.layers.")})
        config = MimiConfig(num_quantizers=n_first + n_rest, num_semantic_quantizers=n_first)
        weights = mimi_weights_from_kyutai(state)
    else:
        config = MimiConfig.from_dict(hf_config or {})
        weights = mimi_weights_from_transformers(state, config.num_attention_heads)
    model = MimiModel(config)
    if layout == "transformers":
        _fix_seanet_conv_layouts(model, weights)
    assign(model, weights, source, dtype)
    return model


# ----------------------------------------------------------------------------------------
# Moshi LM
#
# Layouts:
# - "kyutai": Kyutai's release `model.safetensors` (text_emb, emb.K, transformer.layers.N.
#   self_attn.in_proj_weight, norm1.alpha [1, 1, D], gating.linear_in, depformer_in.K,
#   depformer.layers.L.self_attn.in_proj_weight with the per-step weights stacked on dim 0,
#   depformer.layers.L.gating.K.*, linears.K). moshi's own state_dict() names the attention
#   weights in_projs.{i}.weight / out_projs.{i}.weight instead; both are accepted.

LM_KYUTAI_NAME = "model.safetensors"


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
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError("unknown Moshi LM checkpoint layout: expected Kyutai's release keys (text_emb.weight, "
                          "transformer.layers.N.*, depformer.*) or transformers' (decoder.model.*, depth_decoder.*); "
                          f"found e.g. {sample}")


def _split_steps(w: mx.array, steps: int, key: str) -> list[mx.array]:
    if w.shape[0] % steps:
        raise CheckpointError(f"{key}: shape {list(w.shape)} does not split into {steps} per-step weights")
    return mx.split(w, steps, axis=0)


def lm_weights_from_kyutai(state: dict[str, mx.array], config) -> dict[str, mx.array]:
    """Kyutai release (or moshi state_dict) naming → moshi_mlx's LMModel parameters."""
    dep_sets = config.depformer().num_weight_sets if config.depformer_weights_per_step else 0
    out: dict[str, mx.array] = {}
    for k, v in state.items():
        if k.endswith(".alpha"):  # RMSNorm: [1, 1, D] → [D]
            out[k] = v.reshape(-1)
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def lm_source(path_or_repo_id: str | Path, revision: str | None = None) -> tuple[list[Path], dict, str | Path]:
    """(LM weight files, LM config dict, where sibling files live) for a file, dir or repo.

    A directory or repo with a config.json uses it (Kyutai STT/TTS repos and converted
    directories name the weights in `moshi_name`); without one, it is a Moshiko/Moshika
    release: the 7B defaults and `model.safetensors`.
    """
    p = Path(path_or_repo_id).expanduser()
    if is_local(path_or_repo_id) and p.is_file():
        cfg_path = p.parent / "config.json"
        config = _read_json(cfg_path) if cfg_path.exists() else {}
        return [p], config, p.parent
    if is_local(path_or_repo_id) and not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    files = list_files(path_or_repo_id, revision)
    config = _read_json(resolve_file(path_or_repo_id, "config.json", revision)) if "config.json" in files else {}
    name = config.get("moshi_name")
    if name is None:  # Kyutai's PyTorch releases: bf16 or bitsandbytes 8-bit
        names = (LM_KYUTAI_NAME, "model.q8.safetensors", "model.q4.safetensors")
        name = next((n for n in names if n in files), LM_KYUTAI_NAME)
    if name not in files and f"{Path(name).stem}.safetensors.index.json" not in files:
        raise CheckpointError(f"{path_or_repo_id}: no LM weights {name!r} (files: {_few(files)})")
    index = f"{Path(name).stem}.safetensors.index.json"
    if index in files:
        idx = _read_json(resolve_file(path_or_repo_id, index, revision))
        names = sorted(set(idx["weight_map"].values()))
    else:
        names = [name]
    return [resolve_file(path_or_repo_id, n, revision) for n in names], config, path_or_repo_id


@dataclass
class LoadedLM:
    model: "LMModel"
    raw_config: dict  # the checkpoint's config.json ({} for Moshiko/Moshika releases)
    home: str | Path  # directory or repo holding the sibling files (Mimi, tokenizer)
    layout: str
    mimi_state: dict[str, mx.array]  # transformers layout: the embedded Mimi's weights


def load_lm(path_or_repo_id: str | Path, revision: str | None = None, dtype: mx.Dtype | None = None,
            quantize: int | None = None, group_size: int | None = None) -> LoadedLM:
    """An LMModel from any supported LM checkpoint, optionally quantized on the way (layer
    by layer: the full-precision model is never all in memory)."""
    from .models.lm import LMModel, LmConfig
    from .quantize import QuantizationSpec, cast_floating, compute_dtype, eval_by_layer, quantize_model, scales_dtype

    paths, config, home = lm_source(path_or_repo_id, revision)
    state = read_safetensors(paths)
    layout = lm_layout(set(state))
    source = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} shards)"
    try:
        if layout == "transformers":
            config_kw = lm_config_from_transformers(config, text_only="model.embed_tokens.weight" in state)
        else:
            config_kw = {k: v for k, v in config.items() if k not in ("quantization", "moshi_mlx_format", "dtype")}
        cfg = LmConfig.from_dict(config_kw)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path_or_repo_id}: bad LM config: {e}") from None
    model = LMModel(cfg)
    if layout == "moshi_mlx":
        q = config.get("quantization")
        if q:
            if quantize and (quantize, group_size or q["group_size"]) != (q["bits"], q["group_size"]):
                raise CheckpointError(f"{source} is already quantized to {q['bits']} bits; "
                                      "convert the original to change the quantization")
            quantize_model(model, QuantizationSpec.make(q["bits"], q["group_size"]))
            quantize = None
        weights = dict(state)
        weights = {k: (v.astype(scales_dtype(q["bits"])) if q and k.endswith((".scales", ".biases")) else v)
                   for k, v in weights.items()}
    elif layout == "kyutai-mlx":
        q = kyutai_mlx_quantization(paths[0])
        if any(k.endswith(".scales") for k in state) != (q is not None):
            raise CheckpointError(f"{source}: Kyutai MLX file whose name does not say its quantization "
                                  "(expected .q4. or .q8. for quantized weights)")
        if q:
            if quantize and (quantize, group_size or q[1]) != q:
                raise CheckpointError(f"{source} is already quantized to {q[0]} bits")
            quantize_model(model, QuantizationSpec.make(*q))
            quantize = None
        weights = lm_weights_from_kyutai_mlx(state, cfg)
        if q:
            weights = {k: (v.astype(scales_dtype(q[0])) if k.endswith((".scales", ".biases")) else v)
                       for k, v in weights.items()}
    elif layout == "kyutai":
        weights = lm_weights_from_kyutai(dequantize_bnb_int8(state), cfg)
    elif layout == "transformers":
        weights = lm_weights_from_transformers(state, cfg)
    else:
        raise CheckpointError(f"{source}: {layout} LM layout is not supported yet")
    assign(model, weights, source, evaluate=False)
    if quantize:
        quantize_model(model, QuantizationSpec.make(quantize, group_size))
    cast_floating(model, dtype or compute_dtype())
    eval_by_layer(model)
    mimi_state = {k: v for k, v in state.items() if k.startswith("audio_encoder.")}
    return LoadedLM(model, config, home, layout, mimi_state)


# - "transformers": MoshiForConditionalGeneration (`decoder.model.*`, `decoder.lm_head`,
#   `embed_tokens.K`, `depth_decoder.*` with per-codebook weights stacked on dim 0, Mimi under
#   `audio_encoder.*`) or MoshiForCausalLM (`model.*`, `lm_head`). q/k rows of the temporal
#   transformer are permuted for rotate-half RoPE; the depth decoder has no RoPE.


def lm_config_from_transformers(hf: dict, text_only: bool = False) -> dict:
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


# - "kyutai-mlx": Kyutai's own MLX files (kyutai/moshiko-mlx-q4 …, written by their moshi_mlx):
#   `text_emb`, `audio_embs.K`, `transformer.layers.N.self_attn.in_proj.weight`, `norm1.weight`,
#   `out_norm.weight`, and the depformer as `depformer.slices.I.{emb, linear_in, linear_out,
#   transformer.layers.L.*}` (one transformer per step; their norms are copies of the shared
#   ones of Kyutai's PyTorch model, so slice 0's are used). Quantized with MLX's default
#   predicate (Linear and Embedding): 4 bits / group 32 in `.q4.` files, 8 / 64 in `.q8.`.


def kyutai_mlx_quantization(path: Path) -> tuple[int, int] | None:
    name = Path(path).name
    if ".q4." in name:
        return 4, 32
    if ".q8." in name:
        return 8, 64
    return None


def lm_weights_from_kyutai_mlx(state: dict[str, mx.array], config) -> dict[str, mx.array]:
    dep_sets = config.depformer().num_weight_sets if config.depformer_weights_per_step else 0
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
                    out[f"{prefix}.self_attn.{a[1]}s.{config.depformer().weight_set(i)}.{a[2]}"] = v
                elif i == 0:
                    out[f"{prefix}.self_attn.{a[1]}.{a[2]}"] = v
            elif a := re.fullmatch(r"gating\.(.+)", rest):
                if dep_sets:
                    out[f"{prefix}.gating.{config.depformer().weight_set(i)}.{a[1]}"] = v
                elif i == 0:
                    out[f"{prefix}.gating.{a[1]}"] = v
            else:
                out[f"{prefix}.{rest}"] = v
        else:
            out[k] = v
    return out


def lm_weights_from_transformers(state: dict[str, mx.array], config) -> dict[str, mx.array]:
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
            heads = config.num_heads
            out[f"{layer}.self_attn.in_proj.weight"] = mx.concatenate(
                [unpermute_rotate_half(parts["q"], heads), unpermute_rotate_half(parts["k"], heads), parts["v"]], 0)
        else:  # depth decoder: [steps, d, d] each, no RoPE so no permutation
            for i in range(parts["q"].shape[0]):
                out[f"{layer}.self_attn.in_projs.{i}.weight"] = mx.concatenate(
                    [parts["q"][i], parts["k"][i], parts["v"][i]], 0)
    return out


def mimi_from_state(state: dict[str, mx.array], prefix: str, hf_config: dict | None):
    """A MimiModel from transformers-layout keys under `prefix` (e.g. Moshi's audio_encoder.)."""
    from .models.mimi import MimiConfig, MimiModel

    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise CheckpointError(f"no Mimi weights under {prefix!r}")
    config = MimiConfig.from_dict(hf_config or {})
    model = MimiModel(config)
    weights = mimi_weights_from_transformers(sub, config.num_attention_heads)
    _fix_seanet_conv_layouts(model, weights)
    assign(model, weights, prefix.rstrip("."))
    return model


# ----------------------------------------------------------------------------------------
# Conversion (moshi-mlx convert): lazy tensors in moshi_mlx naming, written one by one.
#
# Our own layout ("moshi_mlx", written by convert): moshi_mlx's parameter names as they are
# (`transformer.layers.N.self_attn.in_proj.weight`, `depformer.layers.L.self_attn.in_projs.I.
# weight`, …), quantized layers as `.weight` (uint32) / `.scales` / `.biases`; config.json has
# the LM kwargs, `quantization` and `moshi_mlx_format`.

MOSHI_MLX_FORMAT = "moshi_mlx/1"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"


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


@dataclass
class ConversionPlan:
    tensors: dict[str, mx.array]  # lazy, moshi_mlx names, final dtypes (quantized if requested)
    config: dict  # LM kwargs for config.json
    layout: str
    companions: dict[str, Path]  # config key → file to copy (mimi_name, tokenizer_name)
    mimi_tensors: dict[str, mx.array]  # a Mimi embedded in the source (transformers), to write out


def _lm_state(path_or_repo_id, revision) -> tuple[dict[str, mx.array], dict, str | Path, str, list[Path]]:
    paths, config, home = lm_source(path_or_repo_id, revision)
    state = read_safetensors(paths)  # lazy: data is read when a tensor is evaluated
    return state, config, home, lm_layout(set(state)), paths


def lm_conversion_plan(source, revision=None, spec=None, dtype: mx.Dtype = mx.bfloat16, lora=None,
                       lora_scaling: float | None = None) -> ConversionPlan:
    from mlx.utils import tree_flatten

    from .models.lm import LMModel, LmConfig
    from .quantize import file_scales_dtype, quantize_model

    state, raw, home, layout, paths = _lm_state(source, revision)
    if layout == "moshi_mlx":
        raise CheckpointError(f"{source} is already a moshi_mlx checkpoint; convert from the original instead")
    if layout == "kyutai-mlx":
        raise CheckpointError(f"{source}: Kyutai's MLX files load directly with from_pretrained; nothing to convert")
    if any(k.endswith("weight_scb") for k in state):
        state = dequantize_bnb_int8(state)
        layout += "-int8"
    if layout.startswith("transformers"):
        kw = lm_config_from_transformers(raw, text_only="model.embed_tokens.weight" in state)
    else:
        kw = {k: v for k, v in raw.items() if k not in ("moshi_name", "mimi_name", "tokenizer_name")}
    try:
        cfg = LmConfig.from_dict(kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad LM config: {e}") from None
    if layout.startswith("transformers"):
        weights = lm_weights_from_transformers(state, cfg)
    else:
        weights = lm_weights_from_kyutai(state, cfg)
    if lora is not None:
        adapter_path = Path(lora).expanduser()
        adapter = read_safetensors([adapter_path])
        if lora_scaling is None:
            cfg_path = adapter_path.parent / "config.json"
            lora_scaling = float(_read_json(cfg_path).get("lora_scaling", 2.0)) if cfg_path.exists() else 2.0
        for name, delta in lm_weights_from_kyutai(lora_deltas(adapter, lora_scaling), cfg).items():
            if name not in weights:
                raise CheckpointError(f"LoRA adapter {adapter_path}: {name} has no base weight")
            if tuple(weights[name].shape) != tuple(delta.shape):
                raise CheckpointError(f"LoRA adapter {adapter_path}: {name}: delta shape {list(delta.shape)} "
                                      f"!= base shape {list(weights[name].shape)}")
            weights[name] = weights[name].astype(mx.float32) + delta
    # Validate names and shapes against the model, strictly, without materializing anything.
    model = LMModel(cfg)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_names_and_shapes(expected, weights, str(paths[0]))
    quantized: set[str] = set()
    if spec is not None:
        quantize_model(model, spec)
        quantized = {k[: -len(".scales")] for k, _ in tree_flatten(model.parameters()) if k.endswith(".scales")}
    tensors: dict[str, mx.array] = {}
    for name, w in weights.items():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            q, s, b = mx.quantize(w.astype(mx.float32), spec.group_size, spec.bits)
            sd = file_scales_dtype(spec.bits)
            tensors[name], tensors[module + ".scales"], tensors[module + ".biases"] = q, s.astype(sd), b.astype(sd)
        else:
            tensors[name] = w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w
    companions = {}
    mimi_name = raw.get("mimi_name")
    try:
        files = list_files(home, revision)
    except CheckpointError:
        files = []
    if mimi_name is None:
        mimi_name = MIMI_KYUTAI_NAME if MIMI_KYUTAI_NAME in files else None
    if mimi_name:
        companions["mimi_name"] = resolve_file(home, mimi_name, revision)
    tok_name = raw.get("tokenizer_name") or (TOKENIZER_NAME if TOKENIZER_NAME in files else None)
    if tok_name:
        companions["tokenizer_name"] = resolve_file(home, tok_name, revision)
    config = cfg.to_dict()
    for k in ("moshi_name", "mimi_name", "tokenizer_name"):
        config.pop(k, None)
    mimi_tensors = {k[len("audio_encoder."):]: v for k, v in state.items() if k.startswith("audio_encoder.")}
    if mimi_tensors:
        config["mimi_config"] = raw.get("audio_encoder_config") or {}
    return ConversionPlan(tensors, config, layout, companions, mimi_tensors)


def check_names_and_shapes(expected: dict[str, tuple], weights: dict[str, mx.array], source: str) -> None:
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_few(extra)}")
    for k in sorted(set(expected) & set(weights)):
        if expected[k] != tuple(weights[k].shape):
            problems.append(f"{k}: checkpoint shape {list(weights[k].shape)} != model shape {list(expected[k])}")
    if problems:
        raise CheckpointError(f"{source}: does not match the model config: " + "; ".join(problems[:12]))


_ST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
              mx.int64: "I64", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.bool_: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str] | None = None,
                      progress: bool = True, what: str = "weights") -> None:
    """Write lazy arrays to a safetensors file one tensor at a time (bounded memory).

    The header is computed from shapes and dtypes alone; each tensor is then evaluated,
    written and released. `tensors` is consumed (emptied) as it is written.
    """
    import numpy as np
    from tqdm import tqdm

    names = sorted(tensors)
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name in names:
        arr = tensors[name]
        if arr.dtype not in _ST_DTYPES:
            raise CheckpointError(f"cannot write {name}: dtype {arr.dtype}")
        size = arr.nbytes
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f, tqdm(total=offset, unit="B", unit_scale=True, desc=what, disable=not progress,
                                     file=sys.stderr, dynamic_ncols=True) as bar:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            arr = tensors.pop(name)
            if arr.dtype in (mx.bfloat16, mx.float16):
                arr = arr.view(mx.uint16)
            elif arr.dtype == mx.bool_:
                arr = arr.astype(mx.uint8)
            mx.eval(arr)
            data = np.ascontiguousarray(np.array(arr, copy=False))
            f.write(data.tobytes())
            bar.update(data.nbytes)
            del arr, data
            mx.clear_cache()
