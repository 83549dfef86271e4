"""`moshi-mlx chat` over a recording: timing, tokens and clean errors (tiny random model)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import mlx.core as mx
from moshi_mlx.sessions.lmgen import LMGen
from moshi_mlx.models.moshi import MoshiForConditionalGeneration
from conftest import share_file

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def model_dir(chat_model_dir):
    return chat_model_dir


def chat(*args):
    return subprocess.run([sys.executable, "-m", "moshi_mlx", "chat", *map(str, args)], capture_output=True, text=True)


def test_file_mode_is_timed_and_matches_lmgen_and_mimi(model_dir, speech, tmp_path):
    pcm = speech[: 3 * 24000 + 500]  # 3.02 s: the last frame is partial
    sf.write(tmp_path / "in.wav", pcm, 24000, subtype="FLOAT")
    proc = chat("--model", model_dir, "--input-file", tmp_path / "in.wav", "--output-file", tmp_path / "out.wav",
                "--record", tmp_path / "both.wav", "--temp", 0, "--temp-text", 0)
    assert proc.returncode == 0, proc.stderr
    out, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == 24000 and len(out) == len(pcm)
    both, _ = sf.read(tmp_path / "both.wav", dtype="float32")
    assert both.shape == (len(pcm), 2)
    # The same loop by hand: Mimi encode → LMGen (greedy) → Mimi decode, frame by frame.
    model = MoshiForConditionalGeneration.from_pretrained(model_dir)
    mimi = model.mimi
    gen = LMGen(model, temp=0, temp_text=0)
    gen.reset(1)
    state = mimi.init_state(1)
    frames = -(-len(pcm) // 1920)
    padded = np.pad(pcm, (0, frames * 1920 - len(pcm)))
    want = np.zeros_like(padded)
    warmup = 0
    for i in range(frames):
        codes, state = mimi.encode_step(mx.array(padded[None, None, i * 1920:(i + 1) * 1920]), state, num_quantizers=8)
        tokens = gen.step(np.array(codes)[:, :, 0])
        if tokens is None:
            warmup += 1
            continue
        audio, state = mimi.decode_step(mx.array(tokens[:, 1:, None].astype(np.int32)), state)
        want[i * 1920:(i + 1) * 1920] = np.array(audio)[0, 0]
    want = np.clip(want[: len(pcm)], -1, 1)
    assert warmup == 1  # Moshi's first frame is silence while the delays warm up: audio stays on the frame clock
    assert np.abs(out[:1920]).max() == 0
    assert np.abs(out - want).max() <= 1.5 / 32768  # identical but for 16-bit quantization
    assert np.abs(both[:, 1] - out).max() == 0 and np.abs(both[:, 0] - np.clip(pcm, -1, 1)).max() <= 1.5 / 32768


def test_clear_errors(model_dir, tmp_path):
    proc = chat("--model", model_dir)
    assert proc.returncode == 2 and "--input-file" in proc.stderr and "Traceback" not in proc.stderr
    no_tok = tmp_path / "no-tok"
    shutil.copytree(model_dir, no_tok, copy_function=share_file)  # read only, but for the tokenizer removed
    (no_tok / "tok.model").unlink()
    sf.write(tmp_path / "in.wav", np.zeros(4000, np.float32), 24000)
    proc = chat("--model", no_tok, "--input-file", tmp_path / "in.wav", "--output-file", tmp_path / "out.wav")
    assert proc.returncode == 2 and "tok.model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.wav").exists()
    proc = chat("--model", tmp_path / "nothing-here", "--input-file", tmp_path / "in.wav", "--output-file",
                tmp_path / "out.wav")
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr
