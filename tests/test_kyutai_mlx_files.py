"""Kyutai's published MLX checkpoints (kyutai/moshiko-mlx-q4, -q8, -bf16) load directly.

The files are written by Kyutai's own `moshi-mlx` 0.3.0 package from random weights, in a
separate virtualenv (.venv-kyutai-mlx, made by scripts/test.sh: its import name is also
`moshi_mlx`).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

import mlx.core as mx
from moshi_mlx.models.moshi import MoshiForConditionalGeneration
from moshi_mlx.quantize import QuantizationSpec, quantize_model
import reference as R
from test_lm_parity import check_logits

pytestmark = pytest.mark.reference

ROOT = Path(__file__).resolve().parents[1]
KYUTAI_PY = ROOT / ".venv-kyutai-mlx" / "bin" / "python"


@pytest.fixture(scope="module")
def pytorch_src(tmp_path_factory):
    # dims divisible by the group sizes so everything quantizes, as in the real 7B model
    # (Kyutai's MLX code fixes the gating size at 11·dim/4, i.e. hidden_scale 4.125, as in Moshi 7B)
    kwargs = R.tiny_lm_kwargs(dim=256, hidden_scale=4.125, depformer_dim=64, depformer_dim_feedforward=288)
    ref = R.random_kyutai_lm(kwargs, seed=21)
    d = tmp_path_factory.mktemp("pt")
    R.save_kyutai_lm(ref, d, kwargs)
    return ref, d


def kyutai_write(pytorch_src, out_dir: Path, bits: int) -> Path:
    assert KYUTAI_PY.exists(), f"{KYUTAI_PY} missing: run scripts/test.sh (it creates that virtualenv)"
    _, src = pytorch_src
    name = {0: "model.safetensors", 4: "model.q4.safetensors", 8: "model.q8.safetensors"}[bits]
    out_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(KYUTAI_PY), str(ROOT / "tests" / "tools" / "kyutai_mlx_writer.py"),
                           str(src / "config.json"), str(src / "model.safetensors"), str(out_dir / name), str(bits)],
                          capture_output=True, text=True, cwd=str(out_dir), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Like Kyutai's STT/TTS MLX repos: a config.json with the LM kwargs naming the file
    # (Moshiko/Moshika MLX repos ship none: the 7B defaults apply).
    cfg = json.loads((src / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps({**cfg, "moshi_name": name}))
    return out_dir


def test_kyutai_mlx_bf16_layout_matches_reference(pytorch_src, tmp_path):
    ref, _ = pytorch_src
    d = kyutai_write(pytorch_src, tmp_path / "kmlx", 0)
    keys = mx.load(str(d / "model.safetensors")).keys()
    assert any(k.startswith("depformer.slices.") for k in keys) and "audio_embs.0.weight" in keys
    check_logits(ref, MoshiForConditionalGeneration.from_pretrained(d))


@pytest.mark.parametrize("bits", [4, 8])
def test_kyutai_mlx_quantized_files_load(pytorch_src, tmp_path, bits):
    """Their q4/q8 files give the same quantized weights as quantizing the PyTorch release
    ourselves (scales compared in our storage dtype), and nearly the same logits."""
    _, src = pytorch_src
    d = kyutai_write(pytorch_src, tmp_path / "kmlx", bits)
    theirs = MoshiForConditionalGeneration.from_pretrained(d).lm
    ours = MoshiForConditionalGeneration.from_pretrained(src).lm
    quantize_model(ours, QuantizationSpec.make(bits))
    pa, pb = dict(tree_flatten(theirs.parameters())), dict(tree_flatten(ours.parameters()))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert mx.array_equal(pa[k], pb[k]).item(), k


def test_kyutai_mlx_stt_layout(stt_model_dir, tmp_path):
    """Kyutai's `-mlx` STT repos (kyutai/stt-1b-en_fr-mlx): the STT LM written by their MLX
    code (no depformer; the VAD heads copied as they are) transcribes exactly as the PyTorch
    release it came from."""
    import shutil

    from conftest import speech_pcm
    from moshi_mlx.sessions.stt import SpeechToText

    d = kyutai_write((None, stt_model_dir), tmp_path / "kmlx", 0)
    for name in ("tok.model", "tokenizer-e351c8d8-checkpoint125.safetensors"):
        shutil.copy(stt_model_dir / name, d / name)
    keys = mx.load(str(d / "model.safetensors")).keys()
    assert "audio_embs.0.weight" in keys and "extra_heads.0.weight" in keys
    theirs, ours = SpeechToText.from_pretrained(d), SpeechToText.from_pretrained(stt_model_dir)
    pcm = speech_pcm(6.0)
    a, b = theirs.transcribe(pcm), ours.transcribe(pcm)
    assert (a.tokens == b.tokens).all()
    assert abs(a.pause_prob - b.pause_prob).max() < 1e-5
