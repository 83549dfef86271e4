"""The model worker: every session's frames run on the one thread that loaded the models.

MLX's streams are per thread (and a process that used MLX from a second thread can abort at
exit), so `moshi-mlx serve` keeps the models on the main thread, like `chat`, and runs the
network (aiohttp) on another. Each connection is a `Channel` around an engine with its own
state on a shared model: for a conversation, a DuplexSession inside a LiveLoop (the lag
control of `chat`: input frames beyond `max_lag_frames` and unsent output frames beyond
`max_out_frames` are dropped and counted, so a client sending faster or reading slower than
real time cannot grow memory or latency); for speech-to-text and text-to-speech, the
engines of apps.server.speech. The worker steps the channels in turn, one frame each, so
that sessions share the models fairly. Channels are opened and closed through a request
queue: engines are made and freed on the models' thread too.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from moshi_mlx.sessions.duplex import DuplexSession
from moshi_mlx.sessions.live import LiveLoop


class Engine(Protocol):
    """What a channel runs: `process_one()` does one frame's work if there is any (on the
    models' thread) and says whether it did; results wait in the engine for the connection."""

    def process_one(self) -> bool: ...


@dataclass
class Channel:
    """One connection's engine. `notify` (thread-safe) tells the connection that results are
    waiting (for a conversation: Moshi's frames in `engine.pop_output()`)."""

    id: int
    engine: Engine
    notify: Callable[[], None]
    kind: str = "chat"
    opened: float = field(default_factory=time.monotonic)


@dataclass
class WorkerStats:
    frames: int = 0  # frames stepped, all sessions
    step_ms: float = 0.0  # moving average of one frame's step (encode + LM + decode)
    sessions_opened: int = 0
    sessions_closed: int = 0
    dropped_in: int = 0  # input frames dropped by lag control, in closed sessions


class ModelWorker:
    """Runs on the models' thread (`run()`); the network thread calls `open_chat`, `open`,
    `push`, `close` and `stop`, which only queue requests or append to thread-safe deques.
    `model`: the conversation model (models.loading.LoadedModel) or None; `speech`: other
    models by name (the SpeechToText, the TextToSpeech) for `open`'s factories."""

    def __init__(self, model, gen_defaults: dict, max_lag_frames: int = 2, max_out_frames: int = 25,
                 speech: dict | None = None):
        self.model = model
        self.speech = dict(speech or {})
        self.gen_defaults = dict(gen_defaults)
        self.max_lag_frames, self.max_out_frames = max_lag_frames, max_out_frames
        self.channels: dict[int, Channel] = {}
        self.stats = WorkerStats()
        self._requests: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_id = 0

    # -- network thread --------------------------------------------------------------------------
    def open_chat(self, gen_overrides: dict, notify: Callable[[], None]) -> concurrent.futures.Future:
        """A future conversation Channel (its session is made on the models' thread)."""
        def make() -> LiveLoop:
            return LiveLoop(self._new_session(gen_overrides), max_lag_frames=self.max_lag_frames,
                            max_out_frames=self.max_out_frames)
        return self.open(make, notify, "chat")

    def open(self, make: Callable[[], Engine], notify: Callable[[], None], kind: str) -> concurrent.futures.Future:
        """A future Channel whose engine `make()` builds on the models' thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put(("open", (make, notify, kind), future))
        self._wake.set()
        return future

    def push(self, channel: Channel, pcm: np.ndarray) -> None:
        """The user's audio (24 kHz float32, any length) for a conversation."""
        channel.engine.push_input(pcm)
        self._wake.set()

    def wake(self) -> None:
        """New input for some engine (the engines' own methods queue it)."""
        self._wake.set()

    def close(self, channel: Channel) -> None:
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
                t0 = time.perf_counter()
                if channel.engine.process_one():
                    worked = True
                    ms = (time.perf_counter() - t0) * 1e3
                    stats = self.stats
                    stats.frames += 1
                    stats.step_ms = ms if stats.frames == 1 else 0.9 * stats.step_ms + 0.1 * ms
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
                make, notify, channel_kind = arg
                try:
                    engine = make()
                except Exception as e:  # noqa: BLE001 - reported to the client that asked
                    future.set_exception(e)
                    continue
                self._next_id += 1
                channel = Channel(self._next_id, engine, notify, channel_kind)
                self.channels[channel.id] = channel
                self.stats.sessions_opened += 1
                if not future.set_running_or_notify_cancel():  # the client left while waiting
                    del self.channels[channel.id]
                    self.stats.sessions_closed += 1
                    continue
                future.set_result(channel)
            elif kind == "close" and (channel := self.channels.pop(arg, None)) is not None:
                self.stats.sessions_closed += 1
                self.stats.dropped_in += getattr(channel.engine, "dropped_in", 0)
