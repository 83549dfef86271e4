"""The text tokenizer (sentencepiece, Kyutai's `tokenizer_spm_32k_3.model`)."""
from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

DEFAULT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"


class TextTokenizer:
    """Encodes text and renders generated tokens as text pieces.

    The LM's padding token (existing_text_padding_id, 3) and end-of-padding token (0) are
    how Moshi marks silence between words: they are hidden from users.
    """

    def __init__(self, path: str | Path, padding_id: int = 3, end_of_padding_id: int = 0):
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"text tokenizer not found: {path}")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeErrors
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
        self.hidden = {padding_id, end_of_padding_id}

    @classmethod
    def from_pretrained(cls, source: str | Path, name: str | None = None, revision: str | None = None,
                        padding_id: int = 3, end_of_padding_id: int = 0) -> "TextTokenizer":
        """From a directory or repo: `name`, else the config's `tokenizer_name`, else Kyutai's."""
        import json

        from .checkpoints.hub import list_files, resolve_file

        if name is None:
            files = list_files(source, revision)
            if "config.json" in files:
                name = json.loads(resolve_file(source, "config.json", revision).read_text()).get("tokenizer_name")
            name = name or DEFAULT_TOKENIZER_NAME
            if name not in files:
                raise CheckpointError(f"{source}: no text tokenizer {name!r} (files: {', '.join(files[:8])}); "
                                      f"pass the tokenizer file explicitly")
        return cls(resolve_file(source, name, revision), padding_id, end_of_padding_id)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def piece(self, token: int) -> str | None:
        """What to show for one generated token: None for padding, '▁' rendered as a space."""
        token = int(token)
        if token in self.hidden or not 0 <= token < self.vocab_size:
            return None
        return self.sp.IdToPiece(token).replace("▁", " ")

    def decode(self, tokens) -> str:
        return self.sp.DecodeIds([int(t) for t in tokens if int(t) not in self.hidden and 0 <= int(t) < self.vocab_size])
