"""Run logs: one JSON record per logged step in the run's metrics file, every scalar mirrored to TensorBoard."""

from __future__ import annotations

import json
from typing import Any

from ofe.io import disk_errors
from ofe.run_dir import RunDir


class RunLogger:
    """Appends records to the run's metrics log and TensorBoard events (rank 0 only).

    When a run resumes from the checkpoint of step ``start_step``, records it logged after that
    step are dropped (they will be logged again) and TensorBoard is told to hide its events from
    that step on.
    """

    def __init__(self, run: RunDir, start_step: int, resuming: bool, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        if resuming:
            run.truncate_metrics(start_step)
        self._path = run.metrics_path
        self._file = run.open_metrics()
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run.tensorboard_dir), purge_step=start_step if resuming else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with disk_errors(self._path):
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
