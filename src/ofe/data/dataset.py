"""Tokenised corpora stored once as memory-mapped token arrays, and the batches drawn from them.

:func:`prepare` splits a corpus, trains or builds the tokenizer on the training split, encodes both
splits and stores ``train.bin`` / ``val.bin`` / ``tokenizer.json`` / ``meta.json`` in a cache
directory keyed by the corpus fingerprint and the settings; a second run maps them in seconds.

Batches are a pure function of ``(seed, step, micro-step)``, so the data position of a run is its
step count and resuming needs no sampler state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

import numpy as np
import torch

from ofe.config import ConfigError, field
from ofe.io import directory_mode, disk_errors
from ofe.data.corpus import CorpusError, is_validation, open_corpus
from ofe.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

TOKENIZER_FILE = "tokenizer.json"  # in the token cache directory


@dataclass(frozen=True)
class DataConfig:
    corpus: str = field("stdlib", "'stdlib' (the Python standard library's source), 'bigram-backcopy' (a synthetic task), a directory, a .txt or .jsonl file, or a saved HF dataset")
    glob: str = field("**/*", "files to read below a corpus directory")
    text_field: str = field("text", "text field of .jsonl records / HF dataset column")
    val_fraction: float = field(0.05, "fraction of documents held out for validation")
    tokenizer: Literal["byte", "bpe"] = field("byte", "byte-level (vocab 256) or BPE trained on the training split")
    bpe_vocab_size: int = field(8192, "BPE vocabulary size")
    cache_dir: str = field("", "token cache directory; empty: $OFE_CACHE or ~/.cache/ofe")
    bos: bool = field(False, "start every window with a BOS token (id = the tokenizer's vocabulary size, so the "
                             "model's vocabulary grows by one): a consistent first token, where attention sinks "
                             "and massive activations form")

    def __post_init__(self) -> None:
        if not self.corpus.strip():
            raise ConfigError("config key 'data.corpus' is empty; name a corpus ('stdlib', 'bigram-backcopy', a "
                              "directory or a file)")
        if not self.glob.strip() or self.glob.startswith(("/", "~")) or ".." in PurePath(self.glob).parts:
            raise ConfigError(f"config key 'data.glob' must be a non-empty pattern relative to the corpus directory, "
                              f"without '..' (e.g. '**/*.txt'), got {self.glob!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.bpe_vocab_size < 257:
            raise ConfigError(f"data.bpe_vocab_size must be at least 257, got {self.bpe_vocab_size}")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or os.environ.get("OFE_CACHE") or Path.home() / ".cache" / "ofe").expanduser()


@dataclass
class TokenData:
    """Both splits as read-only token arrays, the tokenizer, and what was read."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    meta: dict
    directory: Path
    bos_id: int | None = None  # prepended to every window when DataConfig.bos

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's, plus the BOS token if there is one."""
        return self.tokenizer.vocab_size + (self.bos_id is not None)

    @property
    def tokenizer_file(self) -> Path:
        """The saved tokenizer (a run keeps a copy of it)."""
        return self.directory / TOKENIZER_FILE


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def cache_key(cfg: DataConfig, fingerprint: str) -> str:
    settings = f"{fingerprint}|{cfg.val_fraction}|{cfg.tokenizer}|{cfg.bpe_vocab_size if cfg.tokenizer == 'bpe' else ''}"
    return hashlib.sha256(settings.encode()).hexdigest()[:20]


def prepare(cfg: DataConfig, log=print) -> TokenData:
    """Tokenise ``cfg.corpus`` into the cache (once) and map it. Raises :class:`CorpusError`."""
    corpus = open_corpus(cfg.corpus, cfg.glob, cfg.text_field)
    directory = cfg.resolved_cache_dir() / cache_key(cfg, corpus.fingerprint())
    if (directory / "meta.json").exists() and (problem := cache_problem(directory)):
        warnings.warn(f"token cache {directory} is damaged ({problem}): rebuilding it", stacklevel=2)
        _remove_cache_entry(directory)
    if not (directory / "meta.json").exists():
        with disk_errors(directory):
            _build(cfg, corpus, directory, log)
    data = load_token_data(directory)
    if cfg.bos:
        data.bos_id = data.tokenizer.vocab_size
    return data


CACHE_FILES = ("meta.json", "train.bin", "val.bin", TOKENIZER_FILE)
META_FIELDS = {"corpus": str, "tokenizer": str, "vocab_size": int, "dtype": str, "train_tokens": int, "val_tokens": int}


