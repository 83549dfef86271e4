"""The model worker: every session's frames run on the one thread that loaded the model.

MLX's streams are per thread (and a process that used MLX from a second thread can abort at
exit), so `moshi-mlx serve` keeps the model on the main thread, like `chat`, and runs the
network (aiohttp) on another. Each connection is a `ChatChannel`: a DuplexSession with its
own state on the shared model, inside a LiveLoop (the lag control of `chat`: input frames
beyond `max_lag_frames` and unsent output frames beyond `max_out_frames` are dropped and
counted, so a client sending faster or reading slower than real time cannot grow memory or
latency). The worker steps the channels in turn, one frame each, so that sessions share
the model fairly. Channels are opened and closed through a request queue: sessions are made
and freed on the model's thread too.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from moshi_mlx.sessions.duplex import DuplexSession
from moshi_mlx.sessions.live import LiveLoop


@dataclass
class ChatChannel:
    """One websocket connection's duplex session. `notify` (thread-safe) tells the connection
    that Moshi's frames are waiting in `loop.pop_output()`."""

    id: int
    loop: LiveLoop
    notify: Callable[[], None]
    opened: float = field(default_factory=time.monotonic)


@dataclass
class WorkerStats:
    frames: int = 0  # frames stepped, all sessions
    step_ms: float = 0.0  # moving average of one frame's step (encode + LM + decode)
    sessions_opened: int = 0
    sessions_closed: int = 0
    dropped_in: int = 0  # input frames dropped by lag control, in closed sessions


class ModelWorker:
    """Runs on the model's thread (`run()`); the network thread calls `open_chat`, `push`,
    `close` and `stop`, which only queue requests or append to thread-safe deques."""

    def __init__(self, model, gen_defaults: dict, max_lag_frames: int = 2, max_out_frames: int = 25):
        self.model = model  # models.loading.LoadedModel
        self.gen_defaults = dict(gen_defaults)
        self.max_lag_frames, self.max_out_frames = max_lag_frames, max_out_frames
        self.channels: dict[int, ChatChannel] = {}
        self.stats = WorkerStats()
        self._requests: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_id = 0

    # -- network thread --------------------------------------------------------------------------
    def open_chat(self, gen_overrides: dict, notify: Callable[[], None]) -> concurrent.futures.Future:
        """A future ChatChannel (its session is made on the model's thread)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put(("open", (gen_overrides, notify), future))
        self._wake.set()
        return future

    def push(self, channel: ChatChannel, pcm: np.ndarray) -> None:
        """The user's audio (24 kHz float32, any length) for a channel."""
        channel.loop.push_input(pcm)
        self._wake.set()

    def close(self, channel: ChatChannel) -> None:
        self._requests.put(("close", channel.id, None))
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- model thread ----------------------------------------------------------------------------
    def warm_up(self, frames: int = 4) -> None:
        """Compile and allocate before the first client: its first frames are then on time."""
        session = self._new_session({})
        for _ in range(frames):
            session.step(np.zeros(session.frame_size, np.float32))

    def run(self) -> None:
        """Until stop(): handle requests, then step each channel that has a frame waiting."""
        while not self._stop.is_set():
            self._handle_requests()
            worked = False
            for channel in list(self.channels.values()):
                if channel.loop.process_one():
                    worked = True
                    stats = self.stats
                    stats.frames += 1
                    stats.step_ms = channel.loop.step_ms if stats.frames == 1 else (
                        0.9 * stats.step_ms + 0.1 * channel.loop.step_ms)
                    channel.notify()
            if not worked:
                self._wake.wait(0.01)
                self._wake.clear()
        self._handle_requests()
        self.channels.clear()

    def _new_session(self, gen_overrides: dict) -> DuplexSession:
        m = self.model
        return DuplexSession(m.lm, m.mimi, m.tokenizer, **{**self.gen_defaults, **gen_overrides})

    def _handle_requests(self) -> None:
        while True:
            try:
                kind, arg, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if kind == "open":
                gen_overrides, notify = arg
                try:
                    loop = LiveLoop(self._new_session(gen_overrides), max_lag_frames=self.max_lag_frames,
                                    max_out_frames=self.max_out_frames)
                except Exception as e:  # noqa: BLE001 - reported to the client that asked
                    future.set_exception(e)
                    continue
                self._next_id += 1
                channel = ChatChannel(self._next_id, loop, notify)
                self.channels[channel.id] = channel
                self.stats.sessions_opened += 1
                if not future.set_running_or_notify_cancel():  # the client left while waiting
                    del self.channels[channel.id]
                    self.stats.sessions_closed += 1
                    continue
                future.set_result(channel)
            elif kind == "close" and (channel := self.channels.pop(arg, None)) is not None:
                self.stats.sessions_closed += 1
                self.stats.dropped_in += channel.loop.dropped_in
