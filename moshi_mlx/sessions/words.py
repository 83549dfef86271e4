"""From an STT model's text stream to words with times, and from its pause probabilities to
end-of-turn events. Pure Python: no model, so the rules are testable on hand-built tokens.

The text stream has one token per 80 ms step. Token 3 is padding (nothing new is said)
and token 0 marks a word boundary; other tokens are sentencepiece pieces of the word being
said, the text lagging the audio by the model's delay. The timing rule is the one of
Kyutai's STT server (moshi-server `asr.rs`, which is what Unmute and other clients get):

- with n the 1-based count of steps done, steps with n < `delay_steps` are ignored (their
  text predates the audio);
- a piece is appended to the pending word; padding or a boundary after pieces emits
  `Word(text, start=last_stop)` (the word is complete: it starts where the previous one
  stopped);
- a boundary at step n stops the open word at
  `(n - delay_steps) / 12.5` s: `EndWord(stop)`, and that time becomes `last_stop`.

So a word spans from the boundary that precedes it to the boundary that follows it; the
times are shifted by `offset` (the silence an offline run prepends) and never negative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

FRAME_RATE = 12.5  # steps per second
PAD_TOKEN = 3
BOUNDARY_TOKEN = 0


@dataclass
class Word:
    """A word. Streams emit it as soon as it is complete, with `end` None (its end is the next
    `EndWord`); transcripts carry the end time."""

    text: str
    start: float
    end: float | None = None
    stream: int = 0  # which member of a batch of streams


@dataclass
class EndWord:
    stop: float
    stream: int = 0


@dataclass
class EndOfTurn:
    """The speaker has finished their turn (semantic VAD): `time` is when it was decided."""

    time: float
    stream: int = 0


Event = Word | EndWord | EndOfTurn


class WordTimer:
    """The timing rule of the module docstring, for one stream: `push(token)` per step."""

    def __init__(self, decode: Callable[[list[int]], str], delay_steps: int, offset: float = 0.0,
                 stream: int = 0):
        self.decode, self.delay_steps, self.offset, self.stream = decode, delay_steps, offset, stream
        self.steps = 0
        self.pieces: list[int] = []
        self.open = False  # a Word was emitted and its EndWord not yet
        self.last_stop = 0.0
        self.limit: float | None = None  # the audio's length, once known (times stay within)

    def time(self, steps: int) -> float:
        """Seconds into the caller's audio when `steps` steps are done."""
        t = max(0.0, (steps - self.delay_steps) / FRAME_RATE - self.offset)
        return t if self.limit is None else min(t, self.limit)

    def clock(self) -> float:
        """Seconds into the caller's audio that the steps done have heard."""
        t = max(0.0, self.steps / FRAME_RATE - self.offset)
        return t if self.limit is None else min(t, self.limit)

    def push(self, token: int) -> list[Event]:
        self.steps += 1
        if self.steps < self.delay_steps:
            return []
        events: list[Event] = []
        if token in (PAD_TOKEN, BOUNDARY_TOKEN):
            events += self._complete_word()
        else:
            self.pieces.append(int(token))
        if token == BOUNDARY_TOKEN:
            stop = self.time(self.steps)
            if self.open:
                events.append(EndWord(stop, self.stream))
                self.open = False
            self.last_stop = stop
        return events

    def _complete_word(self) -> list[Event]:
        # Pieces that decode to nothing (control tokens) make no word.
        text = self.decode(self.pieces).strip() if self.pieces else ""
        self.pieces = []
        if not text:
            return []
        self.open = True
        return [Word(text, self.last_stop, None, self.stream)]

    def finish(self, end: float) -> list[Event]:
        """The end of the audio: the pending pieces become a word and the open word ends at
        `end` (Kyutai's offline alignment caps a last word at one second)."""
        events = self._complete_word()
        if self.open:
            events.append(EndWord(max(self.last_stop, min(end, self.last_stop + 1.0)), self.stream))
            self.open = False
        return events


def words_from_events(events: Sequence[Event]) -> list[Word]:
    """Words with their end times: each `EndWord` ends the words emitted since the last one."""
    words: list[Word] = []
    waiting: list[Word] = []
    for e in events:
        if isinstance(e, Word):
            w = Word(e.text, e.start, e.end, e.stream)
            words.append(w)
            waiting.append(w)
        elif isinstance(e, EndWord):
            for w in waiting:
                w.end = max(e.stop, w.start)
            waiting = []
    for w in waiting:  # a stream cut short: the word ends where it starts
        w.end = w.start
    return words


@dataclass
class TurnConfig:
    """Unmute's end-of-turn rule on the semantic-VAD heads: an exponential moving average of
    head `head`'s pause probability (half-life `half_life` s, starting at 1), ignoring the
    first `ignore_steps` steps; a turn ends when it exceeds `threshold` after a word."""

    head: int = 2  # horizons 0.5, 1, 2, 3 s: Unmute uses the 2 s head
    threshold: float = 0.6
    half_life: float = 0.01
    ignore_steps: int = 12


class TurnDetector:
    """`push(pause_prob, now, words_said)` per step → an `EndOfTurn` or None."""

    def __init__(self, config: TurnConfig | None = None, stream: int = 0):
        self.config = config or TurnConfig()
        self.stream = stream
        self.value = 1.0
        self.steps = 0
        self.speaking = False  # a word was said since the last end of turn

    def heard_word(self) -> None:
        self.speaking = True

    def push(self, pause_probs: Sequence[float], now: float) -> EndOfTurn | None:
        cfg = self.config
        self.steps += 1
        alpha = 1.0 - math.exp(-math.log(2) / (FRAME_RATE * cfg.half_life))
        self.value += alpha * (float(pause_probs[cfg.head]) - self.value)
        if self.steps <= cfg.ignore_steps or not self.speaking or self.value <= cfg.threshold:
            return None
        self.speaking = False
        return EndOfTurn(now, self.stream)
