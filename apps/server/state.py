"""What the handlers of `moshi-mlx serve` share: its settings, its services (one per loaded
model) and their counters, stored on the aiohttp app under STATE."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .worker import ModelWorker

# An Ogg/Opus page of the browser's encoder (2 frames of 20 ms) is a few hundred bytes. A
# larger message gets an ERROR and a close; beyond HARD_MAX_MESSAGE_BYTES aiohttp closes the
# socket itself (code 1009) without reading the rest, so no message can exhaust memory.
MAX_MESSAGE_BYTES = 64 * 1024
HARD_MAX_MESSAGE_BYTES = 1024 * 1024
# A client silent this long (no audio, no pong) is dropped, freeing its session.
HEARTBEAT_SECONDS = 10.0


@dataclass
class ServerConfig:
    model_name: str  # what health reports: the models loaded
    max_sessions: int = 1  # per service
    host: str = "127.0.0.1"
    allow_origins: tuple[str, ...] = ()
    max_message_bytes: int = MAX_MESSAGE_BYTES
    api_keys: tuple[str, ...] = ()  # the speech services' keys (none: no authentication)
    voice_dir: Path | None = None  # TTS voices by name, before kyutai/tts-voices
    tts_defaults: dict = field(default_factory=lambda: {"cfg": 2.0, "temp": 0.6, "seed": None})


@dataclass
class Service:
    """One endpoint's model (chat: the worker's own; stt: SpeechToText; tts: TextToSpeech)."""

    name: str
    model: object
    max_sessions: int
    active: int = 0
    refused: int = 0


@dataclass
class ServerState:
    config: ServerConfig
    worker: ModelWorker
    services: dict[str, Service] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    refused_origin: int = 0
    protocol_errors: int = 0


STATE = web.AppKey("state", ServerState)
