"""Text-to-speech with Kyutai's delayed-streams TTS (kyutai/tts-1.6b-en_fr), the semantics of
`moshi.models.tts.TTSModel.generate` (0.2.13).

The TTS is the Moshi LM with conditioners: each 80 ms step it predicts a text token (is a new
word starting?) and, through the depformer, all audio codebooks. The state machine of
tts_script.py decides which text token is fed; the audio lags the text by `audio_delay`
(1.28 s = 16 steps), the acoustic codebooks by 2 more steps. So:
- for the first 16 steps the depformer does not run (its tokens would be discarded);
- codebook q stays "zero" (−1) until step delays[q] + 16;
- the LMGen output frame j holds the text of step j and the audio aligned with it; frames
  16 … are decoded by Mimi, so a word consumed at step s is heard at s / 12.5 seconds;
- past the last word (`end_step`) the generation runs delay + final_padding more steps.
Voices go through cross-attention (5 speaker slots of [T, 512] latents; an empty slot is
the learnt padding), the CFG strength of a CFG-distilled model through a lookup-table
condition ("1.0" … "4.0"); a model without it gets real classifier-free guidance.

Each stream owns its state (state machines, LMGen, Mimi decoders); streams share the
model. Text may arrive while audio is produced: a step runs once the words it could need
are there (see StateMachine.ready), so the output is the same as with the whole text.
"""
from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..checkpoints.voices import read_voice, voice_path
from ..errors import CheckpointError, InputError
from ..modules.conditioners import Conditions, TensorCondition
from .lmgen import LMGen
from .tts_script import FRAME_RATE, Entry, MachineState, ScriptParser, StateMachine, TokenIds
from .words import Word

MAX_SPEAKERS = 5  # Kyutai's TTSModel.max_speakers: speaker slots of the cross-attention source
VOICE_FRAMES = 125  # frames per slot when no voice fills it (10 s of Mimi latents)


@dataclass(frozen=True)
class TtsConfig:
    """What a TTS checkpoint's config.json says about generation."""

    delay_steps: int  # audio delay in steps (int(audio_delay · 12.5), as Kyutai)
    second_stream_ahead: int
    cfg_values: tuple[float, ...]  # CFG strengths of a CFG-distilled model; () = real CFG
    speaker_dim: int | None  # voice latent size (None: no speaker conditioning)
    model_id: dict | None

    @classmethod
    def from_config(cls, config: dict, raw: dict | None = None, source: str = "config.json") -> "TtsConfig":
        kind = config.get("model_type") or "moshi"
        if kind != "tts":
            fits = {"moshi": "chat", "stt": "transcribe"}.get(kind)
            raise InputError(f"{source}: this is a {kind!r} model, not a text-to-speech one"
                             + (f": use `moshi-mlx {fits}` with it" if fits else ""))
        if not config.get("dep_q"):
            raise CheckpointError(f"{source}: model_type \"tts\" but dep_q is 0 (a TTS model generates audio)")
        tts = config.get("tts_config")
        if not isinstance(tts, dict) or "audio_delay" not in tts:
            raise CheckpointError(f"{source}: model_type \"tts\" needs tts_config {{audio_delay, "
                                  f"second_stream_ahead}}")
        delay = tts["audio_delay"]
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay < 60:
            raise CheckpointError(f"{source}: tts_config.audio_delay must be seconds in [0, 60), got {delay!r}")
        ahead = tts.get("second_stream_ahead", 0)
        if not isinstance(ahead, int) or ahead < 0:
            raise CheckpointError(f"{source}: tts_config.second_stream_ahead must be an integer >= 0, got {ahead!r}")
        if ahead and not config.get("demux_second_stream"):
            raise CheckpointError(f"{source}: tts_config.second_stream_ahead needs demux_second_stream")
        if tts.get("multistream"):
            raise CheckpointError(f"{source}: multistream TTS models are not supported")
        conds = config.get("conditioners") or {}
        cfg_values = ()
        if "cfg" in conds:
            cfg_values = tuple(float(v) for v in conds["cfg"].get("lut", {}).get("possible_values", []))
        speaker_dim = None
        if "speaker_wavs" in conds:
            speaker_dim = int(conds["speaker_wavs"].get("tensor", {}).get("dim", 512))
        return cls(int(delay * FRAME_RATE), ahead, cfg_values, speaker_dim, (raw or {}).get("model_id"))

    def check_cfg(self, cfg: float) -> None:
        """A CFG-distilled model knows a few strengths (a condition); otherwise real CFG."""
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not np.isfinite(cfg):
            raise InputError(f"cfg must be a number, got {cfg!r}")
        if self.cfg_values and float(cfg) not in self.cfg_values:
            raise InputError(f"cfg {cfg:g} is not supported by this CFG-distilled model: use one of "
                             f"{', '.join(f'{v:g}' for v in self.cfg_values)}")
        if not self.cfg_values and not 0 < cfg <= 10:
            raise InputError(f"cfg must lie in (0, 10], got {cfg:g}")


