"""`moshi-mlx bench serve`: what the websocket and Opus path of `moshi-mlx serve` add to a
frame, measured against file-mode chat (DuplexSession.step) on the same model in the same
process.

The server runs as `serve` runs it (model worker on the main thread, aiohttp on another) on
loopback; the client (apps.server.client) sends one frame at a time and waits for Moshi's
frame back (window 1), so each latency is one frame's full path: client Opus encode,
websocket, server Opus decode, the step, server Opus encode, websocket, client Opus decode.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .chat import CONFIGS
from .common import peak_rss_mb, run_job, table


@dataclass
class ServeJob:
    config: str  # a key of bench.chat.CONFIGS
    frames: int

    def run(self) -> dict:
        import asyncio
        import threading
        import time

        import mlx.core as mx

        from moshi_mlx.models.lm import LmConfig, LMModel
        from moshi_mlx.models.mimi import MimiModel
        from moshi_mlx.sessions.duplex import DuplexSession

        from ..server.app import NetworkThread, ServerConfig, make_app
        from ..server.client import FRAME, converse
        from ..server.worker import ModelWorker

        mimi, lm = MimiModel(), LMModel(LmConfig(**CONFIGS[self.config]))
        mx.eval(mimi.parameters(), lm.parameters())
        gen = dict(temp=0.8, temp_text=0.7, seed=0)
        frames = max(self.frames, 50)
        pcm = (np.random.default_rng(0).standard_normal((frames + 5) * FRAME) * 0.1).astype(np.float32)

        # file mode: the step alone
        session = DuplexSession(lm, mimi, **gen)
        steps = []
        for i in range(frames + 5):
            t0 = time.perf_counter()
            session.step(pcm[i * FRAME:(i + 1) * FRAME])
            if i >= 5:
                steps.append((time.perf_counter() - t0) * 1e3)

        # the same frames through the server
        class Model:  # what ModelWorker needs of a loaded checkpoint
            pass

        model = Model()
        model.lm, model.mimi, model.tokenizer = lm, mimi, None
        worker = ModelWorker(model, gen)
        worker.warm_up()
        network = NetworkThread(make_app(ServerConfig(model_name=self.config), worker), "127.0.0.1", 0)
        network.start()
        network.started.wait(30)
        if network.error:
            raise RuntimeError(network.error)
        url = network.url.replace("http://localhost", "ws://127.0.0.1") + "api/chat"
        result: dict = {}

        def client() -> None:
            try:
                result["conv"] = asyncio.run(converse(url, pcm, window=1, settle_s=60))
            finally:
                worker.stop()

        thread = threading.Thread(target=client)
        thread.start()
        worker.run()
        thread.join()
        network.stop()
        conv = result["conv"]
        if conv.errors or conv.frames < frames + 5:
            raise RuntimeError(f"server answered {conv.frames} of {frames + 5} frames {conv.errors}")
        lat = np.array(conv.latencies_ms[5:])
        return {"step_ms": float(np.mean(steps)), "latency_ms": float(np.mean(lat)),
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "overhead_ms": float(np.mean(lat) - np.mean(steps)), "handshake_ms": conv.handshake_s * 1e3,
                "peak_rss_mb": peak_rss_mb()}


def run(args) -> int:
    import json

    rows, results = [], {}
    for label in CONFIGS:
        print(f"running {label} …", file=sys.stderr)
        r = run_job(ServeJob(label, args.steps))
        results[label] = r
        if "error" in r:
            rows.append([label] + ["n/a"] * 6 + [f"({r['error']})"])
            continue
        rows.append([label, f"{r['step_ms']:.1f}", f"{r['latency_ms']:.1f}", f"{r['p50_ms']:.1f}",
                     f"{r['p99_ms']:.1f}", f"{r['overhead_ms']:+.1f}", f"{r['peak_rss_mb']:.0f}"])
    head = ("config", "file-mode step ms", "websocket latency ms", "p50 ms", "p99 ms", "added per frame ms",
            "peak RSS MB")
    print(table(head, rows) + "\nmoshi-mlx serve on loopback vs DuplexSession.step (file-mode chat) in the same "
          "process, Mimi at full size, random weights; latency = one frame sent → Moshi's frame back (Opus both "
          "ways, client and server), one frame in flight; added = latency − step (target ≤ 10 ms)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0
