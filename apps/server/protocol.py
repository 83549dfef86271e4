"""Kyutai's duplex websocket protocol (`/api/chat`, kyutai-labs/moshi rust/protocol.md).

Every websocket message is binary: one kind byte, then the payload. The server sends
HANDSHAKE once the session is ready, then AUDIO (Ogg/Opus pages, 24 kHz mono) and TEXT
(UTF-8 pieces, '▁' already rendered as a space) as Moshi produces them; the client sends
AUDIO. ERROR carries a UTF-8 message. The other kinds are defined by the protocol but
unused in streaming: a receiver ignores them.
"""
from __future__ import annotations

HANDSHAKE = 0x00
AUDIO = 0x01
TEXT = 0x02
CONTROL = 0x03
METADATA = 0x04
ERROR = 0x05
PING = 0x06
COLORED_TEXT = 0x07
KNOWN_KINDS = frozenset(range(8))


class ProtocolError(ValueError):
    """A message the protocol does not allow (the connection is closed with an ERROR)."""


def message(kind: int, payload: bytes | str = b"") -> bytes:
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return bytes([kind]) + payload


def parse(data: bytes) -> tuple[int, bytes]:
    """(kind, payload) of a received message."""
    if not data:
        raise ProtocolError("empty message (expected a kind byte, then the payload)")
    kind = data[0]
    if kind not in KNOWN_KINDS:
        raise ProtocolError(f"unknown message kind 0x{kind:02x}")
    return kind, data[1:]
