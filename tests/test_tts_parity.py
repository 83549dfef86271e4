"""Text-to-speech parity with Kyutai's PyTorch reference (moshi 0.2.13 `TTSModel.generate`),
greedy: the same text and audio tokens frame for frame, the same word steps and end step.

A random-weight TTS model with the release structure (cross-attention to 5 speaker slots,
the three conditioners and the fuser, demuxed two-stream text with look-ahead 2, low-rank
depformer embeddings, a weights-per-step schedule, 16 codebooks with acoustic delay 2, a
1.28 s audio delay, a 24-step context so the cache wraps) is saved in the release layout
with a Kyutai-style config.json and loaded through TextToSpeech.from_pretrained.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
from moshi_mlx.sessions.tts import TextToSpeech

pytestmark = pytest.mark.reference

N_Q = R.TTS_N_Q
DIALOG = ["Hello there, how are you today? <break time=\"0.5s\"/> The rabbit lived in the forest.",
          "I am fine: the forest (today) is how you left it."]


@pytest.fixture(scope="module")
def tts_dirs(tmp_path_factory, kyutai_mimi, chat_model_dir):
    out = {}
    for distilled in (True, False):
        d = tmp_path_factory.mktemp("tts-distilled" if distilled else "tts-cfg")
        kwargs = R.tts_kwargs(distilled)
        ref = R.random_tts_lm(kwargs, seed=51 if distilled else 52)
        R.save_tts(ref, d, kwargs, kyutai_mimi, chat_model_dir / "tok.model")
        out[distilled] = (ref, d)
    voices = tmp_path_factory.mktemp("voices")
    return out, [R.write_voice(voices / f"v{i}.safetensors", i) for i in range(2)]


def reference_generate(ref_lm, kyutai_mimi, tok: Path, turns, voices, cfg: float, distilled: bool,
                       padding_bonus: float = 0.0):
    """moshi's TTSModel.generate (greedy) → (frames [steps, 1 + n_q], transcript, end_step)."""
    import sentencepiece
    from moshi.conditioners import TensorCondition
    from moshi.models.tts import StateMachine, TokenIds, TTSModel

    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(str(tok))
    machine = StateMachine(TokenIds(ref_lm.text_card + 1), second_stream_ahead=2, max_padding=8, initial_padding=2)
    tts = TTSModel(lm=ref_lm, mimi=kyutai_mimi[0], tokenizer=sp, voice_suffix="", voice_repo="", machine=machine,
                   delay_steps=16, temp=0.0, n_q=N_Q, final_padding=4, padding_bonus=padding_bonus,
                   cfg_coef=1.0 if distilled else cfg)
    entries = tts.prepare_script(turns, padding_between=1)
    if voices:
        attrs = tts.make_condition_attributes([Path(v) for v in voices], cfg_coef=cfg if distilled else None)
    else:  # the speaker slots all empty, as a null condition has them
        attrs = tts.make_condition_attributes([], cfg_coef=cfg if distilled else None)
        attrs.tensor["speaker_wavs"] = TensorCondition(torch.zeros(1, 5 * 125, 512), torch.zeros(1, 5 * 125, dtype=torch.bool))
    if not distilled:
        attrs.text.pop("cfg", None)
    result = tts.generate([entries], [attrs])
    frames = torch.stack(result.frames)[:, 0, :, 0].numpy()
    return frames, result.all_transcripts[0], result.end_steps[0]


CASES = [  # (distilled, cfg, voices, padding bonus)
    pytest.param(True, 2.0, 2, 0.0, id="dialog-2voices-cfg2"),
    pytest.param(True, 3.5, 1, 0.0, id="dialog-1voice-cfg3.5"),
    pytest.param(True, 2.0, 0, 1.5, id="no-voice-padding-bonus"),
    pytest.param(False, 2.0, 2, 0.0, id="real-cfg-2voices"),
]


@pytest.mark.parametrize("distilled,cfg,n_voices,bonus", CASES)
def test_tts_matches_pytorch(tts_dirs, kyutai_mimi, chat_model_dir, distilled, cfg, n_voices, bonus):
    dirs, voice_files = tts_dirs
    ref, d = dirs[distilled]
    voices = voice_files[:n_voices]
    want, transcript, end_step = reference_generate(ref, kyutai_mimi, chat_model_dir / "tok.model", DIALOG, voices,
                                                    cfg, distilled, bonus)
    tts = TextToSpeech.from_pretrained(d)
    stream = tts.stream(voice=[str(v) for v in voices], cfg=cfg, temp=0.0, padding_bonus=bonus)
    for i, t in enumerate(DIALOG):
        stream.turn(i)
        stream.push(t)
    stream.close()
    while stream.ready:
        stream.step()
    got = np.stack(stream.items[0].frames)
    state = stream.items[0].state
    # not degenerate: words consumed by the model's choice as well as by force, a real end
    steps = [s for _, s in transcript]
    assert len(transcript) == 23 and end_step is not None
    assert len(set(np.diff(steps).tolist())) > 2
    assert state.transcript == transcript
    assert state.end_step == end_step
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want)
    # audio codes valid (no −1 left) in every decoded frame
    speech = stream.speech()
    assert speech.codes.shape == (N_Q, len(want) - 16) and speech.codes.min() >= 0
    assert [w.text for w in speech.words] == [w for w, _ in transcript]
    assert [w.start for w in speech.words] == [s / 12.5 for s in steps]


@pytest.mark.parametrize("turns", [
    DIALOG, ["", "The other speaker starts."], ['Hi’s: (you) <break time="1.5s"/> ok', "", "me"],
    ["a <break time=\"2s\">b<break time=\"0.25s\" />c   d\n\te"]])
@pytest.mark.parametrize("multi_speaker,padding_between", [(True, 1), (False, 0), (True, 3)])
def test_script_entries_match_pytorch(turns, multi_speaker, padding_between):
    from moshi.models.tts import TokenIds as RefIds
    from moshi.models.tts import script_to_entries as ref_entries

    from moshi_mlx.sessions.tts_script import TokenIds, script_to_entries

    class Tok:  # one token per letter
        @staticmethod
        def encode(word):
            return [4 + ord(c) % 20 for c in word]

    want = ref_entries(Tok(), RefIds(26), 12.5, turns, multi_speaker=multi_speaker, padding_between=padding_between)
    got = script_to_entries(Tok.encode, TokenIds(26), turns, multi_speaker, padding_between)
    assert [(e.tokens, e.text, e.padding) for e in got] == [(e.tokens, e.text, e.padding) for e in want]
