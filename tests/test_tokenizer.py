"""Text tokenizer: pieces rendered for users, padding hidden, clear errors."""
from __future__ import annotations

import pytest

from moshi_mlx.errors import CheckpointError
from moshi_mlx.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(["hello there how are you today", "the rabbit lived in the forest",
                                 "moshi speaks and listens at the same time", "hello hello forest rabbit"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tok"), vocab_size=36,
                                   model_type="unigram", minloglevel=2)
    return d / "tok.model"


def test_pieces_and_hidden_padding(spm_model):
    # this small model's ids 1 and 2 stand in for Kyutai's padding (3) and end-of-padding (0)
    tok = TextTokenizer(spm_model, padding_id=1, end_of_padding_id=2)
    ids = tok.encode("hello forest")
    pieces = [tok.piece(i) for i in ids]
    assert "".join(pieces).strip() == "hello forest"
    assert pieces[0].startswith(" ")  # "▁" is shown as a space
    assert tok.piece(1) is None and tok.piece(2) is None
    assert tok.decode([1] + ids + [2, 1]) == "hello forest"


def test_from_directory_uses_config_name(spm_model, tmp_path):
    import json
    import shutil

    shutil.copy(spm_model, tmp_path / "my_tok.model")
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer_name": "my_tok.model"}))
    assert TextTokenizer.from_pretrained(tmp_path).encode("hello") == TextTokenizer(spm_model).encode("hello")


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no text tokenizer 'tokenizer_spm_32k_3.model'"):
        TextTokenizer.from_pretrained(tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(CheckpointError, match="not a sentencepiece model"):
        TextTokenizer(bad)
