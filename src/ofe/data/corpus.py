"""Corpus sources and the deterministic train/validation split.

A corpus is a sequence of documents ``(doc_id, text)``. Sources:

* ``stdlib`` (the embedded default): the running Python's standard-library ``.py`` files, a real
  Python-code corpus of ~30 MB (a local stand-in for the authors' CodeParrot); nothing is downloaded;
* a directory: every file matching ``glob`` below it;
* a ``.txt`` file: blocks of ``TXT_BLOCK_LINES`` lines;
* a ``.jsonl`` file: one document per line, text in field ``text_field``;
* a Hugging Face dataset saved with ``save_to_disk`` (needs the optional ``datasets`` package);
* ``bigram-backcopy[:key=value,...]``: the synthetic Bigram-Backcopy task (:mod:`ofe.data.synthetic`),
  generated in memory, where attention sinks and massive activations form within minutes.

Files that are unreadable or not UTF-8 are skipped and counted, never fatal. Each document goes to
validation when a hash of its id falls below ``val_fraction``: the split is deterministic and stable
when documents are added.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ofe.data.synthetic import NAME as SYNTHETIC_NAME
from ofe.data.synthetic import BigramBackcopy, from_spec
from ofe.errors import OfeError

TXT_BLOCK_LINES = 200


class CorpusError(OfeError, ValueError):
    """A user-facing corpus problem (missing, empty, too short, unreadable)."""


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, third-party packages excluded."""
    root = root or stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # never descend into installed packages
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    files.sort()
    if not files:
        raise CorpusError(f"no .py files found under {root}")
    return files


@dataclass
class Corpus:
    """A resolved corpus source: what to read, and how to fingerprint it for caching."""

    kind: str  # "files" | "txt" | "jsonl" | "hf" | "synthetic"
    root: Path
    files: list[Path] = field(default_factory=list)
    text_field: str = "text"
    skipped: int = 0  # files that could not be read as UTF-8 text
    generator: BigramBackcopy | None = None  # the synthetic kind's

    def fingerprint(self) -> str:
        """Hash of the source's identity: paths, sizes and modification times (not contents), or the
        generator's settings."""
        h = hashlib.sha256(f"{self.kind}|{self.root}|{self.text_field}|{sys.version_info[:2]}".encode())
        if self.generator is not None:
            h.update(repr(self.generator).encode())
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.root) if self.kind == 'files' else p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def documents(self) -> Iterator[tuple[str, str]]:
        """Yield ``(doc_id, text)``; unreadable files are counted in ``skipped``."""
        if self.kind == "files":
            yield from self._file_documents()
        elif self.kind == "txt":
            yield from self._txt_documents()
        elif self.kind == "jsonl":
            yield from self._jsonl_documents()
        elif self.kind == "synthetic":
            yield from self.generator.documents()
        else:
            yield from self._hf_documents()

    def _file_documents(self) -> Iterator[tuple[str, str]]:
        for path in self.files:
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                self.skipped += 1
                continue
            yield str(path.relative_to(self.root)), text

    def _txt_documents(self) -> Iterator[tuple[str, str]]:
        path = self.files[0]
        try:
            lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"cannot read {path} as UTF-8 text: {e}") from None
        for i in range(0, len(lines), TXT_BLOCK_LINES):
            yield f"{path.name}:{i}", "".join(lines[i : i + TXT_BLOCK_LINES])

    def _jsonl_documents(self) -> Iterator[tuple[str, str]]:
        path = self.files[0]
        try:
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise CorpusError(f"{path}:{n}: not valid JSON") from None
                    if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
                        raise CorpusError(f"{path}:{n}: no string field '{self.text_field}' (set data.text_field)")
                    yield f"{n}", record[self.text_field]
        except UnicodeDecodeError as e:
            raise CorpusError(f"cannot read {path} as UTF-8: {e}") from None

    def _hf_documents(self) -> Iterator[tuple[str, str]]:
        try:
            import datasets
        except ImportError:
            raise CorpusError(f"{self.root} is a Hugging Face dataset; reading it needs `pip install datasets`") from None
        ds = datasets.load_from_disk(str(self.root))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if self.text_field not in ds.column_names:
            raise CorpusError(f"dataset {self.root} has no column '{self.text_field}' (columns: {ds.column_names})")
        for i, text in enumerate(ds[self.text_field]):
            if isinstance(text, str):
                yield str(i), text


def open_corpus(source: str, glob: str = "**/*", text_field: str = "text") -> Corpus:
    """Resolve a corpus source string (``stdlib`` or a path) to a :class:`Corpus`."""
    if source == "stdlib":
        root = stdlib_root()
        return Corpus("files", root, stdlib_files(root))
    try:
        generator = from_spec(source)
    except ValueError as e:
        raise CorpusError(str(e)) from None
    if generator is not None:
        return Corpus("synthetic", Path(SYNTHETIC_NAME), generator=generator)
    try:
        path = Path(source).expanduser().resolve()
    except RuntimeError as e:  # Python < 3.13: a symbolic-link loop
        raise CorpusError(f"corpus {source}: {e} (a link that points back to itself)") from None
    if not path.exists():
        raise CorpusError(f"corpus not found: {source}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return Corpus("hf", path, files, text_field)
        files = sorted(p for p in path.glob(glob) if p.is_file())
        if not files:
            raise CorpusError(f"no files match '{glob}' under {path}")
        return Corpus("files", path, files, text_field)
    if path.suffix in (".jsonl", ".txt") and not path.is_file():  # a FIFO or device would block or never end
        raise CorpusError(f"corpus {source}: not a regular file (a pipe or device cannot be read twice, as the "
                          "fingerprint and the tokenizer need)")
    if path.suffix == ".jsonl":
        return Corpus("jsonl", path.parent, [path], text_field)
    if path.suffix == ".txt":
        return Corpus("txt", path.parent, [path], text_field)
    raise CorpusError(f"corpus {source}: expected 'stdlib', '{SYNTHETIC_NAME}', a directory, a .txt or .jsonl file, or a saved HF dataset")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split: a document is in validation when its id hashes below ``val_fraction``."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


# ---- small helpers used by the zoo and benchmarks -------------------------------------------------
def read_bytes_sample(files: list[Path], n_bytes: int) -> bytes:
    """Concatenate the files in order (unreadable ones skipped) until ``n_bytes`` are collected."""
    chunks, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= n_bytes:
            break
    return b"".join(chunks)[:n_bytes]


def default_sample(n_bytes: int = 1 << 20) -> np.ndarray:
    """The first ``n_bytes`` of the standard-library corpus as byte tokens, ``uint8 (n_bytes,)``."""
    return np.frombuffer(read_bytes_sample(stdlib_files(), n_bytes), dtype=np.uint8)


def random_windows(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens at seeded random offsets: int64 ``(B, T)``."""
    if len(tokens) <= seq_len:
        raise CorpusError(f"corpus has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64))
