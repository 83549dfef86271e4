"""`moshi-mlx bench mimi`: Mimi speed and memory, side by side with the references.

Each implementation runs in its own subprocess (so peak RSS is its own) on the same audio
and, where it can load it, the same weights file: a random Kyutai-layout Mimi made with
Kyutai's `moshi` package when that is installed (the references are optional: rows for
missing ones say so). Reported: batch encode/decode real-time factor (× real time) on the
whole clip, streaming ms per 80 ms frame (mean over the clip after 5 warm-up frames), and
peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

IMPLEMENTATIONS = ("moshi_mlx", "moshi-torch", "transformers", "rustymimi")
FRAME = 1920
RATE = 24000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (mimi) printed as tables",
                       description="Speed and memory benchmarks, measured side by side with the "
                                   "reference implementations that are installed.")
    p.add_argument("target", choices=["mimi", "lm", "convert", "chat"], help="what to benchmark")
    p.add_argument("--audio", type=Path, default=None,
                   help="audio file to use (default: 10 s of synthetic speech-like sound)")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    p.add_argument("--only", default=",".join(IMPLEMENTATIONS),
                   help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)}")
    p.add_argument("--num-quantizers", type=int, default=8, help="codebooks (default 8, as Moshi)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--steps", type=int, default=20, help="lm: timed steps per row (after 3 warm-up steps)")
    p.add_argument("--no-7b", action="store_true", help="lm: skip the full 7B q4 row (it takes minutes)")
    p.set_defaults(run=run)


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like test sound: voiced harmonic bursts with a wandering pitch, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t) + 20 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 2.3 * t), 0, None) ** 0.5
    return (0.1 * voiced * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def run(args: argparse.Namespace) -> int:
    if args.target == "lm":
        return run_lm(args)
    if args.target == "convert":
        return run_convert(args)
    if args.target == "chat":
        return run_chat(args)
    from moshi_mlx.audio import read_audio

    if args.audio is not None:
        pcm = read_audio(args.audio, RATE).pcm[: int(args.seconds * RATE)]
    else:
        pcm = synthetic_audio(args.seconds)
    pcm = pcm[: len(pcm) // FRAME * FRAME]
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="moshi-mlx-bench-") as tmp:
        audio_path = Path(tmp) / "audio.npy"
        np.save(audio_path, pcm)
        weights = Path(tmp) / "tokenizer-e351c8d8-checkpoint125.safetensors"
        made = _worker("make-weights", weights, audio_path, args.num_quantizers)
        shared = made.get("ok", False)
        rows = []
        for impl in wanted:
            if impl not in IMPLEMENTATIONS:
                print(f"unknown implementation {impl!r}", file=sys.stderr)
                continue
            print(f"running {impl} …", file=sys.stderr)
            res = _worker(impl, weights if shared else None, audio_path, args.num_quantizers)
            res["impl"] = impl
            rows.append(res)
    print(format_table(rows, len(pcm) / RATE, shared))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def format_table(rows: list[dict], seconds: float, shared: bool) -> str:
    head = ("implementation", "batch enc ×RT", "batch dec ×RT", "stream enc ms", "stream dec ms",
            "stream total ms", "peak RSS MB")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['impl']} | " + " | ".join(["n/a"] * 5) + f" | ({r['error']})")
            continue

        def f(key, fmt):
            return fmt.format(r[key]) if r.get(key) is not None else "—"
        total = (r["stream_enc_ms"] + r["stream_dec_ms"]) if r.get("stream_enc_ms") is not None else None
        lines.append(" | ".join([r["impl"], f("batch_enc_rtf", "{:.1f}"), f("batch_dec_rtf", "{:.1f}"),
                                 f("stream_enc_ms", "{:.1f}"), f("stream_dec_ms", "{:.1f}"),
                                 "—" if total is None else f"{total:.1f}", f("peak_rss_mb", "{:.0f}")]))
    note = (f"{seconds:.1f} s of audio, streaming = 80 ms frames; "
            + ("same random weights for all but transformers (own random init, same shapes)"
               if shared else "random weights (moshi not installed: each implementation its own)"))
    return "\n".join(lines) + "\n" + note


def _worker(impl: str, weights: Path | None, audio: Path, n_q: int) -> dict:
    cmd = [sys.executable, "-m", "moshi_mlx.apps.bench", impl, str(weights or ""), str(audio), str(n_q)]
    env = os.environ.copy()
    if not impl.startswith("moshi_mlx"):
        # Keep our OpenBLAS out of the references' processes (torch brings its own BLAS and
        # OpenMP threads; a second BLAS thread pool would distort their timings).
        env["MOSHI_MLX_BLAS"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:120]}


# ---------------------------------------------------------------------------------------------
# Workers: one implementation each, in a fresh process.


def _peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _timeit(fn, repeat: int = 3) -> float:
    """Median of `repeat` timed runs after one warm-up run (compilation, allocation)."""
    import time

    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _stream_times(enc_step, dec_step, pcm: np.ndarray, warmup: int = 5) -> tuple[float, float]:
    import time

    enc = dec = 0.0
    frames = len(pcm) // FRAME
    for i in range(frames):
        t0 = time.perf_counter()
        codes = enc_step(pcm[i * FRAME:(i + 1) * FRAME])
        t1 = time.perf_counter()
        dec_step(codes)
        t2 = time.perf_counter()
        if i >= warmup:
            enc, dec = enc + t1 - t0, dec + t2 - t1
    n = max(1, frames - warmup)
    return enc / n * 1e3, dec / n * 1e3


def _bench_moshi_mlx(weights: str, pcm: np.ndarray, n_q: int) -> dict:
    import moshi_mlx
    import mlx.core as mx

    model = moshi_mlx.MimiModel.from_pretrained(weights) if weights else moshi_mlx.MimiModel()
    mx.eval(model.parameters())
    x = mx.array(pcm[None, None])
    codes = model.encode(x, num_quantizers=n_q).audio_codes
    enc = _timeit(lambda: mx.eval(model.encode(x, num_quantizers=n_q).audio_codes))
    dec = _timeit(lambda: mx.eval(model.decode(codes).audio_values))

    def enc_step(frame):
        c = model.encode_step(mx.array(frame[None, None]), n_q)
        mx.eval(c)
        return c

    def dec_step(c):
        mx.eval(model.decode_step(c))

    with model.streaming():
        se, sd = _stream_times(enc_step, dec_step, pcm)
    return _result(pcm, enc, dec, se, sd)


def _bench_moshi_torch(weights: str, pcm: np.ndarray, n_q: int) -> dict:
    import torch
    from moshi.models import loaders

    torch.set_grad_enabled(False)
    model = loaders.get_mimi(weights or None, device="cpu")
    model.set_num_codebooks(n_q)
    x = torch.from_numpy(pcm)[None, None]
    codes = model.encode(x)
    enc = _timeit(lambda: model.encode(x))
    dec = _timeit(lambda: model.decode(codes))
    with model.streaming(1):
        se, sd = _stream_times(lambda f: model.encode(torch.from_numpy(f)[None, None]), model.decode, pcm)
    return _result(pcm, enc, dec, se, sd)


def _bench_transformers(weights: str, pcm: np.ndarray, n_q: int) -> dict:
    import torch
    from transformers import MimiConfig, MimiModel

    torch.set_grad_enabled(False)
    model = MimiModel(MimiConfig()).eval()
    x = torch.from_numpy(pcm)[None, None]
    codes = model.encode(x, num_quantizers=n_q).audio_codes
    enc = _timeit(lambda: model.encode(x, num_quantizers=n_q))
    dec = _timeit(lambda: model.decode(codes))
    return _result(pcm, enc, dec, None, None)


def _bench_rustymimi(weights: str, pcm: np.ndarray, n_q: int) -> dict:
    import rustymimi

    if not weights:
        raise RuntimeError("needs a Kyutai-layout weights file (install moshi to make one)")
    tok = rustymimi.Tokenizer(weights, num_codebooks=n_q)
    x = pcm[None, None]
    codes = tok.encode(x)
    enc = _timeit(lambda: tok.encode(x))
    dec = _timeit(lambda: tok.decode(codes))
    tok.reset()
    se, sd = _stream_times(lambda f: tok.encode_step(f[None, None]), tok.decode_step, pcm)
    return _result(pcm, enc, dec, se, sd)


def _result(pcm, enc, dec, se, sd) -> dict:
    seconds = len(pcm) / RATE
    return {"batch_enc_rtf": seconds / enc, "batch_dec_rtf": seconds / dec, "stream_enc_ms": se,
            "stream_dec_ms": sd, "peak_rss_mb": _peak_rss_mb()}


def _make_weights(path: str, pcm: np.ndarray, n_q: int) -> dict:
    """A random Kyutai-layout Mimi file every implementation can load (needs moshi + torch)."""
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = loaders.get_mimi(None, device="cpu")
    state = {}
    for k, v in model.state_dict().items():  # release naming for the attention projections
        k = k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
        k = k.replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")
        if k.endswith("_codebook.embedding_sum"):
            v = torch.randn_like(v) * 0.1
        if k.endswith("_codebook.cluster_usage"):
            v = torch.ones_like(v)
        state[k] = v.contiguous()
    save_file(state, path)
    return {"ok": True}


def _worker_main(argv: list[str]) -> None:
    impl, weights, audio, n_q = argv[0], argv[1], argv[2], int(argv[3])
    if impl.startswith(("lm:", "moshi_mlx-lm:", "moshi_mlx-chat:")):
        return _lm_worker_main(impl, int(n_q))
    pcm = np.load(audio)
    try:
        if impl == "make-weights":
            res = _make_weights(weights, pcm, n_q)
        else:
            if impl == "moshi_mlx":
                import moshi_mlx  # noqa: F401 - BLAS preload before anything else
            fn = {"moshi_mlx": _bench_moshi_mlx, "moshi-torch": _bench_moshi_torch,
                  "transformers": _bench_transformers, "rustymimi": _bench_rustymimi}[impl]
            res = fn(weights, pcm, n_q)
    except ImportError as e:
        res = {"error": f"not installed: {e.name}"}
    except Exception as e:  # noqa: BLE001 - a benchmark row reports what went wrong
        res = {"error": f"{type(e).__name__}: {e}"[:120]}
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# bench lm: one LM step (text token + dep_q audio tokens), greedy, random weights.

SMALL_LM = dict(dim=1024, num_layers=8, num_heads=16)  # with the real 7B depformer and vocabularies
LM_ROWS = [  # (label, implementation, config, quantization bits)
    ("small fp32", "moshi_mlx-lm:small:0", "small", 0),
    ("small q8", "moshi_mlx-lm:small:8", "small", 8),
    ("small q4", "moshi_mlx-lm:small:4", "small", 4),
    ("small fp32", "lm:torch:small:fp32", "small", 0),
    ("small bf16", "lm:torch:small:bf16", "small", 0),
    ("7B q4", "moshi_mlx-lm:7b:4", "7b", 4),
]


def run_lm(args: argparse.Namespace) -> int:
    rows = []
    for label, impl, size, _ in LM_ROWS:
        if size == "7b" and args.no_7b:
            continue
        print(f"running {impl} …", file=sys.stderr)
        res = _worker(impl, None, Path("-"), args.steps)
        res.update(impl="moshi (PyTorch)" if ":torch:" in impl else "moshi_mlx", config=label)
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


def _lm_worker_main(impl: str, steps: int) -> None:
    try:
        if impl.startswith("moshi_mlx-chat:"):
            res = _bench_chat(impl.split(":", 1)[1], steps)
        elif impl.startswith("lm:torch:"):
            res = _bench_lm_torch(impl.split(":")[3], steps)
        else:
            _, size, bits = impl.split(":")
            res = _bench_lm_mlx(size, int(bits), steps)
    except ImportError as e:
        res = {"error": f"not installed: {e.name}"}
    except Exception as e:  # noqa: BLE001
        res = {"error": f"{type(e).__name__}: {e}"[:160]}
    print(json.dumps(res))


def _bench_lm_mlx(size: str, bits: int, steps: int) -> dict:
    import time

    import moshi_mlx  # noqa: F401 - BLAS preload
    import mlx.core as mx

    from moshi_mlx.models.lm import LmConfig, LMModel
    from moshi_mlx.modules.sampling import sample_token
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
    model.transformer.start_streaming()
    temporal = depformer = 0.0
    for i in range(steps + 3):
        tokens = np.concatenate([rng.integers(0, cfg.text_card, (1, 1, 1)), rng.integers(0, cfg.card, (1, cfg.n_q, 1))], 1)
        t1 = time.perf_counter()
        h, logits = model.step_text(mx.array(tokens.astype(np.int32)))
        text = sample_token(logits[:, 0], 0.0)
        mx.eval(h, text)
        t2 = time.perf_counter()
        model.start_depformer_frame()
        prev = text
        for cb in range(cfg.dep_q):
            prev = sample_token(model.depformer_step(cb, prev, h), 0.0)
        mx.eval(prev)
        t3 = time.perf_counter()
        if i >= 3:
            temporal, depformer = temporal + t2 - t1, depformer + t3 - t2
    early_rss = _peak_rss_mb()
    # Then a session that has filled its context: caches full (random keys), as after 4 min.
    state = model.transformer.stream_state
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
        h, logits = model.step_text(mx.array(np.zeros((1, cfg.num_codebooks, 1), np.int32)))
        mx.eval(h, logits)
        if i >= 2:
            full += time.perf_counter() - t1
    return {"temporal_ms": temporal / steps * 1e3, "depformer_ms": depformer / steps * 1e3,
            "temporal_full_ms": full / 4 * 1e3, "peak_rss_mb": early_rss, "peak_rss_full_mb": _peak_rss_mb(),
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
            "peak_rss_mb": _peak_rss_mb(), "load_s": load_s}


# ---------------------------------------------------------------------------------------------
# bench convert: a synthetic checkpoint with the real 7B release key names and shapes (bf16,
# ~15 GB, generated on disk in bounded memory), converted to q4 and q8 in a child process.


def kyutai_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of Kyutai's Moshi 7B release `model.safetensors`."""
    from moshi_mlx.models.lm import LmConfig

    c = LmConfig()
    D, d = c.dim, c.depformer_dim
    hid, dhid = c.temporal().gating_hidden, c.depformer().gating_hidden
    shapes: dict[str, tuple[int, ...]] = {"text_emb.weight": (c.text_card + 1, D), "out_norm.alpha": (1, 1, D),
                                          "text_linear.weight": (c.text_card, D),
                                          "depformer_text_emb.weight": (c.text_card + 1, d)}
    for k in range(c.n_q):
        shapes[f"emb.{k}.weight"] = (c.card + 1, D)
    for n in range(c.num_layers):
        p = f"transformer.layers.{n}."
        shapes.update({p + "self_attn.in_proj_weight": (3 * D, D), p + "self_attn.out_proj.weight": (D, D),
                       p + "norm1.alpha": (1, 1, D), p + "norm2.alpha": (1, 1, D),
                       p + "gating.linear_in.weight": (2 * hid, D), p + "gating.linear_out.weight": (D, hid)})
    for i in range(c.dep_q):
        shapes[f"depformer_in.{i}.weight"] = (d, D)
        shapes[f"linears.{i}.weight"] = (c.card, d)
        if i < c.dep_q - 1:
            shapes[f"depformer_emb.{i}.weight"] = (c.card + 1, d)
    for n in range(c.depformer_num_layers):
        p = f"depformer.layers.{n}."
        shapes.update({p + "self_attn.in_proj_weight": (c.dep_q * 3 * d, d),
                       p + "self_attn.out_proj.weight": (c.dep_q * d, d),
                       p + "norm1.alpha": (1, 1, d), p + "norm2.alpha": (1, 1, d)})
        for i in range(c.dep_q):
            shapes[p + f"gating.{i}.linear_in.weight"] = (2 * dhid, d)
            shapes[p + f"gating.{i}.linear_out.weight"] = (d, dhid)
    return shapes


def run_convert(args: argparse.Namespace) -> int:
    import resource
    import shutil
    import time

    import mlx.core as mx

    from moshi_mlx.weights import write_safetensors

    with tempfile.TemporaryDirectory(prefix="moshi-mlx-bench-convert-", dir=os.environ.get("TMPDIR")) as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        t0 = time.perf_counter()
        lazy = {k: (mx.random.uniform(-0.02, 0.02, shape) if not k.endswith("alpha") else mx.ones(shape)).astype(mx.bfloat16)
                for k, shape in kyutai_7b_shapes().items()}
        write_safetensors(src / "model.safetensors", lazy, what="synthetic 7B bf16")
        size = (src / "model.safetensors").stat().st_size
        print(f"synthetic 7B bf16 checkpoint: {size / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        rows = []
        for bits in (4, 8):
            out = Path(tmp) / f"q{bits}"
            cmd = [sys.executable, "-m", "moshi_mlx", "convert", str(src), "-o", str(out), "-q", "--q-bits", str(bits)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                rows.append((bits, None, None, None, None, proc.stderr.strip().splitlines()[-1][:100]))
                continue
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # max over children so far
            out_size = sum(p.stat().st_size for p in out.iterdir())
            rows.append((bits, wall, size / wall / 1e9, rss, out_size / 1e9, ""))
            shutil.rmtree(out)
    lines = ["conversion | wall s | source GB/s | peak RSS MB (max so far) | output GB",
             "--- | --- | --- | --- | ---"]
    for bits, wall, gbs, rss, out_gb, err in rows:
        if wall is None:
            lines.append(f"bf16 → q{bits} | failed: {err} | | |")
        else:
            lines.append(f"bf16 → q{bits} | {wall:.0f} | {gbs:.2f} | {rss:.0f} | {out_gb:.2f}")
    print("\n".join(lines) + f"\nsource: synthetic Moshi 7B release layout, bf16, {size / 1e9:.1f} GB")
    return 0


# ---------------------------------------------------------------------------------------------
# bench chat: the duplex loop (file mode) frame by frame, with Mimi at full size.

CHAT_ROWS = [("tiny LM", dict(dim=64, num_heads=4, num_layers=2, depformer_dim=32, depformer_num_heads=2,
                              depformer_num_layers=2, depformer_dim_feedforward=132)),
             ("small LM (dim 1024)", SMALL_LM)]


def run_chat(args: argparse.Namespace) -> int:
    rows = []
    for label, _ in CHAT_ROWS:
        print(f"running {label} …", file=sys.stderr)
        res = _worker(f"moshi_mlx-chat:{label}", None, Path("-"), args.steps)
        res["config"] = label
        rows.append(res)
    head = ("config", "encode ms", "LM ms", "decode ms", "frame ms", "× real time", "p50 ms", "p99 ms", "peak RSS MB")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']} | " + " | ".join(["n/a"] * 8) + f" ({r['error']})")
            continue
        lines.append(" | ".join([r["config"], f"{r['enc_ms']:.1f}", f"{r['lm_ms']:.1f}", f"{r['dec_ms']:.1f}",
                                 f"{r['frame_ms']:.1f}", f"{80.0 / r['frame_ms']:.2f}", f"{r['p50_ms']:.1f}",
                                 f"{r['p99_ms']:.1f}", f"{r['peak_rss_mb']:.0f}"]))
    print("\n".join(lines) + "\nfile mode, Mimi at full size (random weights), fp32 LM with the real 7B depformer in "
          "the small config; one frame = 80 ms of audio; latencies = per-frame compute time")
    return 0


def _bench_chat(label: str, frames: int) -> dict:
    import time

    import moshi_mlx  # noqa: F401 - BLAS preload
    import mlx.core as mx

    from moshi_mlx.generate import LMGen
    from moshi_mlx.models.lm import LmConfig, LMModel
    from moshi_mlx.models.mimi import MimiModel

    kw = dict(CHAT_ROWS)[label]
    mimi, lm = MimiModel(), LMModel(LmConfig(**kw))
    mx.eval(mimi.parameters(), lm.parameters())
    gen = LMGen(lm, temp=0.8, temp_text=0.7, seed=0)
    gen.reset(1)
    rng = np.random.default_rng(0)
    enc = lmt = dec = 0.0
    totals = []
    frames = max(frames, 50)
    with mimi.streaming():
        for i in range(frames + 5):
            pcm = mx.array(rng.standard_normal((1, 1, 1920)).astype(np.float32) * 0.1)
            t0 = time.perf_counter()
            codes = mimi.encode_step(pcm, num_quantizers=8)
            mx.eval(codes)
            t1 = time.perf_counter()
            tokens = gen.step(np.array(codes)[:, :, 0])
            t2 = time.perf_counter()
            if tokens is not None:
                mx.eval(mimi.decode_step(mx.array(tokens[:, 1:, None].astype(np.int32))))
            t3 = time.perf_counter()
            if i >= 5:
                enc, lmt, dec = enc + t1 - t0, lmt + t2 - t1, dec + t3 - t2
                totals.append((t3 - t0) * 1e3)
    return {"enc_ms": enc / frames * 1e3, "lm_ms": lmt / frames * 1e3, "dec_ms": dec / frames * 1e3,
            "frame_ms": float(np.mean(totals)), "p50_ms": float(np.percentile(totals, 50)),
            "p99_ms": float(np.percentile(totals, 99)), "peak_rss_mb": _peak_rss_mb()}


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
