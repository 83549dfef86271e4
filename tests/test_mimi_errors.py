"""Bad input gets a clear, specific error (never a deep MLX traceback)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import moshi_mlx
from moshi_mlx.errors import CheckpointError, InputError


@pytest.mark.parametrize("shape,match", [((24000,), r"shape \[batch, 1, samples\]"),
                                          ((1, 2, 1920), r"shape \[batch, 1, samples\]"),
                                          ((1, 1, 0), "empty")])
def test_bad_audio_shapes(mlx_mimi, shape, match):
    with pytest.raises(InputError, match=match):
        mlx_mimi.encode(np.zeros(shape, np.float32))


def test_nan_audio(mlx_mimi):
    x = np.zeros((1, 1, 1920), np.float32)
    x[0, 0, 5] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        mlx_mimi.encode(x)
    with pytest.raises(InputError, match="NaN or Inf"):
        mlx_mimi.encode_step(x, mlx_mimi.init_state(1))


def test_streaming_needs_whole_frames(mlx_mimi):
    with pytest.raises(InputError, match="multiple of 1920"):
        mlx_mimi.encode_step(np.zeros((1, 1, 1000), np.float32), mlx_mimi.init_state(1))


@pytest.mark.parametrize("n", [0, 33, -1, 2.5])
def test_num_quantizers_out_of_range(mlx_mimi, n):
    with pytest.raises(InputError, match=r"num_quantizers must be an integer in \[1, 32\]"):
        mlx_mimi.encode(np.zeros((1, 1, 1920), np.float32), num_quantizers=n)


@pytest.mark.parametrize("codes,match", [(np.full((1, 8, 3), 2048), r"\[0, 2048\)"),
                                         (np.full((1, 8, 3), -1), r"\[0, 2048\)"),
                                         (np.zeros((1, 33, 3), int), "n \\(1..32\\)"),
                                         (np.zeros((8, 3), int), "shape"),
                                         (np.zeros((1, 8, 0), int), "empty")])
def test_bad_codes(mlx_mimi, codes, match):
    with pytest.raises(InputError, match=match):
        mlx_mimi.decode(codes)


@pytest.fixture(scope="module")
def release_state(kyutai_mimi):
    return load_file(str(kyutai_mimi[1]))


def _save(tmp_path, state, name="tokenizer-e351c8d8-checkpoint125.safetensors"):
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_missing_key_is_named(tmp_path, release_state):
    state = dict(release_state)
    del state["encoder.model.3.conv.conv.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.layers\.3\.bias"):
        moshi_mlx.MimiModel.from_pretrained(_save(tmp_path, state))


def test_extra_key_is_named(tmp_path, release_state):
    state = dict(release_state)
    state["encoder.model.99.conv.conv.weight"] = np.zeros((1, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.layers\.99\.weight"):
        moshi_mlx.MimiModel.from_pretrained(_save(tmp_path, state))


def test_misshaped_key_names_both_shapes(tmp_path, release_state):
    state = dict(release_state)
    state["decoder_transformer.transformer.layers.2.linear1.weight"] = np.zeros((2048, 256), np.float32)
    with pytest.raises(CheckpointError, match=r"decoder_transformer\.layers\.2\.linear1\.weight: "
                                              r"checkpoint shape \[2048, 256\] != model shape \[2048, 512\]"):
        moshi_mlx.MimiModel.from_pretrained(_save(tmp_path, state))


def test_truncated_file(tmp_path, kyutai_mimi):
    src = kyutai_mimi[1]
    data = src.read_bytes()
    path = tmp_path / src.name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        moshi_mlx.MimiModel.from_pretrained(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "tokenizer-e351c8d8-checkpoint125.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        moshi_mlx.MimiModel.from_pretrained(path)


def test_unknown_layout(tmp_path):
    path = _save(tmp_path, {"foo.weight": np.zeros((2, 2), np.float32)}, "weights.safetensors")
    with pytest.raises(CheckpointError, match="unknown Mimi checkpoint layout"):
        moshi_mlx.MimiModel.from_pretrained(path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no Mimi weights found"):
        moshi_mlx.MimiModel.from_pretrained(tmp_path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file or directory"):
        moshi_mlx.MimiModel.from_pretrained("./does/not/exist")


def test_directory_with_release_file_loads(tmp_path, kyutai_mimi):
    shutil.copy(kyutai_mimi[1], tmp_path / kyutai_mimi[1].name)
    model = moshi_mlx.MimiModel.from_pretrained(tmp_path)
    assert model.config.num_quantizers == 32


def test_config_roundtrip(tmp_path):
    cfg = moshi_mlx.MimiConfig(num_quantizers=16)
    cfg.to_json(tmp_path / "c.json")
    assert moshi_mlx.MimiConfig.from_json(tmp_path / "c.json") == cfg
    # transformers' config.json keys are accepted, unknown ones ignored
    from transformers import MimiConfig as HFConfig

    hf = HFConfig().to_dict()
    assert moshi_mlx.MimiConfig.from_dict(hf) == moshi_mlx.MimiConfig()
    with pytest.raises(ValueError, match="unsupported MimiConfig"):
        moshi_mlx.MimiConfig(use_causal_conv=False)
