"""Transcripts as text, JSON, SRT and WebVTT.

Subtitle cues group a few words and break at sentence ends and pauses. A word's time span
runs from the boundary before it to the boundary after it (see sessions/words.py), so it
includes any silence that follows the word: a long word span *is* a pause, and a cue shows
its last word for at most `LINGER` seconds rather than through the silence.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moshi_mlx.sessions.words import Word

if TYPE_CHECKING:  # importing the session would import MLX, and `transcribe --help` must not
    from moshi_mlx.sessions.stt import Transcript

FORMATS = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}
MAX_WORDS = 8
MAX_CHARS = 42  # one subtitle line (the usual broadcast limit)
PAUSE = 1.0  # a word span longer than this ends with a pause: the cue ends there
LINGER = 1.0
MIN_CUE = 0.1


@dataclass
class Cue:
    start: float
    end: float
    text: str


def cues(words: list[Word]) -> list[Cue]:
    """Words → non-overlapping cues, in order, each at least MIN_CUE long where room allows."""
    groups: list[list[Word]] = []
    for w in words:
        current = groups[-1] if groups else None
        if current is None or _cue_full(current, w):
            groups.append([w])
        else:
            current.append(w)
    out = []
    for i, group in enumerate(groups):
        first, last = group[0], group[-1]
        end = min(last.end if last.end is not None else last.start, last.start + LINGER)
        end = max(end, first.start + MIN_CUE)
        if i + 1 < len(groups):
            end = min(end, groups[i + 1][0].start)
        out.append(Cue(first.start, max(end, first.start), " ".join(w.text for w in group)))
    return out


def _cue_full(group: list[Word], word: Word) -> bool:
    last = group[-1]
    if len(group) >= MAX_WORDS or len(" ".join(w.text for w in group + [word])) > MAX_CHARS:
        return True
    if last.text.endswith((".", "?", "!")):
        return True
    return last.end is not None and last.end - last.start > PAUSE


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: Transcript) -> str:
    blocks = [f"{i}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{c.text}\n"
              for i, c in enumerate(cues(t.words), 1)]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = [f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{c.text}\n" for c in cues(t.words)]
    return "\n".join(["WEBVTT\n"] + blocks)


def to_dict(t: Transcript, model: str, source: str, vad: bool) -> dict:
    d = {"file": source, "model": model, "duration": round(t.duration, 3), "text": t.text,
         "words": [{"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3)} for w in t.words]}
    if vad:
        d["end_of_turns"] = [round(x, 3) for x in t.end_of_turns]
    return d


def render(t: Transcript, fmt: str, model: str, source: str, vad: bool) -> str:
    if fmt == "json":
        return json.dumps(to_dict(t, model, source, vad), ensure_ascii=False, indent=1) + "\n"
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    return t.text.strip() + "\n"