def _meta_checksum(meta: dict) -> str:
    """SHA-256 of the metadata without its own checksum (canonical JSON): a damaged meta.json shows."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cache_problem(directory: Path) -> str | None:
    """What is wrong with a token-cache entry, or None: meta.json readable, of the right fields and
    matching its checksum (caches written before the checksum have none), each split file as long as
    the metadata says, the tokenizer present, matching its checksum, loadable and of the metadata's size."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable: {type(e).__name__}"
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)
                                         for k, t in META_FIELDS.items()):
        return "meta.json lacks a field or has the wrong type"
    if "checksum" in meta and meta["checksum"] != _meta_checksum(meta):
        return "meta.json does not match its checksum"
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
    except TypeError:
        return f"unknown dtype {meta['dtype']!r}"
    for split in ("train", "val"):
        path, expected = directory / f"{split}.bin", meta[f"{split}_tokens"] * itemsize
        size = path.stat().st_size if path.is_file() else (0 if not expected else -1)
        if size != expected:
            return f"{split}.bin holds {max(size, 0)} bytes, the metadata says {expected}"
    if not (directory / TOKENIZER_FILE).is_file():
        return f"{TOKENIZER_FILE} is missing"
    if "tokenizer_sha256" in meta:  # the file this cache wrote: loading it here as well (every start) adds nothing
        if meta["tokenizer_sha256"] != _file_sha256(directory / TOKENIZER_FILE):
            return f"{TOKENIZER_FILE} does not match its checksum"
        return None
    try:  # a cache written before the checksum: the tokenizer must load and have the recorded vocabulary
        tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    except (OSError, ValueError) as e:
        return str(e)
    if tokenizer.vocab_size != meta["vocab_size"]:
        return f"{TOKENIZER_FILE} has {tokenizer.vocab_size} tokens, the metadata says {meta['vocab_size']}"
    return None


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _remove_cache_entry(directory: Path) -> None:
    """Delete a damaged cache entry: only the files a cache entry holds; anything else there is refused."""
    others = [p.name for p in directory.iterdir() if p.name not in CACHE_FILES]
    if others or directory.is_symlink():
        raise CorpusError(f"token cache {directory} is damaged and holds files ofe did not write ({', '.join(others[:3])}); "
                          "remove it by hand")
    for name in CACHE_FILES:
        (directory / name).unlink(missing_ok=True)
    directory.rmdir()


def load_token_data(directory: Path) -> TokenData:
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    arrays = [np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r") if meta[f"{split}_tokens"] else np.zeros(0, dtype)
              for split in ("train", "val")]
    return TokenData(arrays[0], arrays[1], load_tokenizer(directory / TOKENIZER_FILE), meta, directory)


def _build(cfg: DataConfig, corpus, directory: Path, log) -> None:
    train_texts, val_texts = [], []
    for doc_id, text in corpus.documents():
        (val_texts if is_validation(doc_id, cfg.val_fraction) else train_texts).append(text)
    n_docs = len(train_texts) + len(val_texts)
    if n_docs == 0 or not any(train_texts):
        raise CorpusError(f"corpus {cfg.corpus} has no readable text ({corpus.skipped} files skipped)")
    log(f"tokenising {cfg.corpus}: {len(train_texts)} train / {len(val_texts)} validation documents"
        + (f", {corpus.skipped} unreadable files skipped" if corpus.skipped else ""))
    tok: Tokenizer = ByteTokenizer() if cfg.tokenizer == "byte" else BPETokenizer.train(train_texts, cfg.bpe_vocab_size)
    dtype = _token_dtype(tok.vocab_size)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tmp-"))
    os.chmod(tmp, directory_mode())  # the entry is renamed into place whole: readable as a mkdir'd folder
    try:
        counts = {split: _encode_to_file(tok, texts, tmp / f"{split}.bin", dtype)
                  for split, texts in (("train", train_texts), ("val", val_texts))}
        tok.save(tmp / TOKENIZER_FILE)
        meta = {"corpus": cfg.corpus, "tokenizer": cfg.tokenizer, "vocab_size": tok.vocab_size, "dtype": dtype.name,
                "train_docs": len(train_texts), "val_docs": len(val_texts), "skipped_files": corpus.skipped,
                "train_tokens": counts["train"], "val_tokens": counts["val"], "val_fraction": cfg.val_fraction}
        meta["tokenizer_sha256"] = _file_sha256(tmp / TOKENIZER_FILE)
        meta["checksum"] = _meta_checksum(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _encode_to_file(tok: Tokenizer, texts: list[str], path: Path, dtype: np.dtype) -> int:
    """Encode documents (EOS-separated for BPE) and write them as one flat array; returns the count."""
    with path.open("wb") as f:
        if isinstance(tok, ByteTokenizer):
            data = "".join(texts).encode("utf-8")
            f.write(data)
            return len(data)
        total = 0
        for i in range(0, len(texts), 256):
            for ids in tok.encode_batch(texts[i : i + 256]):
                arr = np.asarray(ids + [tok.eos_id], dtype=dtype)
                f.write(arr.tobytes())
                total += len(arr)
        return total


def train_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, micro: int = 0,
                bos_id: int | None = None) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` tokens for ``(seed, step, micro)``: int64 ``(B, T+1)``.
    With ``bos_id`` each window is that token followed by ``seq_len`` tokens of text."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return _gather(tokens, starts, seq_len + 1, bos_id)


def val_windows(tokens: np.ndarray, n: int, seq_len: int, bos_id: int | None = None) -> torch.Tensor:
    """A fixed validation set: ``n`` evenly spaced windows of ``seq_len + 1`` tokens, ``(n, T+1)`` (the
    first one ``bos_id`` if given)."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).round().astype(np.int64)
    return _gather(tokens, starts, seq_len + 1, bos_id)


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int, bos_id: int | None = None) -> torch.Tensor:
    if bos_id is not None:
        text = _gather(tokens, starts, length - 1)
        return torch.cat([torch.full((len(starts), 1), bos_id, dtype=torch.int64), text], dim=1)
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts]))


def check_lengths(data: TokenData, seq_len: int) -> None:
    """Both splits must hold at least one window of ``seq_len + 1`` tokens."""
    for split, arr in (("training", data.train), ("validation", data.val)):
        if len(arr) <= seq_len:
            raise CorpusError(
                f"the {split} split has {len(arr)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
                + (" (raise data.val_fraction or use a larger corpus)" if split == "validation" else "")
            )
