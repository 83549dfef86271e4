"""Builders for the PyTorch reference models used by the parity tests.

Everything here is test-only: it imports torch, Kyutai's `moshi` package and `transformers`.
Models get random weights in-process and are saved in the real release layouts, so that
moshi_mlx loads them through the same code paths users hit with downloaded checkpoints.
"""
from __future__ import annotations

import numpy as np
import torch

# The release Mimi file name in Kyutai's repos.
MIMI_RELEASE_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"


def randomise_codebooks(codebooks, latent: np.ndarray, rng: np.random.Generator) -> None:
    """Fill one RVQ's codebooks with code vectors sampled around the actual residuals.

    `codebooks`: (embedding_sum, cluster_usage, initialized) tensor triples, one per layer.
    Each layer's codewords are mean + 0.25·std·N(0, 1) of the residual that reaches it, so
    nearest-code decisions have usable margins; cluster_usage is uniform in [0.5, 2] so the
    loader's embedding_sum / cluster_usage division is exercised.
    """
    residual = latent.astype(np.float64)
    for embedding_sum, cluster_usage, initialized in codebooks:
        n, d = embedding_sum.shape
        mean, std = residual.mean(0), residual.std(0) + 1e-6
        codes = mean + 0.25 * std * rng.standard_normal((n, d))
        usage = rng.uniform(0.5, 2.0, size=n)
        embedding_sum.copy_(torch.from_numpy(codes * usage[:, None]).float())
        cluster_usage.copy_(torch.from_numpy(usage).float())
        initialized.fill_(1.0)
        codes32 = (embedding_sum / cluster_usage.clamp(min=1e-5)[:, None]).double().numpy()
        d2 = ((residual[:, None, :] - codes32[None]) ** 2).sum(-1)
        residual = residual - codes32[d2.argmin(1)]


def _perturb_layer_scales(model: torch.nn.Module, suffixes: tuple[str, ...]) -> None:
    # Random init leaves layer scales at 0.01: raise them so the transformers matter.
    for name, p in model.named_parameters():
        if name.endswith(suffixes):
            p.copy_(torch.empty_like(p).uniform_(0.05, 0.3))


