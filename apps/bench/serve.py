"""`moshi-mlx bench serve`: what the websocket and Opus path of `moshi-mlx serve` add to a
frame, measured against file-mode chat (DuplexSession.step) on the same model in the same
process. `--stt`: streaming STT over /api/asr-streaming with 1, 4 and 8 concurrent clients
against one in-process stream; `--tts`: time to first audio over /api/tts_streaming against
the in-process TtsStream. Random weights in Kyutai's stt-1b and tts-1.6b shapes, 4-bit.

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
        import time

        import mlx.core as mx

        from moshi_mlx.models.lm import LmConfig, LMModel
        from moshi_mlx.models.mimi import MimiModel
        from moshi_mlx.sessions.duplex import DuplexSession

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
        network, url = _serve(worker)
        result: dict = {}
        _client_thread(worker, lambda: converse(url + "api/chat", pcm, window=1, settle_s=60), result)
        network.stop()
        if "error" in result:
            raise RuntimeError(result["error"])
        conv = result["value"]
        if conv.errors or conv.frames < frames + 5:
            raise RuntimeError(f"server answered {conv.frames} of {frames + 5} frames {conv.errors}")
        lat = np.array(conv.latencies_ms[5:])
        return {"step_ms": float(np.mean(steps)), "latency_ms": float(np.mean(lat)),
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "overhead_ms": float(np.mean(lat) - np.mean(steps)), "handshake_ms": conv.handshake_s * 1e3,
                "peak_rss_mb": peak_rss_mb()}


def _serve(worker):
    """The app of `moshi-mlx serve` for `worker`, listening on a free loopback port."""
    from ..server.app import NetworkThread, ServerConfig, make_app

    network = NetworkThread(make_app(ServerConfig(model_name="bench", max_sessions=16), worker), "127.0.0.1", 0)
    network.start()
    network.started.wait(30)
    if network.error:
        raise RuntimeError(network.error)
    return network, network.url.replace("http://localhost", "ws://127.0.0.1")


def _client_thread(worker, coro_factory, result: dict):
    """Runs the clients on their own event loop while this (the model's) thread runs the worker."""
    import asyncio
    import threading

    def client() -> None:
        try:
            result["value"] = asyncio.run(coro_factory())
        except Exception as e:  # noqa: BLE001 - reported by the job
            result["error"] = repr(e)
        finally:
            worker.stop()

    thread = threading.Thread(target=client)
    thread.start()
    worker.run()
    thread.join()


@dataclass
class SttServeJob:
    seconds: float
    clients: tuple[int, ...] = (1, 4, 8)

    def run(self) -> dict:
        import asyncio
        import time

        import msgpack

        from ..server.worker import ModelWorker
        from .asr import _audio, build_stt

        stt = build_stt("1b", 4)
        pcm = _audio("", self.seconds)
        for _ in range(2):  # the first run warms up (allocation, first calls): the second is timed
            t0 = time.perf_counter()
            stream = stt.stream()
            for i in range(0, len(pcm), 1920):
                stream.step(pcm[i:i + 1920])
            inproc = len(pcm) / 24000 / (time.perf_counter() - t0)
        out: dict = {"in_process_rtf": inproc, "clients": {}}
        delay = stt.config.steps_of_delay

        async def one(url: str) -> float:
            import aiohttp

            def pack(m):
                return msgpack.packb(m, use_bin_type=True, use_single_float=True)
            async with aiohttp.ClientSession() as session, session.ws_connect(url + "api/asr-streaming") as ws:
                await ws.receive()  # Ready
                t = time.perf_counter()
                for i in range(0, len(pcm), 1920):
                    await ws.send_bytes(pack({"type": "Audio", "pcm": pcm[i:i + 1920].tolist()}))
                await ws.send_bytes(pack({"type": "Marker", "id": 1}))
                for _ in range(delay + 2):  # the flush: silence until the marker is back
                    await ws.send_bytes(pack({"type": "Audio", "pcm": [0.0] * 1920}))
                async for msg in ws:
                    if msgpack.unpackb(msg.data)["type"] == "Marker":
                        return len(pcm) / 24000 / (time.perf_counter() - t)
            raise RuntimeError("no marker")

        for n in self.clients:
            worker = ModelWorker(None, {}, speech={"stt": stt})
            network, url = _serve(worker)
            result: dict = {}

            async def many():
                return await asyncio.gather(*[one(url) for _ in range(n)])
            _client_thread(worker, many, result)
            network.stop()
            if "error" in result:
                raise RuntimeError(result["error"])
            out["clients"][n] = min(result["value"])
        out["peak_rss_mb"] = peak_rss_mb()
        return out


@dataclass
class TtsServeJob:
    def run(self) -> dict:
        import time

        import msgpack

        from ..server.worker import ModelWorker
        from .tts import TEXT, build_tts

        tts = build_tts(4)
        for _ in range(2):  # the first run warms up (allocation, first calls): the second is timed
            t0 = time.perf_counter()
            stream = tts.stream(None, seed=0)
            stream.push(TEXT)
            stream.close()
            while stream.step()[0] is None:
                pass
            inproc = time.perf_counter() - t0
        worker = ModelWorker(None, {}, speech={"tts": tts})
        network, url = _serve(worker)

        async def first_audio() -> float:
            import aiohttp

            async with aiohttp.ClientSession() as session, session.ws_connect(
                    url + "api/tts_streaming?format=PcmMessagePack&voice=none&seed=0") as ws:
                await ws.receive()  # Ready
                t = time.perf_counter()
                await ws.send_bytes(msgpack.packb({"type": "Text", "text": TEXT}, use_bin_type=True))
                await ws.send_bytes(msgpack.packb({"type": "Eos"}, use_bin_type=True))
                async for msg in ws:
                    if msgpack.unpackb(msg.data)["type"] == "Audio":
                        return time.perf_counter() - t
            raise RuntimeError("no audio")

        result: dict = {}
        _client_thread(worker, first_audio, result)
        network.stop()
        if "error" in result:
            raise RuntimeError(result["error"])
        return {"in_process_s": inproc, "websocket_s": result["value"], "peak_rss_mb": peak_rss_mb()}


def run_speech(args) -> int:
    if args.stt:
        print("running stt-1b q4 over /api/asr-streaming …", file=sys.stderr)
        r = run_job(SttServeJob(args.seconds))
        if "error" in r:
            print(f"stt: n/a ({r['error']})")
        else:
            rows = [[str(n), f"{rtf:.2f}", f"{r['in_process_rtf']:.2f}"] for n, rtf in r["clients"].items()]
            real_time = [int(n) for n, rtf in r["clients"].items() if rtf >= 1.0]
            print(table(("clients", "× real time (slowest client)", "in-process stream × real time"), rows))
            print(f"highest concurrency that stays real time: {max(real_time) if real_time else 'none'} "
                  f"(stt-1b shape, q4, random weights, {args.seconds:.0f} s of audio per client, sent at once then "
                  "a Marker; time to the Marker)")
    if args.tts:
        print("running tts-1.6b q4 over /api/tts_streaming …", file=sys.stderr)
        r = run_job(TtsServeJob())
        if "error" in r:
            print(f"tts: n/a ({r['error']})")
        else:
            print(table(("tts-1.6b q4", "first audio s", "peak RSS MB"),
                        [["websocket (text + Eos → first Audio)", f"{r['websocket_s']:.2f}", f"{r['peak_rss_mb']:.0f}"],
                         ["in-process TtsStream", f"{r['in_process_s']:.2f}", ""]]))
    return 0


def run(args) -> int:
    import json

    if getattr(args, "stt", False) or getattr(args, "tts", False):
        return run_speech(args)

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
