"""Tokenizers: raw bytes (vocab 256) or byte-level BPE trained with Hugging Face ``tokenizers``.

Both expose ``vocab_size``, ``encode(text) -> list[int]``, ``decode(ids) -> str`` and
``save(path)``; :func:`load_tokenizer` reads either back from the saved ``tokenizer.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens. Lossless; no special tokens (documents are simply concatenated)."""

    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"ofe_tokenizer": "byte", "vocab_size": 256}))


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from Hugging Face ``tokenizers``, with an end-of-text token."""

    def __init__(self, tokenizer) -> None:  # tokenizers.Tokenizer
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size()
        self.eos_id: int | None = tokenizer.token_to_id(EOS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


Tokenizer = ByteTokenizer | BPETokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer saved by :meth:`ByteTokenizer.save` or :meth:`BPETokenizer.save`. Raises
    ``ValueError`` naming the file when it is not one (garbage, truncated, another library's format)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a tokenizer file ({type(e).__name__})") from None
    if isinstance(data, dict) and data.get("ofe_tokenizer") == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return BPETokenizer(HFTokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{path} is not a tokenizer file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
