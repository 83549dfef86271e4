"""Shared fixtures: real speech, and random-weight reference models saved in release layouts.

The references (torch, Kyutai's moshi, transformers) are required: if one is missing the
fixtures fail loudly instead of skipping (the README's test command installs them).
"""
from __future__ import annotations

import numpy as np
import pytest

import moshi_mlx  # noqa: F401  - loads the optimized BLAS before anything imports mlx.core
import reference as R


@pytest.fixture(scope="session")
def speech() -> np.ndarray:
    """12 s of real read speech at 24 kHz (150 Mimi frames: past the 250-step attention window)."""
    return R.speech_pcm(12.0)


@pytest.fixture(scope="session")
def kyutai_mimi(speech):
    """(reference torch model with all 32 codebooks active, path of its release-layout file)."""
    import tempfile
    from pathlib import Path

    ref = R.random_kyutai_mimi(speech)
    ref.set_num_codebooks(32)
    path = Path(tempfile.mkdtemp(prefix="mimi-kyutai-")) / R.MIMI_RELEASE_NAME
    R.save_kyutai_mimi(ref, path)
    return ref, path


@pytest.fixture(scope="session")
def mlx_mimi(kyutai_mimi):
    return moshi_mlx.MimiModel.from_pretrained(kyutai_mimi[1])


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, kyutai_mimi):
    """A Kyutai-style directory with a tiny random LM, the Mimi release file and a tiny
    sentencepiece tokenizer, named in config.json: what `moshi-mlx chat --model` takes."""
    import json
    import shutil

    import sentencepiece as spm

    d = tmp_path_factory.mktemp("chat-model")
    kwargs = R.tiny_lm_kwargs()
    R.save_kyutai_lm(R.random_kyutai_lm(kwargs, seed=31), d, kwargs)
    shutil.copy(kyutai_mimi[1], d / kyutai_mimi[1].name)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(["hello there how are you today", "the rabbit lived in the forest"] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tok"), vocab_size=25,
                                   model_type="unigram", minloglevel=2)
    corpus.unlink()
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(mimi_name=kyutai_mimi[1].name, tokenizer_name="tok.model")
    (d / "config.json").write_text(json.dumps(cfg))
    return d
