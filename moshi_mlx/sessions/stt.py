"""Speech-to-text with Kyutai's delayed-streams STT models (kyutai/stt-1b-en_fr, stt-2.6b-en).

An STT model is the Moshi LM with no depformer (dep_q = 0): each 80 ms step reads the 32
Mimi codebooks of one frame and emits one text token, the text lagging the audio by the
model's `audio_delay_seconds`. Semantics follow `moshi.run_inference` (0.2.13), which is
what aligns PyTorch with Kyutai's MLX and Rust servers:

- the audio is left-padded with `audio_silence_prefix_seconds` of silence and right-padded
  with `audio_delay_seconds + 1.0` s so that the last words come out; only whole 1920-sample
  frames are fed;
- the first frame is stepped twice: LMGen replaces the inputs of its very first step by
  the initial tokens, so without the repeat the first frame would never be seen;
- greedy decoding (Kyutai's `lm_gen_config` for STT: temp 0).

There is no step limit: the KV cache wraps at the model's context. Each stream owns its
Mimi and LM state; any number run on one loaded model. When the checkpoint has extra heads
(semantic VAD), each step also gives their softmax probabilities: class 0 is the
probability that the speaker has paused (see words.py for words, times and turns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import CheckpointError, InputError
from .lmgen import LMGen
from .words import FRAME_RATE, EndOfTurn, Event, TurnConfig, TurnDetector, Word, WordTimer, words_from_events

AudioSource = np.ndarray | str | Path
ENCODE_FRAMES = 16  # frames Mimi encodes per call when that much audio is at hand


@dataclass
class Transcript:
    tokens: np.ndarray  # [steps] int: one text token per step, as the reference produces them
    text: str
    words: list[Word]
    pause_prob: np.ndarray | None  # [steps, heads] class-0 probability of each VAD head (None: no heads)
    end_of_turns: list[float] = field(default_factory=list)  # seconds (semantic VAD; [] without heads)
    duration: float = 0.0  # seconds of input audio


@dataclass(frozen=True)
class SttConfig:
    """The `stt_config` of an STT checkpoint's config.json."""

    audio_delay_seconds: float
    audio_silence_prefix_seconds: float = 0.0
    # Steps whose text predates the audio (Kyutai's server: `asr_delay_in_tokens`); by default
    # the delay in whole steps.
    delay_steps: int | None = None

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> "SttConfig":
        """From a checkpoint's LM config; missing or contradictory fields are refused by name."""
        kind = config.get("model_type") or "moshi"
        if config.get("dep_q", 8) != 0:
            if kind == "stt":
                raise CheckpointError(f"{source}: model_type is \"stt\" but dep_q is {config['dep_q']} (an STT "
                                      f"model has no depformer, dep_q 0)")
            raise InputError(f"{source}: this is a {'speech-to-speech Moshi' if kind == 'moshi' else kind} "
                             f"model (it has a depformer), not a speech-to-text one: use `moshi-mlx "
                             f"{'chat' if kind == 'moshi' else kind}` with it")
        if kind != "stt":
            raise CheckpointError(f"{source}: model_type is {kind!r} but the model has no depformer (dep_q 0); "
                                  f"an STT checkpoint says \"stt\"")
        stt = config.get("stt_config")
        if not isinstance(stt, dict):
            raise CheckpointError(f"{source}: model_type \"stt\" needs stt_config "
                                  f"{{audio_delay_seconds, audio_silence_prefix_seconds}}")
        values = {}
        for name, required in (("audio_delay_seconds", True), ("audio_silence_prefix_seconds", False)):
            v = stt.get(name, None if required else 0.0)
            if v is None:
                raise CheckpointError(f"{source}: stt_config lacks {name}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 60:
                raise CheckpointError(f"{source}: stt_config.{name} must be seconds in [0, 60), got {v!r}")
            values[name] = float(v)
        delay_steps = stt.get("asr_delay_in_tokens")
        if delay_steps is not None and (not isinstance(delay_steps, int) or delay_steps < 0):
            raise CheckpointError(f"{source}: stt_config.asr_delay_in_tokens must be an integer >= 0, "
                                  f"got {delay_steps!r}")
        return cls(values["audio_delay_seconds"], values["audio_silence_prefix_seconds"], delay_steps)

    @property
    def steps_of_delay(self) -> int:
        if self.delay_steps is not None:
            return self.delay_steps
        return int(round(self.audio_delay_seconds * FRAME_RATE))

    def prefix_samples(self, rate: int) -> int:
        return int(self.audio_silence_prefix_seconds * rate)

    def suffix_samples(self, rate: int) -> int:
        return int((self.audio_delay_seconds + 1.0) * rate)


class SttStream:
    """Live transcription of `batch_size` audio streams fed in lockstep.

    `step(pcm)` takes any number of samples ([n], or [B, n]) at 24 kHz, runs every whole
    frame and returns the events they decided (Word, EndWord, EndOfTurn; `.stream` says
    which member of the batch). `flush()` ends the audio: the delay's worth of silence so
    the last words come out. The stream prepends the model's silence prefix itself.
    """

    def __init__(self, stt: "SpeechToText", batch_size: int = 1, turn: TurnConfig | None = None,
                 keep_history: bool = False):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.stt = stt
        self.batch_size = batch_size
        # Each item must get exactly the codes it gets alone. Where Mimi's encoder computes
        # every row as alone (MimiModel.batch_exact) the batch shares one encode; elsewhere
        # batched products may round differently from single ones, which the nearest-code
        # search can turn into other codes at near-ties: one Mimi stream per item.
        groups = [slice(0, batch_size)] if stt.mimi.batch_exact else [slice(b, b + 1) for b in range(batch_size)]
        self.mimi_groups = [(items, stt.mimi.init_state(items.stop - items.start, max_frames=ENCODE_FRAMES))
                            for items in groups]
        self.gen = LMGen(stt.lm, temp=0.0, temp_text=0.0)
        self.gen.reset(batch_size)
        self.first = True
        cfg, rate = stt.config, stt.sample_rate
        self.buffer = np.zeros((batch_size, cfg.prefix_samples(rate)), np.float32)
        self.samples_in = 0  # per stream, not counting the padding
        offset = cfg.prefix_samples(rate) / rate
        self.timers = [WordTimer(stt.decode, cfg.steps_of_delay, offset, b) for b in range(batch_size)]
        self.turns = [TurnDetector(turn, b) for b in range(batch_size)] if stt.lm.extra_heads else None
        self.last_tokens: np.ndarray | None = None  # [B] the last step's text tokens
        self.last_probs: np.ndarray | None = None  # [B, heads, classes] the last step's VAD probabilities
        self.history: list[tuple[np.ndarray, np.ndarray | None]] | None = [] if keep_history else None
        self.flushed = False

    def step(self, pcm: np.ndarray) -> list[Event]:
        if self.flushed:
            raise InputError("this stream was flushed: start a new one with stt.stream()")
        x = np.asarray(pcm, np.float32)
        if x.ndim == 1 and self.batch_size == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[0] != self.batch_size:
            raise InputError(f"pcm must be [{self.batch_size}, samples]"
                             f"{' or [samples]' if self.batch_size == 1 else ''}, got shape {list(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise InputError("pcm contains NaN or Inf samples")
        self.samples_in += x.shape[1]
        self.buffer = np.concatenate([self.buffer, x], axis=1)
        frame = self.stt.frame_size
        events: list[Event] = []
        whole = self.buffer.shape[1] // frame * frame
        for i in range(0, whole, ENCODE_FRAMES * frame):
            events += self.step_frames(self.buffer[:, i:min(whole, i + ENCODE_FRAMES * frame)])
        self.buffer = self.buffer[:, whole:]
        return events

    def flush(self) -> list[Event]:
        """The end of the audio: right padding (delay + 1 s of silence, whole frames only) and
        the last word closed. The stream takes no audio afterwards."""
        rate = self.stt.sample_rate
        end = self.samples_in / rate
        for timer in self.timers:
            timer.limit = end
        events = self.step(np.zeros((self.batch_size, self.stt.config.suffix_samples(rate)), np.float32))
        self.samples_in -= self.stt.config.suffix_samples(rate)
        self.flushed = True
        for timer in self.timers:
            events += timer.finish(end)
        return events

    def step_frames(self, pcm: np.ndarray, active: Sequence[Sequence[bool]] | None = None) -> list[Event]:
        """k whole frames per stream [B, k·1920] (k <= ENCODE_FRAMES), encoded at once (what
        one frame at a time computes, to float32 rounding, see MimiModel.init_state; a batch
        gives each stream bitwise what it gets alone, fed alike) and stepped one by one.
        `active[t][b]` False: stream b has ended by frame t (its steps run, as the batch is
        in lockstep, but produce no events)."""
        mimi, n = self.stt.mimi, self.stt.num_codebooks
        frames = pcm.shape[1] // self.stt.frame_size
        codes = np.zeros((self.batch_size, n, frames), np.int64)
        for items, state in self.mimi_groups:
            if active is None or any(any(a[items]) for a in active):  # ended streams' codes are never read
                codes[items] = np.array(mimi.encode_step(pcm[items, None], state, num_quantizers=n)[0])
        events: list[Event] = []
        for t in range(codes.shape[-1]):
            events += self.step_codes(codes[:, :, t], None if active is None else active[t])
        return events

    def step_codes(self, codes: np.ndarray, active: Sequence[bool] | None = None) -> list[Event]:
        """The LM half of a step, for a frame's Mimi codes [B, 32] already at hand."""
        if self.first:  # see the module docstring: the first frame is stepped twice
            self.gen.step(codes)
            self.first = False
        tokens = self.gen.step(codes)[:, 0]
        probs = None
        if self.stt.lm.extra_heads:
            probs = np.array(self.stt.lm.extra_head_probs(self.gen.transformer_out))
        self.last_tokens, self.last_probs = tokens, probs
        if self.history is not None:
            self.history.append((tokens, probs))
        events: list[Event] = []
        for b, timer in enumerate(self.timers):
            if active is not None and not active[b]:
                continue
            new = timer.push(int(tokens[b]))
            events += new
            if self.turns is not None:
                turn = self.turns[b]
                if any(isinstance(e, Word) for e in new):
                    turn.heard_word()
                eot = turn.push(probs[b, :, 0], now=timer.clock())
                if eot is not None:
                    events.append(eot)
        return events


class SpeechToText:
    """An STT model with its Mimi and tokenizer, shared by any number of streams."""

    def __init__(self, lm, mimi, tokenizer, config: SttConfig):
        if lm.config.dep_q != 0:
            raise InputError("this checkpoint is a speech-to-speech Moshi model (it has a depformer), not a "
                             "speech-to-text one: use `moshi-mlx chat` with it")
        if mimi.config.num_quantizers < lm.config.n_q:
            raise CheckpointError(f"the LM reads {lm.config.n_q} codebooks, its Mimi has "
                                  f"{mimi.config.num_quantizers}")
        if tokenizer is None:
            raise CheckpointError("an STT model needs its text tokenizer (`tokenizer_name` in config.json)")
        self.lm, self.mimi, self.tokenizer, self.config = lm, mimi, tokenizer, config
        self.num_codebooks = lm.config.n_q
        self.frame_size = mimi.frame_size
        self.sample_rate = mimi.sampling_rate
        self.model_id = ""

    @classmethod
    def from_pretrained(cls, source: str | Path, quantize: int | None = None, revision: str | None = None
                        ) -> "SpeechToText":
        """A directory, repo id or file: Kyutai's PyTorch, -mlx and -candle layouts, or a
        `moshi-mlx convert` output. The config is checked before any weight is loaded."""
        from ..checkpoints import lm as lm_ckpt
        from ..models.loading import load_checkpoint

        ckpt = lm_ckpt.read(source, revision)
        config = SttConfig.from_config(ckpt.config, ckpt.source)
        model = load_checkpoint(ckpt, revision=revision, quantize=quantize)
        stt = cls(model.lm, model.mimi, model.tokenizer, config)
        stt.model_id = ckpt.raw_config.get("model_id") or str(source)
        return stt

    @property
    def has_vad(self) -> bool:
        return bool(self.lm.extra_heads)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def stream(self, batch_size: int = 1, turn: TurnConfig | None = None, keep_history: bool = False) -> SttStream:
        return SttStream(self, batch_size, turn, keep_history)

    def padded(self, pcm: np.ndarray) -> np.ndarray:
        """The silence before and after the audio, and whole frames only (see the docstring)."""
        x = np.concatenate(list(self._padded_blocks([np.asarray(pcm, np.float32)], [0, False])))
        return x[: len(x) // self.frame_size * self.frame_size]

    def _padded_blocks(self, blocks: Iterable[np.ndarray], count: list[int]) -> Iterator[np.ndarray]:
        rate = self.sample_rate
        yield np.zeros(self.config.prefix_samples(rate), np.float32)
        for block in blocks:
            count[0] += len(block)
            yield np.asarray(block, np.float32)
        count[1] = True
        yield np.zeros(self.config.suffix_samples(rate), np.float32)

    def _frames(self, blocks: Iterable[np.ndarray], count: list[int]) -> Iterator[np.ndarray]:
        """Whole frames of the padded audio, read incrementally (bounded memory)."""
        pending = np.zeros(0, np.float32)
        for block in self._padded_blocks(blocks, count):
            pending = np.concatenate([pending, block])
            whole = len(pending) // self.frame_size * self.frame_size
            yield from pending[:whole].reshape(-1, self.frame_size)
            pending = pending[whole:]

    def _blocks(self, audio: AudioSource, quiet: bool) -> Iterable[np.ndarray]:
        if isinstance(audio, (str, Path)):
            from ..audio import iter_audio

            return iter_audio(audio, self.sample_rate, quiet=quiet)
        pcm = np.asarray(audio, np.float32)
        if pcm.ndim != 1:
            raise InputError(f"audio must be mono samples [n] at {self.sample_rate} Hz, got shape {list(pcm.shape)}")
        if not np.all(np.isfinite(pcm)):
            raise InputError("audio contains NaN or Inf samples")
        if pcm.size == 0:
            raise InputError("audio is empty (no samples)")
        return [pcm]

    def transcribe(self, audio: AudioSource, turn: TurnConfig | None = None, quiet: bool = True) -> Transcript:
        """A whole recording (24 kHz mono float32 samples, or any audio file) → Transcript."""
        return self.transcribe_batch([audio], turn=turn, quiet=quiet)[0]

    def transcribe_batch(self, audios: Sequence[AudioSource], turn: TurnConfig | None = None, quiet: bool = True,
                         on_step: Callable[[int], None] | None = None) -> list[Transcript]:
        """Several recordings as one batch (B streams in lockstep, shorter ones ended early):
        the same transcripts as one at a time, faster in total. `on_step(frames)` reports
        progress after each step."""
        n = len(audios)
        counts = [[0, False] for _ in range(n)]  # samples read, read to the end
        frames = [self._frames(self._blocks(a, quiet), c) for a, c in zip(audios, counts)]
        stream = self.stream(n, turn, keep_history=True)
        events: list[list[Event]] = [[] for _ in range(n)]
        steps = [0] * n
        silence = np.zeros(self.frame_size, np.float32)
        alive = [True] * n
        while any(alive):
            chunk, active = [], []  # up to ENCODE_FRAMES frames of every stream
            while len(chunk) < ENCODE_FRAMES:
                row = []
                for i, it in enumerate(frames):
                    frame = next(it, None) if alive[i] else None
                    alive[i] = frame is not None
                    row.append(silence if frame is None else frame)
                if not any(alive):
                    break
                chunk.append(row)
                active.append(list(alive))
            if not chunk:
                break
            for timer, count in zip(stream.timers, counts):
                if count[1]:  # read to its end: times stay within the audio
                    timer.limit = count[0] / self.sample_rate
            pcm = np.stack([np.concatenate(frames_of_stream) for frames_of_stream in zip(*chunk)])
            for e in stream.step_frames(pcm, active):
                events[e.stream].append(e)
            for i in range(n):
                steps[i] += sum(a[i] for a in active)
            if on_step is not None:
                on_step(len(stream.history))
        out = []
        for i in range(n):
            duration = counts[i][0] / self.sample_rate
            if counts[i][0] == 0:
                raise InputError(f"{_name(audios[i])}: no audio samples")
            evs = events[i] + stream.timers[i].finish(duration)
            hist = stream.history[: steps[i]]
            tokens = np.array([int(t[i]) for t, _ in hist], np.int64)
            probs = np.stack([p[i, :, 0] for _, p in hist]) if self.has_vad else None
            words = words_from_events(evs)
            for w in words:
                w.stream = 0
            text = self.decode(tokens.tolist())
            out.append(Transcript(tokens, text, words, probs,
                                  [e.time for e in evs if isinstance(e, EndOfTurn)], duration))
        return out


def _name(audio: AudioSource) -> str:
    return str(audio) if isinstance(audio, (str, Path)) else "audio"
