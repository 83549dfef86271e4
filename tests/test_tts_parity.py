"""Text-to-speech parity with Kyutai's PyTorch reference (moshi 0.2.13 `TTSModel.generate`),
greedy: the same text and audio tokens frame for frame, the same word steps and end step.

A random-weight TTS model with the release structure (cross-attention to 5 speaker slots,
the three conditioners and the fuser, demuxed two-stream text with look-ahead 2, low-rank
depformer embeddings, a weights-per-step schedule, 16 codebooks with acoustic delay 2, a
1.28 s audio delay, a 24-step context so the cache wraps) is saved in the release layout
with a Kyutai-style config.json and loaded through TextToSpeech.from_pretrained.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as R
from moshi_mlx.sessions.tts import TextToSpeech

pytestmark = pytest.mark.reference

N_Q = 16
CFG_VALUES = ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]
DIALOG = ["Hello there, how are you today? <break time=\"0.5s\"/> The rabbit lived in the forest.",
          "I am fine: the forest (today) is how you left it."]


def tts_kwargs(distilled: bool = True) -> dict:
    conditioners = {
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
        "control": {"type": "lut", "lut": {"n_bins": 1, "dim": 64, "tokenizer": "noop", "possible_values": ["ok"]}},
    }
    fuser = {"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1.0, "sum": ["control"],
             "prepend": [], "cross": ["speaker_wavs"]}
    if distilled:
        conditioners["cfg"] = {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                                                      "possible_values": CFG_VALUES}}
        fuser["sum"] = ["control", "cfg"]
    return R.tiny_lm_kwargs(
        text_card=25, n_q=N_Q, dep_q=N_Q, delays=[0, 0] + [2] * (N_Q - 1), context=24,
        demux_second_stream=True, depformer_low_rank_embeddings=16, cross_attention=True,
        depformer_weights_per_step_schedule=[0, 1, 2, 3] + [4] * 4 + [5] * 4 + [6] * 4,
        conditioners=conditioners, fuser=fuser)


@torch.no_grad()
def random_tts_lm(kwargs: dict, seed: int):
    """Kyutai's LMModel with conditioners (built as `get_moshi_lm` does), random weights; the
    text head's "new word" and "pad" rows are boosted so the model, not only the forcing
    rules, decides when words start."""
    from moshi.models import loaders

    torch.manual_seed(seed)
    import copy

    # get_moshi_lm writes into the nested conditioner dicts: give it a copy
    model = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(kwargs), device="cpu", dtype=torch.float32).eval()
    for name, p in model.named_parameters():
        if name.endswith("alpha"):
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
        elif name.endswith(("norm_cross.weight", "norm_cross.bias")):
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith("weight") else torch.randn_like(p) * 0.1)
        elif p.dim() == 2:
            p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5))
    model.text_linear.weight[[0, 3]] *= 4.0
    return model


def save_tts(model, d: Path, kwargs: dict, kyutai_mimi, tok: Path) -> None:
    R.save_kyutai_lm(model, d, kwargs)
    shutil.copy(kyutai_mimi[1], d / kyutai_mimi[1].name)
    shutil.copy(tok, d / "tok.model")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tts", mimi_name=kyutai_mimi[1].name, tokenizer_name="tok.model",
               model_id={"sig": "0123abcd", "epoch": 7},
               tts_config={"audio_delay": 1.28, "second_stream_ahead": 2}, lm_gen_config={"temp": 0.6})
    (d / "config.json").write_text(json.dumps(cfg))


def write_voice(path: Path, seed: int, frames: int = 10) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"speaker_wavs": torch.randn(1, 512, frames, generator=g) * 0.7}, str(path))
    return path


@pytest.fixture(scope="module")
def tts_dirs(tmp_path_factory, kyutai_mimi, chat_model_dir):
    out = {}
    for distilled in (True, False):
        d = tmp_path_factory.mktemp("tts-distilled" if distilled else "tts-cfg")
        kwargs = tts_kwargs(distilled)
        ref = random_tts_lm(kwargs, seed=51 if distilled else 52)
        save_tts(ref, d, kwargs, kyutai_mimi, chat_model_dir / "tok.model")
        out[distilled] = (ref, d)
    voices = tmp_path_factory.mktemp("voices")
    return out, [write_voice(voices / f"v{i}.safetensors", i) for i in range(2)]


def reference_generate(ref_lm, kyutai_mimi, tok: Path, turns, voices, cfg: float, distilled: bool,
                       padding_bonus: float = 0.0):
    """moshi's TTSModel.generate (greedy) → (frames [steps, 1 + n_q], transcript, end_step)."""
    import sentencepiece
    from moshi.conditioners import ConditionAttributes, TensorCondition
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
