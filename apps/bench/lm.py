"""`moshi-mlx bench lm`: one LM step (text token + dep_q audio tokens), greedy, random
weights: moshi_mlx fp32/q8/q4 and PyTorch fp32/bf16 on the same small config, and the full
7B q4; each row in its own process."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np

from .common import peak_rss_mb, run_job

SMALL_LM = dict(dim=1024, num_layers=8, num_heads=16)  # with the real 7B depformer and vocabularies


@dataclass
class LmJob:
    impl: str  # "moshi_mlx" or "torch"
    size: str  # "small" or "7b"
    bits: int = 0  # moshi_mlx quantization (0 = full precision)
    dtype: str = "fp32"  # torch: "fp32" or "bf16"
    steps: int = 20

    @property
    def uses_moshi_mlx(self) -> bool:
        return self.impl == "moshi_mlx"

    @property
    def label(self) -> str:
        return f"{self.size} {'q%d' % self.bits if self.bits else self.dtype}".replace("7b", "7B")

    def run(self) -> dict:
        if self.impl == "torch":
            return _bench_lm_torch(self.dtype, self.steps)
        return _bench_lm_mlx(self.size, self.bits, self.steps)


ROWS = [LmJob("moshi_mlx", "small"), LmJob("moshi_mlx", "small", bits=8), LmJob("moshi_mlx", "small", bits=4),
        LmJob("torch", "small"), LmJob("torch", "small", dtype="bf16"), LmJob("moshi_mlx", "7b", bits=4)]


def run(args) -> int:
    rows = []
    for job in ROWS:
        if job.size == "7b" and args.no_7b:
            continue
        job.steps = args.steps
        print(f"running {job.impl} {job.label} …", file=sys.stderr)
        res = run_job(job)
        res.update(impl="moshi (PyTorch)" if job.impl == "torch" else "moshi_mlx", config=job.label)
        rows.append(res)
    print(format_lm_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def format_lm_table(rows: list[dict]) -> str:
    head = ("implementation", "config", "step ms", "temporal ms", "depformer ms", "× real time (80 ms)",
            "peak RSS MB", "full context: step ms", "full context: peak RSS MB", "load s")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['impl']} | {r['config']} | " + " | ".join(["n/a"] * 8) + f" ({r['error']})")
            continue
        step = r["temporal_ms"] + r["depformer_ms"]
        full = r.get("temporal_full_ms")
        lines.append(" | ".join([r["impl"], r["config"], f"{step:.0f}", f"{r['temporal_ms']:.0f}",
                                 f"{r['depformer_ms']:.0f}", f"{80.0 / step:.2f}", f"{r['peak_rss_mb']:.0f}",
                                 "—" if full is None else f"{full + r['depformer_ms']:.0f}",
                                 "—" if full is None else f"{r['peak_rss_full_mb']:.0f}", f"{r['load_s']:.1f}"]))
    return "\n".join(lines) + ("\nsmall = dim 1024, 8 layers, 16 heads + the real 7B depformer (1024, 6 layers, "
                               "8 steps, per-step weights), vocabularies 32000 / 2048; random weights, greedy; "
                               "one step = 1 text token + 8 audio tokens; first columns: the first steps of a "
                               "session; 'full context': KV caches filled to the 3000-step context (after 4 min)")


def _bench_lm_mlx(size: str, bits: int, steps: int) -> dict:
    import time

    import mlx.core as mx

    from moshi_mlx.models.lm import LmConfig, LMModel
    from moshi_mlx.modules.sampling import RandomKeys, Sampler
    from moshi_mlx.quantize import QuantizationSpec, cast_floating, compute_dtype, eval_by_layer, quantize_model

    t0 = time.perf_counter()
    cfg = LmConfig(**(SMALL_LM if size == "small" else {}))
    model = LMModel(cfg)  # random init: lazy, so a 7B model is never materialized in full precision
    if bits:
        quantize_model(model, QuantizationSpec.make(bits))
    cast_floating(model, compute_dtype())
    eval_by_layer(model)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    state = model.init_state()
    greedy, keys = Sampler(), RandomKeys()
    temporal = depformer = 0.0
    for i in range(steps + 3):
        tokens = np.concatenate([rng.integers(0, cfg.text_card, (1, 1, 1)), rng.integers(0, cfg.card, (1, cfg.n_q, 1))], 1)
        t1 = time.perf_counter()
        h, logits = model.step_text(mx.array(tokens.astype(np.int32)), state)
        text = greedy(logits[:, 0])
        mx.eval(h, text)
        t2 = time.perf_counter()
        mx.eval(model.sample_audio(text, h, greedy, keys))
        t3 = time.perf_counter()
        if i >= 3:
            temporal, depformer = temporal + t2 - t1, depformer + t3 - t2
    early_rss = peak_rss_mb()
    # Then a session that has filled its context: caches full (random keys), as after 4 min.
    for cache in state.caches:
        shape = (1, cfg.num_heads, cache.capacity, cfg.dim // cfg.num_heads)
        cache.reset()
        cache.update(mx.random.normal(shape).astype(compute_dtype()), mx.random.normal(shape).astype(compute_dtype()))
        mx.eval([getattr(cache, name) for name in cache._buffers()])
        mx.clear_cache()
    state.offset = state.caches[0].capacity
    full = 0.0
    for i in range(6):
        t1 = time.perf_counter()
        h, logits = model.step_text(mx.array(np.zeros((1, cfg.num_codebooks, 1), np.int32)), state)
        mx.eval(h, logits)
        if i >= 2:
            full += time.perf_counter() - t1
    return {"temporal_ms": temporal / steps * 1e3, "depformer_ms": depformer / steps * 1e3,
            "temporal_full_ms": full / 4 * 1e3, "peak_rss_mb": early_rss, "peak_rss_full_mb": peak_rss_mb(),
            "load_s": load_s}


def _bench_lm_torch(dtype: str, steps: int) -> dict:
    import time

    import torch
    from moshi.models.loaders import _lm_kwargs
    from moshi.models.lm import LMModel

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    kwargs = {**_lm_kwargs, **SMALL_LM}
    model = LMModel(**kwargs, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])).eval()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    temporal = depformer = 0.0
    dep_q = model.dep_q
    with model.streaming(1):
        for i in range(steps + 3):
            tokens = np.concatenate([rng.integers(0, model.text_card, (1, 1, 1)),
                                     rng.integers(0, model.card, (1, model.n_q, 1))], 1)
            t1 = time.perf_counter()
            h, logits = model.forward_text(torch.from_numpy(tokens))
            text = logits.argmax(-1)[:, 0]  # [B, 1]
            t2 = time.perf_counter()
            with model.depformer.streaming(1):
                prev = text[:, :, None] if text.dim() == 2 else text
                prev = text.view(1, 1, 1)
                for cb in range(dep_q):
                    out = model.forward_depformer(cb, prev, h)
                    prev = out.argmax(-1).view(1, 1, 1)
            t3 = time.perf_counter()
            if i >= 3:
                temporal, depformer = temporal + t2 - t1, depformer + t3 - t2
    return {"temporal_ms": temporal / steps * 1e3, "depformer_ms": depformer / steps * 1e3,
            "peak_rss_mb": peak_rss_mb(), "load_s": load_s}