@dataclass
class Speech:
    pcm: np.ndarray  # [samples] float32 at sample_rate, in [−1, 1]
    sample_rate: int
    codes: np.ndarray  # [n_q, frames] the audio codes that were decoded
    words: list[Word]
    end_step: int | None = None

    @property
    def duration(self) -> float:
        return len(self.pcm) / self.sample_rate


@dataclass
class _Item:
    """One batch item of a stream: its script parser, state machine state and outputs."""

    parser: ScriptParser
    state: MachineState
    closed: bool = False
    frames: list[np.ndarray] = field(default_factory=list)  # LMGen output frames [1 + dep_q]
    pcm: list[np.ndarray] = field(default_factory=list)
    stop: int | None = None  # steps this item runs alone

    def add(self, entries: list[Entry]) -> None:
        if self.closed:
            raise InputError("text pushed after the end of the text (close())")
        self.state.entries.extend(entries)


class TtsStream:
    """`batch_size` texts synthesized in lockstep, text pushed as it comes.

    push(text, item) / turn(i, item) / close(item) feed the script; `step()` runs one step
    if the text allows it and returns each item's new 80 ms of audio (None where none);
    `audio()` yields item 0's audio until the text runs out (or the end, once closed).
    """

    def __init__(self, tts: "TextToSpeech", batch_size: int = 1, voices: Sequence[object] | None = None,
                 cfg: float = 2.0, temp: float = 0.6, seed: int | None = None, padding_between: int = 1,
                 padding_bonus: float = 0.0, final_padding: int = 4):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.tts = tts
        self.machine = tts.machine
        voices = list(voices) if voices is not None else [None] * batch_size
        if len(voices) != batch_size:
            raise InputError(f"{len(voices)} voices for a batch of {batch_size}")
        conditions = [tts.conditions(v, cfg) for v in voices]
        real_cfg = not tts.config.cfg_values and cfg != 1.0
        # The hooks hold the stream weakly: bound methods would make a cycle (stream → gen →
        # hooks → stream), and a dropped stream would keep its caches and the voice's keys and
        # values (~0.2 GB for tts-1.6b) until the garbage collector's next full pass.
        this = weakref.ref(self)
        self.gen = LMGen(tts.lm, temp=temp, temp_text=temp, cfg_coef=cfg if real_cfg else 1.0,
                         cfg_is_no_text=True, seed=seed, conditions=conditions,
                         on_text_logits_hook=lambda logits: this()._on_text_logits(logits),
                         on_text_hook=lambda text: this()._on_text(text),
                         on_audio_hook=lambda audio: this()._on_audio(audio))
        self.gen.reset(batch_size)
        self.items = [_Item(tts.parser(padding_between), self.machine.new_state()) for _ in range(batch_size)]
        self.padding_bonus, self.final_padding = padding_bonus, final_padding
        self._bonus = None  # the padding bonus as a logits offset
        self.mimi_states = [tts.mimi.init_state(1) for _ in range(batch_size)]
        self.offset = 0
        dep_q = tts.lm.config.dep_q
        self._silent = np.full((batch_size, dep_q), self.machine.ids.zero, np.int64)
        self._audio_start = np.array(tts.lm.config.delays[1:dep_q + 1]) + tts.config.delay_steps

    # -- text in ------------------------------------------------------------------------------
    def push(self, text: str, item: int = 0) -> None:
        it = self.items[item]
        it.add(it.parser.push(text))

    def turn(self, index: int, item: int = 0) -> None:
        """Start turn `index` of a dialog (even: main speaker, odd: the other)."""
        it = self.items[item]
        it.add(it.parser.turn(index))

    def close(self, item: int = 0) -> None:
        it = self.items[item]
        it.add(it.parser.end_turn())
        it.closed = True

    # -- hooks of the LM step -------------------------------------------------------------------
    def _on_text_logits(self, logits):
        if self.padding_bonus:
            import mlx.core as mx

            if self._bonus is None:  # built once, added every step
                bonus = np.zeros(logits.shape[-1], np.float32)
                bonus[self.machine.ids.pad] = self.padding_bonus
                self._bonus = mx.array(bonus).astype(logits.dtype)
            logits = logits + self._bonus
        return logits

    def _on_text(self, tokens):
        return [self.machine.process(self.offset, it.state, int(t)) for it, t in zip(self.items, np.array(tokens))]

    def _on_audio(self, audio):
        audio = np.array(audio)
        audio[:, self.offset < self._audio_start] = self.machine.ids.zero
        return audio

    # -- steps ----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return all(it.stop is not None and self.offset >= it.stop for it in self.items)

    @property
    def ready(self) -> bool:
        """A step can run now (and the stream is not done)."""
        return not self.done and all(it.state.end_step is not None or self.machine.ready(it.state, it.closed)
                                     for it in self.items)

    def step(self) -> list[np.ndarray | None]:
        """One step: each item's new audio frame [1920] (None: none yet, or ended)."""
        if not self.ready:
            raise InputError("the stream is done" if self.done else "the stream needs more text (push or close)")
        replace = self._silent if self.offset < self.tts.config.delay_steps else None
        frame = self.gen.step(np.zeros((len(self.items), 0), np.int64), replace)
        self.offset += 1
        out: list[np.ndarray | None] = [None] * len(self.items)
        for b, it in enumerate(self.items):
            if it.stop is None and it.state.end_step is not None:
                it.stop = it.state.end_step + self.tts.config.delay_steps + self.final_padding
            if frame is None or (it.stop is not None and self.offset > it.stop):
                continue  # warming up, or this item ended (the batch goes on for the others)
            it.frames.append(frame[b])
            if len(it.frames) > self.tts.config.delay_steps:
                out[b] = self._decode(b, frame[b, 1:])
                it.pcm.append(out[b])
        return out

    def _decode(self, b: int, codes: np.ndarray) -> np.ndarray:
        pcm, _ = self.tts.mimi.decode_step(codes[None, :, None].astype(np.int32), self.mimi_states[b])
        return np.clip(np.array(pcm)[0, 0], -1.0, 1.0)

    def audio(self, item: int = 0) -> Iterator[np.ndarray]:
        """Item `item`'s audio, frame by frame, as far as the text pushed so far allows."""
        while self.ready:
            pcm = self.step()[item]
            if pcm is not None:
                yield pcm

    def words(self, item: int = 0, start: int = 0) -> list[Word]:
        """Item `item`'s words from the `start`-th on, as far as decided (the last one's end is
        None until the next word starts or the text ends). Cheap: no audio is gathered."""
        return _words(self.items[item].state, start)

    def speech(self, item: int = 0) -> Speech:
        """What item `item` has produced so far."""
        it = self.items[item]
        delay = self.tts.config.delay_steps
        audio_frames = it.frames[delay:]
        codes = np.stack([f[1:] for f in audio_frames], axis=1) if audio_frames else \
            np.zeros((self.tts.lm.config.dep_q, 0), np.int64)
        pcm = np.concatenate(it.pcm) if it.pcm else np.zeros(0, np.float32)
        return Speech(pcm.astype(np.float32), self.tts.sample_rate, codes, _words(it.state), it.state.end_step)


