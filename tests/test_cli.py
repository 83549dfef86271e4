"""`moshi-mlx encode` / `decode` end to end, through the installed console command."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from safetensors import safe_open

import moshi_mlx
from moshi_mlx.audio import read_audio


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "moshi_mlx", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def stereo_wav(tmp_path_factory, speech):
    """3.3 s of speech as 44.1 kHz stereo (exercises resampling, downmixing, a partial frame)."""
    from moshi_mlx.audio import resample

    pcm = resample(speech[: int(3.3 * 24000)], 24000, 44100)
    path = tmp_path_factory.mktemp("cli") / "speech.wav"
    sf.write(path, np.stack([pcm, 0.5 * pcm], 1), 44100, subtype="FLOAT")
    return path


def test_encode_decode_roundtrip(tmp_path, stereo_wav, kyutai_mimi, mlx_mimi):
    codes_path, wav_path = tmp_path / "codes.safetensors", tmp_path / "out.wav"
    proc = cli("encode", stereo_wav, codes_path, "--model", kyutai_mimi[1], "-n", "8")
    assert "downmixing to mono" in proc.stderr
    with safe_open(str(codes_path), framework="numpy") as f:
        codes, meta = f.get_tensor("audio_codes"), f.metadata()
    audio = read_audio(stereo_wav, 24000)
    assert meta["sample_rate"] == "24000" and meta["num_samples"] == str(len(audio.pcm))
    assert codes.shape == (1, 8, -(-len(audio.pcm) // 1920))
    # the same codes as one batch call on the whole file
    want = np.array(mlx_mimi.encode(audio.pcm[None, None], num_quantizers=8).audio_codes)
    np.testing.assert_array_equal(codes, want)

    cli("decode", codes_path, wav_path)  # model taken from the codes file's metadata
    out, rate = sf.read(wav_path, dtype="float32")
    assert rate == 24000 and len(out) == len(audio.pcm)
    ref = np.array(mlx_mimi.decode(want).audio_values)[0, 0, : len(audio.pcm)]
    assert np.abs(out - np.clip(ref, -1, 1)).max() <= 1.5 / 32768  # 16-bit quantization only


def test_mp3_input(tmp_path, kyutai_mimi):
    from pathlib import Path

    mp3 = Path(__file__).resolve().parents[2] / "shared" / "audio" / "bria.mp3"
    assert mp3.exists(), f"test audio missing: {mp3}"
    out = tmp_path / "bria.safetensors"
    cli("encode", mp3, out, "--model", kyutai_mimi[1], "-n", "2", "--quiet")
    with safe_open(str(out), framework="numpy") as f:
        assert f.get_tensor("audio_codes").shape == (1, 2, 562)  # 44.96 s at 12.5 Hz


@pytest.mark.parametrize("case", ["missing_input", "bad_audio", "bad_n", "missing_outdir"])
def test_encode_errors_leave_nothing(tmp_path, kyutai_mimi, stereo_wav, case):
    out = tmp_path / "codes.safetensors"
    args = {"missing_input": ("encode", tmp_path / "nope.wav", out),
            "bad_audio": ("encode", tmp_path / "bad.wav", out),
            "bad_n": ("encode", stereo_wav, out, "-n", "40"),
            "missing_outdir": ("encode", stereo_wav, tmp_path / "no" / "dir" / "c.safetensors")}[case]
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    proc = cli(*args, "--model", kyutai_mimi[1], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_decode_errors_leave_nothing(tmp_path, kyutai_mimi):
    from safetensors.numpy import save_file

    out = tmp_path / "out.wav"
    bad_range = tmp_path / "range.safetensors"
    save_file({"audio_codes": np.full((1, 8, 4), 5000, np.int32)}, str(bad_range))
    wrong_key = tmp_path / "key.safetensors"
    save_file({"codes": np.zeros((1, 8, 4), np.int32)}, str(wrong_key))
    not_st = tmp_path / "text.safetensors"
    not_st.write_text("hello")
    for path, match in [(bad_range, r"\[0, 2048\)"), (wrong_key, "no 'audio_codes' tensor"),
                        (not_st, "not a safetensors file")]:
        proc = cli("decode", path, out, "--model", kyutai_mimi[1], check=False)
        assert proc.returncode == 2 and match.replace("\\", "") in proc.stderr.replace("\\", ""), proc.stderr
        assert not out.exists()


def test_help_lists_subcommands():
    out = cli("--help").stdout
    for sub in ("encode", "decode", "bench"):
        assert sub in out


def test_only_moshi_mlx_is_installed():
    """convert/ and apps/ are installed as moshi_mlx.convert / moshi_mlx.apps, nothing top-level."""
    import importlib.util

    assert importlib.util.find_spec("moshi_mlx.apps.codec") is not None
    assert importlib.util.find_spec("moshi_mlx.convert") is not None
    code = "import importlib.util,sys; sys.exit(any(importlib.util.find_spec(m) for m in ('apps','convert')))"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0
    # installed under its own distribution name, not Kyutai's `moshi-mlx` (see README: Install)
    from importlib.metadata import version

    assert moshi_mlx.__version__ == version("moshi-mlx-port")
