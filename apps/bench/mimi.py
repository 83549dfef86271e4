"""`moshi-mlx bench mimi`: Mimi speed and memory, side by side with the references.

Each implementation runs in its own process (so peak RSS is its own) on the same audio and,
where it can load it, the same weights file: a random Kyutai-layout Mimi made with Kyutai's
`moshi` package when that is installed (the references are optional: rows for missing ones
say so). Reported: batch encode/decode real-time factor (× real time) on the whole clip,
streaming ms per 80 ms frame (mean over the clip after 5 warm-up frames), and peak RSS.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import peak_rss_mb, pick, run_job, timeit

IMPLEMENTATIONS = ("moshi_mlx", "moshi-torch", "transformers", "rustymimi")
FRAME = 1920
RATE = 24000


@dataclass
class MimiJob:
    impl: str  # one of IMPLEMENTATIONS, or "make-weights"
    weights: str  # Kyutai-layout weights file ("" = random init)
    audio: str  # .npy of 24 kHz float32 samples
    n_q: int

    @property
    def uses_moshi_mlx(self) -> bool:
        return self.impl == "moshi_mlx"

    def run(self) -> dict:
        pcm = np.load(self.audio)
        if self.impl == "make-weights":
            return _make_weights(self.weights)
        fn = {"moshi_mlx": _bench_moshi_mlx, "moshi-torch": _bench_moshi_torch,
              "transformers": _bench_transformers, "rustymimi": _bench_rustymimi}[self.impl]
        return fn(self.weights, pcm, self.n_q)


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like test sound: voiced harmonic bursts with a wandering pitch, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t) + 20 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 2.3 * t), 0, None) ** 0.5
    return (0.1 * voiced * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)




def run(args) -> int:
    from moshi_mlx.audio import read_audio

    wanted = pick(args.only or ",".join(IMPLEMENTATIONS), IMPLEMENTATIONS, "implementation")
    if args.audio is not None:
        pcm = read_audio(args.audio, RATE).pcm[: int(args.seconds * RATE)]
    else:
        pcm = synthetic_audio(args.seconds)
    pcm = pcm[: len(pcm) // FRAME * FRAME]
    with tempfile.TemporaryDirectory(prefix="moshi-mlx-bench-") as tmp:
        audio_path = Path(tmp) / "audio.npy"
        np.save(audio_path, pcm)
        weights = Path(tmp) / "tokenizer-e351c8d8-checkpoint125.safetensors"
        shared = run_job(MimiJob("make-weights", str(weights), str(audio_path), args.num_quantizers)).get("ok", False)
        rows = []
        for impl in wanted:
            print(f"running {impl} …", file=sys.stderr)
            res = run_job(MimiJob(impl, str(weights) if shared else "", str(audio_path), args.num_quantizers))
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
    import mlx.core as mx

    import moshi_mlx

    model = moshi_mlx.MimiModel.from_pretrained(weights) if weights else moshi_mlx.MimiModel()
    mx.eval(model.parameters())
    x = mx.array(pcm[None, None])
    codes = model.encode(x, num_quantizers=n_q).audio_codes
    enc = timeit(lambda: mx.eval(model.encode(x, num_quantizers=n_q).audio_codes))
    dec = timeit(lambda: mx.eval(model.decode(codes).audio_values))

    state = model.init_state(1)

    def enc_step(frame):
        c, _ = model.encode_step(mx.array(frame[None, None]), state, n_q)
        mx.eval(c)
        return c

    def dec_step(c):
        mx.eval(model.decode_step(c, state)[0])

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
    enc = timeit(lambda: model.encode(x))
    dec = timeit(lambda: model.decode(codes))
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
    enc = timeit(lambda: model.encode(x, num_quantizers=n_q))
    dec = timeit(lambda: model.decode(codes))
    return _result(pcm, enc, dec, None, None)


def _bench_rustymimi(weights: str, pcm: np.ndarray, n_q: int) -> dict:
    import rustymimi

    if not weights:
        raise RuntimeError("needs a Kyutai-layout weights file (install moshi to make one)")
    tok = rustymimi.Tokenizer(weights, num_codebooks=n_q)
    x = pcm[None, None]
    codes = tok.encode(x)
    enc = timeit(lambda: tok.encode(x))
    dec = timeit(lambda: tok.decode(codes))
    tok.reset()
    se, sd = _stream_times(lambda f: tok.encode_step(f[None, None]), tok.decode_step, pcm)
    return _result(pcm, enc, dec, se, sd)


def _result(pcm, enc, dec, se, sd) -> dict:
    seconds = len(pcm) / RATE
    return {"batch_enc_rtf": seconds / enc, "batch_dec_rtf": seconds / dec, "stream_enc_ms": se,
            "stream_dec_ms": sd, "peak_rss_mb": peak_rss_mb()}


def _make_weights(path: str) -> dict:
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