@torch.no_grad()
def random_kyutai_mimi(pcm: np.ndarray, seed: int = 0):
    """Kyutai's PyTorch Mimi (moshi 0.2.13) with random weights and usable codebooks.

    `pcm` ([L] float, 24 kHz) is the audio whose latents the codebooks are fitted around.
    """
    from moshi.models import loaders

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mimi = loaders.get_mimi(None, device="cpu")
    mimi.eval()
    _perturb_layer_scales(mimi, ("layer_scale_1.scale", "layer_scale_2.scale"))
    x = torch.from_numpy(pcm.astype(np.float32))[None, None]
    x = x[..., : (x.shape[-1] // mimi.frame_size) * mimi.frame_size]
    emb = mimi._encode_to_unquantized_latent(x)  # [1, 512, T]
    q = mimi.quantizer
    for rvq in (q.rvq_first, q.rvq_rest):
        latent = rvq.input_proj(emb)[0].T.numpy()
        randomise_codebooks([(l._codebook.embedding_sum, l._codebook.cluster_usage, l._codebook._initialized)
                             for l in rvq.vq.layers], latent, rng)
    return mimi


@torch.no_grad()
def random_transformers_mimi(pcm: np.ndarray, seed: int = 0):
    """transformers' MimiModel (default config) with random weights and usable codebooks."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    model = MimiModel(MimiConfig()).eval()
    _perturb_layer_scales(model, ("self_attn_layer_scale.scale", "mlp_layer_scale.scale"))
    q = model.quantizer
    rvqs = (q.semantic_residual_vector_quantizer, q.acoustic_residual_vector_quantizer)
    captured = {}
    hooks = [r.input_proj.register_forward_hook(lambda mod, i, o, k=k: captured.__setitem__(k, o))
             for k, r in enumerate(rvqs)]
    x = torch.from_numpy(pcm.astype(np.float32))[None, None]
    model.encode(x[..., : (x.shape[-1] // 1920) * 1920])
    for h in hooks:
        h.remove()
    for k, rvq in enumerate(rvqs):
        randomise_codebooks([(l.codebook.embed_sum, l.codebook.cluster_usage, l.codebook.initialized)
                             for l in rvq.layers], captured[k][0].T.numpy(), rng)
        for l in rvq.layers:
            l.codebook._embed = None  # transformers caches the resolved codebook
    return model


def kyutai_release_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict in the release key naming.

    moshi 0.2.13's state_dict() writes attention weights as `in_projs.{i}.weight` /
    `out_projs.{i}.weight`; the released files use `in_proj_weight` / `out_proj.weight`
    (per-step weights stacked along dim 0).
    """
    import re

    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in module.state_dict().items():
        m = re.match(r"(.*)\.(in_projs|out_projs)\.(\d+)\.weight$", key)
        if m:
            prefix, kind, idx = m.group(1), m.group(2), int(m.group(3))
            name = f"{prefix}.in_proj_weight" if kind == "in_projs" else f"{prefix}.out_proj.weight"
            stacked.setdefault(name, []).append((idx, value))
        else:
            out[key] = value
    for name, parts in stacked.items():
        parts.sort(key=lambda p: p[0])
        out[name] = torch.cat([p[1] for p in parts], dim=0)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_kyutai_mimi(mimi, path) -> None:
    from safetensors.torch import save_file

    save_file(kyutai_release_state_dict(mimi), str(path))


def speech_pcm(seconds: float = 12.0) -> np.ndarray:
    """Real read speech (../shared/audio/bria.mp3), mono 24 kHz float32, `seconds` long (the
    torch-free helper in conftest.py, here for the reference tests that import this module)."""
    from conftest import speech_pcm as read

    return read(seconds)


def tiny_lm_kwargs(**overrides) -> dict:
    """Kyutai LM kwargs with the real structure (16 streams of 2048 codes + 32000 text
    tokens, delays, silu gating, rms_norm_f32, multi-linear per-step depformer) but tiny dims."""
    kw = dict(
        dim=64, text_card=32000, existing_text_padding_id=3, n_q=16, dep_q=8, card=2048,
        num_heads=4, num_layers=2, hidden_scale=4.125, causal=True, layer_scale=None, context=3000,
        max_period=10000, gating="silu", norm="rms_norm_f32", positional_embedding="rope",
        depformer_dim=32, depformer_dim_feedforward=int(4.125 * 32), depformer_num_heads=2,
        depformer_num_layers=2, depformer_layer_scale=None, depformer_multi_linear=True,
        depformer_context=8, depformer_max_period=10000, depformer_gating="silu", depformer_pos_emb="none",
        depformer_weights_per_step=True, delays=[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    )
    kw.update(overrides)
    return kw


@torch.no_grad()
def random_kyutai_lm(kwargs: dict, seed: int = 0):
    """Kyutai's PyTorch LMModel (moshi 0.2.13) from kwargs, random weights, eval mode.

    Its init leaves some weights small (in_proj left at torch's default); we rescale every
    parameter to a unit-ish spread so logits are not flat and argmax decisions are sharp.
    """
    from moshi.models.lm import LMModel

    torch.manual_seed(seed)
    model = LMModel(**kwargs).eval()
    for name, p in model.named_parameters():
        if name.endswith("alpha"):
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
        elif p.dim() == 2:
            p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5))
    return model


def save_kyutai_lm(model, directory, kwargs: dict, name: str = "model.safetensors") -> None:
    """Release layout: `model.safetensors` (per-step depformer attention stacked as
    in_proj_weight) and a Kyutai-style config.json with the LM kwargs and `moshi_name`."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(kyutai_release_state_dict(model), str(directory / name))
    (directory / "config.json").write_text(json.dumps({**kwargs, "moshi_name": name}, indent=2))


@torch.no_grad()
def random_transformers_moshi(seed: int = 0, text_vocab: int = 100):
    """A tiny transformers MoshiForConditionalGeneration (8+8 codebooks of 2048, a tiny Mimi
    inside), random weights rescaled so that logits are not flat."""
    from transformers import MimiConfig, MoshiConfig, MoshiForConditionalGeneration

    torch.manual_seed(seed)
    mimi = MimiConfig(hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4],
                      codebook_size=2048, codebook_dim=16, vector_quantization_hidden_dimension=16,
                      num_quantizers=8, num_semantic_quantizers=1, upsample_groups=16, num_hidden_layers=1,
                      intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, sliding_window=250)
    cfg = MoshiConfig(vocab_size=text_vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      ffn_dim=2 * 176, num_codebooks=8, max_position_embeddings=3000, sliding_window=3000,
                      audio_encoder_config=mimi.to_dict(),
                      depth_decoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                ffn_dim=2 * 88, sliding_window=8, max_position_embeddings=9))
    model = MoshiForConditionalGeneration(cfg).eval()
    _sharpen(model, skip="audio_encoder.")
    return model


def _sharpen(model, skip: str | None = None) -> None:
    for name, p in model.named_parameters():
        if skip and name.startswith(skip):
            continue
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
        elif p.dim() >= 2:
            p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5))


@torch.no_grad()
def random_transformers_causal_lm(seed: int = 0):
    from transformers import MoshiConfig, MoshiForCausalLM

    torch.manual_seed(seed)
    cfg = MoshiConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      ffn_dim=2 * 176, max_position_embeddings=3000, sliding_window=3000)
    model = MoshiForCausalLM(cfg).eval()
    _sharpen(model)
    return model


TTS_N_Q = 16
CFG_VALUES = ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]


def tts_kwargs(distilled: bool = True) -> dict:
    """A tiny TTS LM with the structure of kyutai/tts-1.6b-en_fr: cross-attention to 5
    speaker slots, the tensor / lookup-table conditioners and the fuser, demuxed two-stream
    text, low-rank depformer embeddings, a weights-per-step schedule, acoustic delay 2, and
    a 24-step context so the cache wraps. distilled=False: no "cfg" condition (real CFG)."""
    conditioners = {
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
        "control": {"type": "lut", "lut": {"n_bins": 1, "dim": 64, "tokenizer": "noop", "possible_values": ["ok"]}},
    }
    fuser = {"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1.0, "sum": ["control"],
             "prepend": [], "cross": ["speaker_wavs"]}
    if distilled:
        conditioners["cfg"] = {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                                                      "possible_values": CFG_VALUES}}
        fuser["sum"] = ["control", "cfg"]
    return tiny_lm_kwargs(
        text_card=25, n_q=TTS_N_Q, dep_q=TTS_N_Q, delays=[0, 0] + [2] * (TTS_N_Q - 1), context=24,
        demux_second_stream=True, depformer_low_rank_embeddings=16, cross_attention=True,
        depformer_weights_per_step_schedule=[0, 1, 2, 3] + [4] * 4 + [5] * 4 + [6] * 4,
        conditioners=conditioners, fuser=fuser)


@torch.no_grad()
def random_tts_lm(kwargs: dict, seed: int):
    """Kyutai's LMModel with conditioners (built as `get_moshi_lm` does), random weights; the
    text head's "new word" and "pad" rows are boosted so the model, not only the forcing
    rules, decides when words start."""
    from moshi.models import loaders

    import copy

    torch.manual_seed(seed)
    # get_moshi_lm writes into the nested conditioner dicts: give it a copy
    model = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(kwargs), device="cpu", dtype=torch.float32).eval()
    for name, p in model.named_parameters():
        if name.endswith("alpha"):
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
        elif name.endswith(("norm_cross.weight", "norm_cross.bias")):
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith("weight") else torch.randn_like(p) * 0.1)
        elif p.dim() == 2:
            p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5))
    model.text_linear.weight[[0, 3]] *= 4.0
    return model


def save_tts(model, d, kwargs: dict, kyutai_mimi, tok) -> None:
    """Release layout plus a Kyutai-style TTS config.json (model_type, tts_config, model_id)."""
    import json
    from pathlib import Path

    from conftest import share_file

    d = Path(d)
    save_kyutai_lm(model, d, kwargs)
    share_file(kyutai_mimi[1], d / kyutai_mimi[1].name)
    share_file(tok, d / "tok.model")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tts", mimi_name=kyutai_mimi[1].name, tokenizer_name="tok.model",
               model_id={"sig": "0123abcd", "epoch": 7},
               tts_config={"audio_delay": 1.28, "second_stream_ahead": 2}, lm_gen_config={"temp": 0.6})
    (d / "config.json").write_text(json.dumps(cfg))


def write_voice(path, seed: int, frames: int = 10):
    """A voice file as in kyutai/tts-voices: `speaker_wavs` [1, 512, frames]."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"speaker_wavs": torch.randn(1, 512, frames, generator=g) * 0.7}, str(path))
    return path
