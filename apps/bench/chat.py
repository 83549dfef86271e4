"""`moshi-mlx bench chat`: the duplex loop in file mode, timed through `DuplexSession`
itself (the class `moshi-mlx chat` runs), with Mimi at full size and random weights."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .common import peak_rss_mb, run_job, table
from .lm import SMALL_LM

CONFIGS = {"tiny LM": dict(dim=64, num_heads=4, num_layers=2, depformer_dim=32, depformer_num_heads=2,
                           depformer_num_layers=2, depformer_dim_feedforward=132),
           "small LM (dim 1024)": SMALL_LM}


@dataclass
class ChatJob:
    config: str  # a key of CONFIGS
    frames: int

    def run(self) -> dict:
        import time

        import mlx.core as mx

        from moshi_mlx.models.lm import LmConfig, LMModel
        from moshi_mlx.models.mimi import MimiModel
        from moshi_mlx.sessions.duplex import DuplexSession

        mimi, lm = MimiModel(), LMModel(LmConfig(**CONFIGS[self.config]))
        mx.eval(mimi.parameters(), lm.parameters())
        session = DuplexSession(lm, mimi, temp=0.8, temp_text=0.7, seed=0)
        rng = np.random.default_rng(0)
        parts, totals = np.zeros(3), []
        frames = max(self.frames, 50)
        for i in range(frames + 5):
            pcm = rng.standard_normal(1920).astype(np.float32) * 0.1
            t0 = time.perf_counter()
            session.step(pcm)
            dt = (time.perf_counter() - t0) * 1e3
            if i >= 5:  # warm-up frames excluded
                s = session.stats
                parts += (s.encode_ms, s.lm_ms, s.decode_ms)
                totals.append(dt)
        enc, lm_ms, dec = parts / frames
        return {"enc_ms": enc, "lm_ms": lm_ms, "dec_ms": dec, "frame_ms": float(np.mean(totals)),
                "p50_ms": float(np.percentile(totals, 50)), "p99_ms": float(np.percentile(totals, 99)),
                "peak_rss_mb": peak_rss_mb()}


def run(args) -> int:
    rows = []
    for label in CONFIGS:
        print(f"running {label} …", file=sys.stderr)
        r = run_job(ChatJob(label, args.steps))
        if "error" in r:
            rows.append([label] + ["n/a"] * 7 + [f"({r['error']})"])
            continue
        rows.append([label, f"{r['enc_ms']:.1f}", f"{r['lm_ms']:.1f}", f"{r['dec_ms']:.1f}", f"{r['frame_ms']:.1f}",
                     f"{80.0 / r['frame_ms']:.2f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                     f"{r['peak_rss_mb']:.0f}"])
    head = ("config", "encode ms", "LM ms", "decode ms", "frame ms", "× real time", "p50 ms", "p99 ms", "peak RSS MB")
    print(table(head, rows) + "\nDuplexSession in file mode, Mimi at full size (random weights), fp32 LM with the "
          "real 7B depformer in the small config; one frame = 80 ms of audio; latencies = per-frame compute time")
    return 0
