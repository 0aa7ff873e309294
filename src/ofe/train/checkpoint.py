"""Resumable checkpoints, written atomically and loaded without executing code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ofe.io import atomic_write

CHECKPOINT = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, truncated or from another run."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no code runs); any damage becomes a one-line :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    required = {"step", "model", "optimizer", "rng", "config"}
    if not isinstance(state, dict) or not required <= set(state):
        raise CheckpointError(f"checkpoint {path} lacks {sorted(required - set(state or {}))}: not an ofe checkpoint")
    return state
