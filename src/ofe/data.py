"""Corpora: the embedded default is the running Python's standard-library source code.

Every Python install ships its standard library as ``.py`` files, a real Python-code corpus of
tens of MB (a local stand-in for the authors' CodeParrot), so nothing is ever downloaded.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch


class CorpusError(ValueError):
    """A user-facing corpus problem (missing, empty, too short)."""


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, third-party packages excluded."""
    root = root or stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    if not files:
        raise CorpusError(f"no .py files found under {root}")
    return files


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
