"""The training loop: one function, `train(cfg)`, for one CPU, one GPU or many (torchrun).

:func:`train` builds the run's parts (:mod:`ofe.train.build`) and runs them. The loop knows the
order of a step (schedule, evaluation, forward/backward with the monitor observing, clipping,
update, logging, checkpoint), not how a metric is computed or how an optimiser works inside.

Step numbering: a record with ``"step": s`` describes the model after ``s`` optimizer updates
(``train_loss`` and the outlier metrics come from the forward pass that update ``s + 1`` then
uses). The checkpoint written after update ``s`` has ``step = s`` and resumes there.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ofe import config as C
from ofe.data import train_batch
from ofe.io import pause_point
from ofe.models import lm_loss
from ofe.monitor.measure import gather_across_ranks
from ofe.optim import lr_at
from ofe.quant.probe import PROBE_CALIBRATION, PROBE_WINDOWS, QuantProbe
from ofe.quant.quantize import calibration_batches
from ofe.run_dir import RunDir
from ofe.train import distributed as D
from ofe.train import sharded as S
from ofe.train.build import Parts, TrainError, build, check_run_dir, rng_state, validation_windows
from ofe.run_config import TrainConfig
from ofe.train.logger import RunLogger


class NonFiniteLoss(TrainError):
    """The loss or gradient norm became NaN or infinite: the run stops before the update."""

    exit_code = 3


def monitor_record(stats: dict[str, Any] | None) -> dict[str, Any]:
    """The residual-stream metrics, per-layer attention entropy (mean and lowest head) and attention
    sink score (highest head) of a monitor result, as log-record fields."""
    if not stats:
        return {}
    record = dict(stats.get("resid", {}))
    probs = stats.get("attn_probs", {})
    heads = probs.get("attention_entropy")
    if heads:
        record["attention_entropy"] = [sum(h) / len(h) for h in heads]
        record["attention_entropy_min"] = [min(h) for h in heads]
    if probs.get("sink_score"):
        record["attention_sink"] = [max(h) for h in probs["sink_score"]]
    return record


class Trainer:
    """Runs the parts of one run (built by :func:`ofe.train.build.build`). Use :func:`train` from outside."""

    def __init__(self, parts: Parts, log: Callable[..., None] = print) -> None:
        self.parts = parts
        self.cfg = parts.cfg
        self.env = parts.env
        self.model, self.optimizer, self.monitor, self.tracker = parts.model, parts.optimizer, parts.monitor, parts.tracker
        self.forward, self.ddp, self.val, self.data = parts.forward, parts.ddp, parts.val, parts.data
        self.start = parts.start
        # steps of the newest checkpoint and the one before; the newest is "unverified" until the
        # weights it holds have given a finite loss
        self.last_checkpoint: int | None = parts.start if parts.resuming and parts.start else None
        self.previous_checkpoint: int | None = None
        self.unverified_checkpoint: int | None = self.last_checkpoint
        self.log = log if self.env.is_main else (lambda *a, **k: None)
        self.probe = self._quant_probe() if self.cfg.quant_probe and self.env.is_main else None

    def _quant_probe(self) -> QuantProbe:
        """The probe's fixed data (:mod:`ofe.quant.probe`): the first validation windows (the same at
        any world size) and its own calibration batches."""
        device = self.env.device
        calib = [b.to(device) for b in calibration_batches(self.parts.data, self.cfg, PROBE_CALIBRATION)]
        windows = validation_windows(self.cfg, self.parts.data)[:PROBE_WINDOWS]  # all of them, not this rank's share
        return QuantProbe(windows.to(device), calib)

    # ---- pieces of a step ----------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.parts
        full = train_batch(p.data.train, p.micro_batch_size, self.cfg.model.seq_len, self.cfg.seed, step, micro,
                           bos_id=p.data.bos_id)
        local = full[self.env.rank * p.local_batch_size : (self.env.rank + 1) * p.local_batch_size].to(self.env.device)
        return local[:, :-1], local[:, 1:]

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.env.device)
        for i in range(0, len(self.val), self.parts.local_batch_size):
            chunk = self.val[i : i + self.parts.local_batch_size].to(self.env.device)
            with self._autocast():
                loss = lm_loss(self.forward(chunk[:, :-1]), chunk[:, 1:])
            total += loss * len(chunk)
        self.model.train()
        return D.mean_across_ranks(total / max(1, len(self.val))).item()

    def _train_step(self, step: int) -> tuple[float, dict[str, Any] | None]:
        """Forward/backward over the micro-batches and one update; returns (loss, monitor stats)."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.env.device)
        with self.monitor.observe(step):
            for micro in range(cfg.grad_accum):
                x, y = self._micro_batch(step, micro)
                sync = micro == cfg.grad_accum - 1 or self.env.world_size == 1
                with (contextlib.nullcontext() if sync else S.no_gradient_sync(self.ddp)), self._autocast():
                    loss = lm_loss(self.forward(x), y) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
        stats = self.monitor.collect(gather_across_ranks)
        if cfg.optim.grad_clip > 0:
            grad_norm = S.reduce_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
        else:
            grad_norm = torch.zeros((), device=self.env.device)
        loss_value, norm_value = D.mean_across_ranks(torch.stack([loss_sum, grad_norm.float()])).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise NonFiniteLoss(f"loss became {loss_value} (gradient norm {norm_value}) at step {step}; "
                                f"stopped before the update; {self._keep_last_finite(step)}; the run is marked "
                                "diverged (--resume refuses it)")
        self._checkpoint_verified(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, stats

    def _checkpoint_verified(self, step: int) -> None:
        """The weights of step ``step`` gave a finite loss: if they are the newest checkpoint's,
        the one before it is no longer needed."""
        if step == self.unverified_checkpoint:
            if self.env.is_main:
                self.parts.run.confirm_checkpoint()
            self.unverified_checkpoint = None

    def _keep_last_finite(self, step: int) -> str:
        """After a non-finite loss at ``step``: drop the newest checkpoint if it holds the weights that
        gave it, keeping the last one whose loss was finite; say which step that is."""
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        if step != self.unverified_checkpoint:
            return f"the checkpoint of step {self.last_checkpoint} in {self.parts.run} is kept (its loss was finite)"
        if self.env.is_main and self.parts.run.revert_checkpoint():
            kept = f"the one of step {self.previous_checkpoint}" if self.previous_checkpoint is not None else "the one before it"
            return (f"the newest checkpoint (step {step}) gave it and was dropped; {kept} in {self.parts.run} is kept "
                    "(its loss was finite)")
        if self.env.is_main:
            return f"the only checkpoint (step {step}) gave it and was dropped"
        return "rank 0 keeps the last checkpoint whose loss was finite"

    def _close(self, bar: tqdm, logger: RunLogger) -> None:
        bar.close()
        self.monitor.close()
        logger.close()

    def _save(self, step: int) -> None:
        if self.cfg.parallel == "fsdp":
            self._save_sharded(step)
        elif self.env.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **self._run_state(step)}
            self.parts.run.save_checkpoint(state)
        self.previous_checkpoint, self.last_checkpoint, self.unverified_checkpoint = self.last_checkpoint, step, step

    def _run_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint holds besides the weights and the optimiser state."""
        state = {"step": step, "rng": rng_state(self.env.device), "config": json.dumps(C.to_dict(self.cfg))}
        if self.tracker is not None:
            state["decomposition"] = self.tracker.state_dict()
        return state

    def _save_sharded(self, step: int) -> None:
        """Every process writes its shards into the run's staging directory; then the main process
        adds the run state and renames the directory into place (:meth:`RunDir.finish_sharded_checkpoint`)."""
        run = self.parts.run
        if self.env.is_main:
            run.begin_sharded_checkpoint()
        D.barrier()
        S.save(self.model, self.optimizer, run.sharded_staging_path)
        D.barrier()
        pause_point(f"shards-written-{step}")
        if self.env.is_main:
            run.finish_sharded_checkpoint(self._run_state(step))
        D.barrier()

    def _whole_model(self) -> torch.nn.Module | None:
        """The unsharded model on the main process (None elsewhere); a collective when sharded, so
        every process calls it at the same points."""
        return S.gathered(self.model, self.cfg.model, self.env, self.cfg.parallel)

    def _decomposition_record(self) -> dict[str, Any]:
        """Kurtosis-update terms since the previous monitored step (fixed inputs), per layer."""
        terms = self.tracker.update() if self.tracker is not None else None
        return {} if terms is None else {"kurtosis_update": terms}

    def _final_record(self, tokens_per_step: int, whole: torch.nn.Module | None) -> dict[str, Any]:
        """Validation loss, monitor metrics and decomposition terms of the trained model."""
        cfg = self.cfg
        final = {"step": cfg.steps, "tokens": cfg.steps * tokens_per_step, "val_loss": self.evaluate(),
                 "threads": torch.get_num_threads()}  # what the run's numbers were computed with (they vary with it)
        if math.isfinite(final["val_loss"]):
            self._checkpoint_verified(cfg.steps)
        x, _ = self._micro_batch(cfg.steps, 0)
        with self.monitor.observe(), torch.no_grad(), self._autocast():
            self.forward(x)
        final.update(monitor_record(self.monitor.collect(gather_across_ranks)))
        final.update(self._decomposition_record())
        if self.cfg.quant_probe and self.probe is not None:
            final.update(self.probe.measure(whole))
        return final

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train from ``start`` to ``cfg.steps``, then log the final record and write the final
        weights. A run whose final checkpoint exists but whose weights do not is completed."""
        cfg, run_dir = self.cfg, self.parts.run
        if run_dir.is_finished():
            self.log(f"{run_dir}: already finished ({self.start} of {cfg.steps} steps)")
            return {"step": self.start}
        tokens_per_step = cfg.batch_size * cfg.model.seq_len
        logger = RunLogger(run_dir, self.start, resuming=self.parts.resuming, enabled=self.env.is_main)
        bar = tqdm(total=cfg.steps, initial=self.start, disable=not (cfg.progress and self.env.is_main),
                   desc=f"{cfg.model.block}", dynamic_ncols=True)
        self.log(f"training {self.model.num_params() / 1e6:.2f}M parameters ({cfg.model.block}) on {self.env.device}"
                 f" x{self.env.world_size}, steps {self.start}..{cfg.steps}, output {run_dir}")
        try:
            final = self._steps(run_dir, logger, bar, tokens_per_step)
        except BaseException as e:
            if isinstance(e, NonFiniteLoss) and self.env.is_main:
                run_dir.write_diverged(str(e))  # a run state: --resume refuses it, reports count it as diverged
            with contextlib.suppress(OSError):  # a full disk fails the close too: the first error is the one to see
                self._close(bar, logger)
            raise
        self._close(bar, logger)
        self.log(f"done: val_loss {final['val_loss']:.4f}, max kurtosis {max(final.get('kurtosis', [float('nan')])):.3f}; "
                 f"wrote {run_dir}")
        return final

    def _steps(self, run_dir: RunDir, logger: RunLogger, bar: tqdm, tokens_per_step: int) -> dict[str, Any]:
        """The updates from ``start`` to ``cfg.steps``, the final record and the final weights."""
        cfg = self.cfg
        last_kurtosis = float("nan")
        for step in range(self.start, cfg.steps):
            pause_point(f"step-{step}")
            t0 = time.perf_counter()
            lr = lr_at(cfg.optim, step, cfg.steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            record: dict[str, Any] = {"step": step, "lr": lr, "tokens": step * tokens_per_step}
            keep = cfg.keep_weights and step > 0 and step % cfg.eval_interval == 0
            probe = bool(cfg.quant_probe) and step % cfg.quant_probe == 0
            whole = self._whole_model() if keep or probe else None  # one gather when both are due
            if step % cfg.eval_interval == 0:
                record["val_loss"] = self.evaluate()
                if keep and self.env.is_main:
                    run_dir.keep_weights(step, whole)
            if self.monitor.due(step):
                record.update(self._decomposition_record())
            if probe and self.probe is not None:
                record.update(self.probe.measure(whole))
            loss, stats = self._train_step(step)
            record["train_loss"] = loss
            record.update(monitor_record(stats))
            if "kurtosis" in record:
                last_kurtosis = max(record["kurtosis"])
            record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
            logger.log(record)
            if (step + 1) % cfg.ckpt_interval == 0 or step + 1 == cfg.steps:
                self._save(step + 1)
                pause_point(f"after-checkpoint-{step + 1}")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", max_kurt=f"{last_kurtosis:.2f}", tok_s=f"{record['tokens_per_s']:.0f}")
        whole = self._whole_model()  # the trained weights, once: the final probe and the saved weights
        final = self._final_record(tokens_per_step, whole)
        logger.log(final)
        if self.env.is_main:
            pause_point("before-weights")
            run_dir.save_weights(whole)
        return final


def build_trainer(cfg: TrainConfig, log: Callable[..., None] = print) -> Trainer:
    """A :class:`Trainer` for ``cfg`` that the caller steps itself (benchmarks, notebooks); it
    writes the run's config and tokenizer but takes no lock. :func:`train` is the normal way."""
    return Trainer(build(cfg, D.setup(cfg.device), RunDir(cfg.out_dir), log), log=log)


def train(cfg: TrainConfig, log: Callable[..., None] = print) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the final record.

    The main process holds the run directory's lock throughout, so a second ``ofe train`` on the
    same directory stops at once with "run in use by pid N".
    """
    env = D.setup(cfg.device)
    run = RunDir(cfg.out_dir)
    try:
        if env.is_main:
            check_run_dir(cfg, run)  # before the lock creates the directory
        with run.lock() if env.is_main else contextlib.nullcontext():
            return Trainer(build(cfg, env, run, log if env.is_main else (lambda *a, **k: None)), log=log).run()
    finally:
        D.teardown()