def _words(state: MachineState, start: int = 0) -> list[Word]:
    """Words `start`… , each from the step it was consumed to the next entry's (or the end)."""
    steps = state.consumption_times + ([state.end_step] if state.end_step is not None else [])  # increasing
    words = []
    for text, step in state.transcript[start:]:
        i = bisect.bisect_right(steps, step)
        words.append(Word(text, step / FRAME_RATE, steps[i] / FRAME_RATE if i < len(steps) else None))
    return words


class TextToSpeech:
    """A TTS model with its Mimi and tokenizer, shared by any number of streams."""

    def __init__(self, lm, mimi, tokenizer, config: TtsConfig, max_padding: int = 8, initial_padding: int = 2):
        if tokenizer is None:
            raise CheckpointError("a TTS model needs its text tokenizer (`tokenizer_name` in config.json)")
        if mimi.config.num_quantizers < lm.config.dep_q:
            raise CheckpointError(f"the LM generates {lm.config.dep_q} codebooks, its Mimi has "
                                  f"{mimi.config.num_quantizers}")
        if lm.config.n_q != lm.config.dep_q:
            raise CheckpointError(f"a TTS LM generates all its audio streams (n_q {lm.config.n_q} != dep_q "
                                  f"{lm.config.dep_q})")
        if not lm.conditioned:
            raise CheckpointError("this TTS checkpoint has no conditioners")
        self.lm, self.mimi, self.tokenizer, self.config = lm, mimi, tokenizer, config
        ids = TokenIds(lm.config.text_card + 1)
        self.machine = StateMachine(ids, config.second_stream_ahead, max_padding, initial_padding)
        self.sample_rate = mimi.sampling_rate
        self.model_id = ""

    @classmethod
    def from_pretrained(cls, source: str | Path = "kyutai/tts-1.6b-en_fr", quantize: int | None = None,
                        revision: str | None = None) -> "TextToSpeech":
        """A directory, repo id or file in Kyutai's PyTorch layout, or a `moshi-mlx convert`
        output. The config is checked before any weight is loaded."""
        from ..checkpoints import lm as lm_ckpt

        ckpt = lm_ckpt.read(source, revision)
        return cls.from_checkpoint(ckpt, TtsConfig.from_config(ckpt.config, ckpt.raw_config, ckpt.source),
                                   quantize, revision)

    @classmethod
    def from_checkpoint(cls, ckpt, config: TtsConfig, quantize: int | None = None,
                        revision: str | None = None) -> "TextToSpeech":
        """From a checkpoint already read and its config already checked (the CLI checks its
        inputs against the config before the weights load)."""
        from ..models.loading import load_checkpoint

        model = load_checkpoint(ckpt, revision=revision, quantize=quantize)
        model.mimi.drop_encoder()  # speech is only decoded here
        tts = cls(model.lm, model.mimi, model.tokenizer, config)
        tts.model_id = ckpt.source
        return tts

    @property
    def multi_speaker(self) -> bool:
        return self.config.speaker_dim is not None

    def parser(self, padding_between: int = 1) -> ScriptParser:
        return ScriptParser(self.tokenizer.encode, self.machine.ids, self.multi_speaker, padding_between)

    def voice(self, voice) -> np.ndarray | None:
        """A voice name of kyutai/tts-voices, a .safetensors path or latents [T, dim] → [T, dim]."""
        if voice is None:
            return None
        dim = self.config.speaker_dim
        if dim is None:
            raise InputError("this TTS model takes no voice embedding (no speaker conditioning)")
        if isinstance(voice, np.ndarray):
            if voice.ndim != 2 or voice.shape[1] != dim:
                raise InputError(f"voice latents must be [frames, {dim}], got {list(voice.shape)}")
            return voice.astype(np.float32)
        return load_voice(voice, self.config)

    def conditions(self, voice, cfg: float) -> Conditions:
        """One item's conditions: up to 5 voices in the speaker slots (None or []: all empty,
        the learnt padding) and, for a CFG-distilled model, the CFG strength."""
        self.config.check_cfg(cfg)
        values: dict[str, str | None] = {"control": "ok"}
        if self.config.cfg_values:
            values["cfg"] = format(float(cfg), ".1f")
        tensors = {}
        if self.multi_speaker:
            dim = self.config.speaker_dim
            voices = voice if isinstance(voice, (list, tuple)) else ([] if voice is None else [voice])
            if len(voices) > MAX_SPEAKERS:
                raise InputError(f"{len(voices)} voices given; the model has {MAX_SPEAKERS} speaker slots")
            latents = [self.voice(v) for v in voices]
            frames = latents[0].shape[0] if latents else VOICE_FRAMES
            if any(x.shape[0] != frames for x in latents):
                raise InputError(f"voices of different lengths ({[x.shape[0] for x in latents]} frames)")
            x = np.zeros((MAX_SPEAKERS, frames, dim), np.float32)
            mask = np.zeros((MAX_SPEAKERS, frames), bool)
            for i, lat in enumerate(latents):
                x[i], mask[i] = lat, True
            tensors["speaker_wavs"] = TensorCondition(x.reshape(-1, dim), mask.reshape(-1))
        elif voice not in (None, [], ()):
            raise InputError("this TTS model takes no voice embedding (no speaker conditioning)")
        return Conditions(values, tensors)

    def stream(self, voice=None, cfg: float = 2.0, temp: float = 0.6, seed: int | None = None,
               padding_between: int = 1, batch_size: int = 1, voices: Sequence[object] | None = None,
               padding_bonus: float = 0.0) -> TtsStream:
        """A stream to push text into and take audio from (see TtsStream)."""
        if voices is None:
            voices = [voice] * batch_size
        return TtsStream(self, batch_size, voices, cfg, temp, seed, padding_between, padding_bonus)

    def synthesize(self, text: str | Sequence[str], voice=None, cfg: float = 2.0, temp: float = 0.6,
                   seed: int | None = None, padding_between: int = 1, padding_bonus: float = 0.0,
                   on_step: Callable[[int], None] | None = None) -> Speech:
        """Text (or a dialog: a list of turns, the first the main speaker's) → Speech."""
        return self.synthesize_batch([text], [voice], cfg, temp, seed, padding_between, padding_bonus, on_step)[0]

    def synthesize_batch(self, scripts: Sequence[str | Sequence[str]], voices: Sequence[object] | None = None,
                         cfg: float = 2.0, temp: float = 0.6, seed: int | None = None, padding_between: int = 1,
                         padding_bonus: float = 0.0, on_step: Callable[[int], None] | None = None) -> list[Speech]:
        """Several scripts in one batch; greedy (temp 0), each result equals synthesizing it alone."""
        scripts = [[s] if isinstance(s, str) else list(s) for s in scripts]
        for i, turns in enumerate(scripts):
            if not any(has_words(t) for t in turns):
                raise InputError(f"text {i}: nothing to say (empty, or only punctuation)"
                                 if len(scripts) > 1 else "nothing to say: the text is empty or only punctuation")
        stream = self.stream(cfg=cfg, temp=temp, seed=seed, padding_between=padding_between,
                             batch_size=len(scripts), voices=voices, padding_bonus=padding_bonus)
        for b, turns in enumerate(scripts):
            for i, t in enumerate(turns):
                stream.turn(i, b)
                stream.push(t, b)
            stream.close(b)
        while stream.ready:
            stream.step()
            if on_step is not None:
                on_step(stream.offset)
        return [stream.speech(b) for b in range(len(scripts))]


def load_voice(voice: str | Path, config: TtsConfig) -> np.ndarray:
    """A voice name of kyutai/tts-voices or a .safetensors path → latents [T, dim]."""
    if config.speaker_dim is None:
        raise InputError("this TTS model takes no voice embedding (no speaker conditioning)")
    return read_voice(voice_path(voice, config.model_id), config.speaker_dim)


def has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)
