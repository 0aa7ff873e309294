"""Run logs: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def truncate_metrics(run_dir: Path, before_step: int) -> None:
    """Drop records with ``step >= before_step`` (logged after the checkpoint a run resumes from)."""
    path = run_dir / METRICS_FILE
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < before_step]
        path.write_text("".join(line + "\n" for line in keep))


class RunLogger:
    """Appends records to ``metrics.jsonl`` and mirrors every scalar to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        if start_step > 0:
            truncate_metrics(run_dir, start_step)
        self._file = (run_dir / METRICS_FILE).open("a")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a killed run wrote after its last checkpoint
        self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step if start_step > 0 else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
            elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                for layer, v in enumerate(value):
                    self._tb.add_scalar(f"{key}/layer_{layer}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
