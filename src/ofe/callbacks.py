"""The OutlierMonitor as a Hugging Face ``Trainer`` callback and a PyTorch Lightning callback.

Both observe the training forward pass on due steps and log the per-layer metrics through the
framework's own loggers (``Trainer.log`` / the Lightning trainer's loggers), as flat scalars named
``ofe/<site>/<metric>/<layer>`` plus ``ofe/<site>/<metric>/max``. The frameworks are optional
imports: constructing a callback without its framework installed raises an ImportError saying what
to install.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds)
    trainer.add_callback(HFOutlierCallback(trainer, every=50))

    lightning.Trainer(callbacks=[LightningOutlierCallback(every=50)]).fit(module)
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from ofe.monitor import DEFAULT_METRICS, OutlierMonitor, Results, flatten_results


def scalars(results: Results) -> dict[str, float]:
    """Flat ``ofe/site/metric/layer`` scalars (attention entropy averaged over heads) and per-metric maxima."""
    out: dict[str, float] = {}
    for site, by_metric in results.items():
        for name, values in by_metric.items():
            if isinstance(values, list) and values and isinstance(values[0], list):  # per-head lists
                values = [sum(v) / len(v) for v in values]
            for key, value in flatten_results({site: {name: values}}).items():
                out[f"ofe/{key}"] = value
            if isinstance(values, list) and values:
                out[f"ofe/{site}/{name}/max"] = max(values)
    return out


class _Observer:
    """Shared by both callbacks: attach once, observe due steps, return scalars to log."""

    def __init__(self, every: int, metrics, monitor_kwargs: dict[str, Any]) -> None:
        self.every, self.metrics, self.kwargs = every, metrics, monitor_kwargs
        self.monitor: OutlierMonitor | None = None
        self._ctx: contextlib.AbstractContextManager | None = None

    def attach(self, model: nn.Module) -> None:
        if self.monitor is None:
            self.monitor = OutlierMonitor(model, every=self.every, metrics=self.metrics, **self.kwargs)

    def begin(self, step: int) -> None:
        self._ctx = self.monitor.observe(step)
        self._ctx.__enter__()

    def end(self) -> dict[str, float]:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        results = self.monitor.collect()
        return scalars(results) if results else {}

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


def _hf_base():
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ImportError("HFOutlierCallback needs transformers: pip install 'ofe[hf]'") from None
    return TrainerCallback


def HFOutlierCallback(trainer=None, every: int = 10, metrics=DEFAULT_METRICS, **monitor_kwargs):  # noqa: N802
    """A ``transformers.TrainerCallback`` logging outlier metrics every ``every`` optimizer steps.

    With ``trainer`` the scalars go through ``trainer.log`` (so every reporting integration, e.g.
    TensorBoard, and ``trainer.state.log_history`` get them); without it they are appended to
    ``state.log_history`` only.
    """
    base = _hf_base()

    class _Callback(base):
        def __init__(self) -> None:
            self.observer = _Observer(every, metrics, monitor_kwargs)
            self.trainer = trainer

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.observer.attach(model)

        def on_step_begin(self, args, state, control, **kwargs):
            self.observer.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            logs = self.observer.end()
            if logs:
                if self.trainer is not None:
                    self.trainer.log(logs)
                else:
                    state.log_history.append({**logs, "step": state.global_step})

        def on_train_end(self, args, state, control, **kwargs):
            self.observer.close()

    return _Callback()


def LightningOutlierCallback(every: int = 10, metrics=DEFAULT_METRICS, **monitor_kwargs):  # noqa: N802
    """A ``lightning.pytorch.Callback`` logging outlier metrics every ``every`` training batches to
    every logger of the Lightning ``Trainer`` (``logger.log_metrics``), at the global step."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError("LightningOutlierCallback needs lightning: pip install lightning") from None

    class _Callback(Callback):
        def __init__(self) -> None:
            self.observer = _Observer(every, metrics, monitor_kwargs)

        def on_fit_start(self, trainer, pl_module):
            self.observer.attach(pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.observer.begin(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logs = self.observer.end()
            if logs:  # straight to the loggers: log_dict would repeat stale values on unmonitored steps
                for logger in trainer.loggers:
                    logger.log_metrics(logs, step=trainer.global_step)

        def on_fit_end(self, trainer, pl_module):
            self.observer.close()

    return _Callback()
