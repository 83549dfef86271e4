"""A minimal client of Kyutai's `/api/chat` protocol, for `moshi-mlx bench serve` and the tests.

`converse(url, pcm)` streams a recording as Ogg/Opus, one 80 ms frame at a time, and
collects Moshi's audio and text. `window` bounds the frames in flight (sent, not yet
answered), so the client runs as fast as the server allows without outrunning its lag
control (window <= the server's max lag: nothing is dropped); the time from sending frame i
to receiving Moshi's frame i is the end-to-end latency.
`realtime` instead paces the frames at 80 ms, as a microphone does.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from . import protocol as P

FRAME = 1920
RATE = 24000


@dataclass
class Conversation:
    sent_ogg: list[bytes] = field(default_factory=list)  # the pages sent, in order (what the server decoded)
    audio_chunks: list[np.ndarray] = field(default_factory=list)  # Moshi's decoded audio, as received
    samples: int = 0  # in audio_chunks
    text: list[str] = field(default_factory=list)  # Moshi's text pieces
    latencies_ms: list[float] = field(default_factory=list)  # frame i sent → Moshi's frame i received
    errors: list[str] = field(default_factory=list)  # ERROR messages from the server
    handshake_s: float = 0.0  # connect → handshake

    @property
    def frames(self) -> int:
        return self.samples // FRAME

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.audio_chunks) if self.audio_chunks else np.zeros(0, np.float32)


async def converse(url: str, pcm: np.ndarray, window: int = 2, realtime: bool = False,
                   headers: dict | None = None, settle_s: float = 10.0) -> Conversation:
    import aiohttp
    import sphn

    frames = [pcm[i:i + FRAME] for i in range(0, len(pcm) - FRAME + 1, FRAME)]
    conv = Conversation()
    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    sent_at: list[float] = []
    received = asyncio.Event()
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=headers, max_msg_size=1 << 22) as ws:

            async def receive() -> None:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                        continue
                    kind, payload = msg.data[0], msg.data[1:]
                    if kind == P.HANDSHAKE:
                        conv.handshake_s = time.perf_counter() - t0
                        received.set()
                    elif kind == P.AUDIO:
                        pcm = reader.append_bytes(payload)
                        conv.audio_chunks.append(pcm)
                        conv.samples += len(pcm)
                        now = time.perf_counter()
                        while len(conv.latencies_ms) < min(conv.frames, len(sent_at)):
                            conv.latencies_ms.append((now - sent_at[len(conv.latencies_ms)]) * 1e3)
                        received.set()
                    elif kind == P.TEXT:
                        conv.text.append(payload.decode("utf-8"))
                    elif kind == P.ERROR:
                        conv.errors.append(payload.decode("utf-8", "replace"))
                        received.set()

            receiver = asyncio.create_task(receive())
            await _wait_for(received, lambda: conv.handshake_s > 0 or conv.errors or receiver.done(), settle_s)
            if conv.errors or receiver.done():
                receiver.cancel()
                return conv
            for i, frame in enumerate(frames):
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + conv.handshake_s + i * FRAME / RATE - time.perf_counter()))
                else:
                    await _wait_for(received, lambda: conv.frames > i - window or receiver.done(), settle_s)
                if receiver.done():
                    break
                ogg = writer.append_pcm(np.asarray(frame, np.float32))
                sent_at.append(time.perf_counter())
                if len(ogg):
                    conv.sent_ogg.append(ogg)
                    await ws.send_bytes(P.message(P.AUDIO, ogg))
            await _wait_for(received, lambda: conv.frames >= len(frames) or receiver.done(), settle_s)
            receiver.cancel()
    return conv


async def _wait_for(event: asyncio.Event, done, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not done():
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), left)
        except asyncio.TimeoutError:
            return
