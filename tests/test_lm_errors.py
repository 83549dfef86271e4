"""LM bad input: clear errors naming keys, shapes and ranges."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moshi_mlx.errors import CheckpointError, InputError
from moshi_mlx.sessions.lmgen import LMGen
from moshi_mlx.models.lm import LmConfig
from moshi_mlx.models.moshi import MoshiForConditionalGeneration
import reference as R

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    kwargs = R.tiny_lm_kwargs()
    path = tmp_path_factory.mktemp("lm")
    R.save_kyutai_lm(R.random_kyutai_lm(kwargs), path, kwargs)
    return path


def _copy(lm_dir, tmp_path, mutate_state=None, mutate_config=None):
    state = load_file(str(lm_dir / "model.safetensors"))
    config = json.loads((lm_dir / "config.json").read_text())
    if mutate_state:
        mutate_state(state)
    if mutate_config:
        mutate_config(config)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_key_named(lm_dir, tmp_path):
    d = _copy(lm_dir, tmp_path, mutate_state=lambda s: s.pop("transformer.layers.1.gating.linear_out.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: transformer\.layers\.1\.gating\.linear_out\.weight"):
        MoshiForConditionalGeneration.from_pretrained(d)


def test_config_weight_mismatch_names_both_shapes(lm_dir, tmp_path):
    d = _copy(lm_dir, tmp_path, mutate_config=lambda c: c.update(card=1024))
    with pytest.raises(CheckpointError, match=r"emb\.0\.weight: checkpoint shape \[2049, 64\] != model shape \[1025, 64\]"):
        MoshiForConditionalGeneration.from_pretrained(d)


def test_bad_config_values(lm_dir, tmp_path):
    d = _copy(lm_dir, tmp_path, mutate_config=lambda c: c.update(delays=[0, 1]))
    with pytest.raises(CheckpointError, match="delays has 2 entries, expected n_q \\+ 1 = 17"):
        MoshiForConditionalGeneration.from_pretrained(d)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(R.tiny_lm_kwargs()))
    with pytest.raises(CheckpointError, match="no LM weights 'model.safetensors'"):
        MoshiForConditionalGeneration.from_pretrained(tmp_path)


def test_user_codes_errors(lm_dir):
    model = MoshiForConditionalGeneration.from_pretrained(lm_dir)
    gen = LMGen(model, temp=0, temp_text=0)
    gen.reset(1)
    with pytest.raises(InputError, match=r"expected user codes \[batch=1, 8\]"):
        gen.step(np.zeros((1, 7), np.int64))
    with pytest.raises(InputError, match=r"must lie in \[0, 2048\)"):
        gen.step(np.full((1, 8), 2048))
    with pytest.raises(InputError, match="integers"):
        gen.step(np.zeros((1, 8), np.float32))
    assert gen.step(np.zeros((1, 8), np.int64)) is None  # still usable: warm-up step
    assert gen.step(np.zeros((1, 8, 1), np.int64)).shape == (1, 9)


def test_default_config_is_moshi_7b():
    cfg = LmConfig()
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.context, cfg.text_card, cfg.n_q, cfg.dep_q) == \
        (4096, 32, 32, 3000, 32000, 16, 8)
    assert cfg.temporal().gating_hidden == 11264 and cfg.depformer().gating_hidden == 2816
