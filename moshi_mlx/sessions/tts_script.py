"""From a script to the TTS's text stream (Kyutai's `moshi.models.tts`, 0.2.13): words as
entries, and the state machine that feeds them to the model. Pure Python, no model.

The TTS model does not read padded, time-aligned text: it co-generates it. Each step it
predicts whether the next step starts a new word (token 0) or pads (3). The state machine
turns that into the text token actually fed:
- on "new word" it pops the next entry, queues its tokens (fed one per step, padding
  forced meanwhile) and queues the tokens of the entry `second_stream_ahead` words later
  for the look-ahead stream;
- it forces padding for `entry.padding` steps after a word (`padding_between`: clearer
  articulation), and a new word after `max_padding` pads in a row;
- a break (`<break time="1.5s"/>`) is an entry without tokens: that many steps of padding;
- past the last entry it records `end_step`: the generation then runs for the audio delay
  and `final_padding` more steps.
With a look-ahead stream the fed token is `(second + 1) · card + main` (demultiplexed by
the model's text embedding; second = −1 means none).

Scripts arrive whole or word by word (`ScriptParser.push`, as when an LLM streams its
answer): both give the same entries.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

FRAME_RATE = 12.5

# A break tag, or a run of whitespace (Kyutai's regex).
_EVENT = re.compile(r"(?:<break\s+time=\"([0-9]+(?:.[0-9]*)?)s\"\s*/?>)|(?:\s+)")


@dataclass(frozen=True)
class TokenIds:
    """Special text tokens. card = text_card + 1 (the text vocabulary and the initial token),
    the base of the two-stream multiplexing."""

    card: int
    new_word: int = 0
    pad: int = 3
    main: int = 1  # start of a turn of the main speaker
    other: int = 2  # start of a turn of the other speaker
    zero: int = -1  # embeds to zeros
    ungenerated: int = -2


@dataclass
class Entry:
    """One word (its tokens and text), or a break (no tokens); `padding`: pads forced after it."""

    tokens: list[int]
    text: str
    padding: int = 0


def _clean(text: str) -> str:
    return text.replace("’", "'").replace(":", " ").replace("(", "").replace(")", "")


class ScriptParser:
    """Turns of a script → entries, incrementally. `turn(i)` starts turn i (even: the main
    speaker, odd: the other); `push(text)` adds text to the current turn and returns the
    entries it completed (a word is complete once whitespace or a break follows it);
    `end_turn()` completes the last word of the turn."""

    def __init__(self, encode: Callable[[str], list[int]], ids: TokenIds, multi_speaker: bool = True,
                 padding_between: int = 0, frame_rate: float = FRAME_RATE):
        self.encode, self.ids = encode, ids
        self.multi_speaker, self.padding_between, self.frame_rate = multi_speaker, padding_between, frame_rate
        self.last_speaker: int | None = None
        self.turn_index = -1
        self.first_content = True
        self.pending = ""

    def turn(self, index: int) -> list[Entry]:
        out = self.end_turn() if self.turn_index >= 0 else []
        self.turn_index, self.first_content = index, True
        return out

    def _word(self, word: str) -> Entry:
        tokens = self.encode(word)
        if self.first_content:
            speaker = self.turn_index % 2
            if self.multi_speaker and self.last_speaker != speaker:
                self.last_speaker = speaker
                tokens.insert(0, self.ids.main if speaker == 0 else self.ids.other)
            self.first_content = False
        padding = max(0, self.padding_between + len(tokens) - 1) if self.padding_between > 0 else 0
        return Entry(tokens, word, padding)

    def push(self, text: str) -> list[Entry]:
        if self.turn_index < 0:
            self.turn_index = 0
        self.pending += _clean(text)
        return self._drain(final=False)

    def _drain(self, final: bool) -> list[Entry]:
        out = []
        while True:
            match = _EVENT.search(self.pending)
            if match is None:
                break
            # mid-stream, an unfinished tag (`<break time="1` …) waits for its end
            tag = self.pending.rfind("<")
            if not final and tag >= 0 and ">" not in self.pending[tag:] and match.start() > tag:
                break
            word, self.pending = self.pending[: match.start()], self.pending[match.end():]
            if word:
                out.append(self._word(word))
            if match.group(1):
                out.append(Entry([], "", int(round(float(match.group(1)) * self.frame_rate))))
        return out

    def end_turn(self) -> list[Entry]:
        out = self._drain(final=True)
        word, self.pending = self.pending, ""
        return out + ([self._word(word)] if word else [])


def script_to_entries(encode: Callable[[str], list[int]], ids: TokenIds, turns: Sequence[str],
                      multi_speaker: bool = True, padding_between: int = 0) -> list[Entry]:
    """A whole script (turns; the first is the main speaker's, "" to start with the other)."""
    parser = ScriptParser(encode, ids, multi_speaker, padding_between)
    entries: list[Entry] = []
    for i, text in enumerate(turns):
        entries += parser.turn(i)
        entries += parser.push(text)
    return entries + parser.end_turn()


@dataclass
class MachineState:
    entries: deque[Entry]
    remaining_padding: int
    forced_padding: int
    queued: deque[int] = field(default_factory=deque)
    lookahead_queued: deque[int] = field(default_factory=deque)
    end_step: int | None = None
    consumption_times: list[int] = field(default_factory=list)
    transcript: list[tuple[str, int]] = field(default_factory=list)  # (word, step it was consumed)

    def tokens_ahead(self, lookahead: int) -> list[int]:
        for entry in self.entries:
            if entry.tokens:
                lookahead -= 1
                if lookahead == 0:
                    return entry.tokens
        return []

    def words_known(self) -> int:
        return sum(1 for e in self.entries if e.tokens)


@dataclass(frozen=True)
class StateMachine:
    ids: TokenIds
    second_stream_ahead: int = 0
    max_padding: int = 8
    initial_padding: int = 2

    def new_state(self, entries: Sequence[Entry] = ()) -> MachineState:
        return MachineState(deque(entries), self.initial_padding, self.initial_padding)

    def process(self, step: int, state: MachineState, token: int) -> int:
        """The model's predicted text token at `step` → the token to feed."""
        ids = self.ids
        if token not in (ids.new_word, ids.pad):
            token = ids.pad
        if state.queued or state.forced_padding > 0:
            token = ids.pad
        elif state.remaining_padding <= 0:
            token = ids.new_word

        if token == ids.new_word:
            if state.entries:
                entry = state.entries.popleft()
                state.consumption_times.append(step)
                if entry.tokens:
                    state.transcript.append((entry.text, step))
                    state.queued.extend(entry.tokens)
                    if self.second_stream_ahead:
                        state.lookahead_queued.extend(state.tokens_ahead(self.second_stream_ahead))
                    state.remaining_padding = self.max_padding
                else:  # a break: as if the model had padded
                    token = ids.pad
                state.forced_padding = entry.padding
            else:
                token = ids.pad
                if self.second_stream_ahead and state.end_step is None:
                    token = ids.new_word
                if state.end_step is None:
                    state.end_step = step

        if token == ids.pad:
            if state.remaining_padding > 0:
                state.remaining_padding -= 1
            if state.forced_padding > 0:
                state.forced_padding -= 1
            output = state.queued.popleft() if state.queued else ids.pad
        else:
            output = ids.new_word

        if self.second_stream_ahead:
            second = -1
            if output == ids.new_word:
                # the "new word" signal goes on the second stream; the main one moves on
                second = ids.new_word
                output = state.queued.popleft() if state.queued else ids.pad
            elif state.lookahead_queued:
                second = state.lookahead_queued.popleft()
            output = (second + 1) * ids.card + output
        return output

    def ready(self, state: MachineState, closed: bool) -> bool:
        """Whether a step can run now with the same result as with the whole script: the
        text is complete, or a new word here would find its look-ahead word already there."""
        return closed or state.words_known() > self.second_stream_ahead
