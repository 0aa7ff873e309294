"""The training loop: one function, `train(cfg)`, for one CPU, one GPU or many (torchrun).

Step numbering: a record with ``"step": s`` describes the model after ``s`` optimizer updates
(``train_loss`` and the outlier metrics come from the forward pass that update ``s + 1`` then
uses). The checkpoint written after update ``s`` has ``step = s`` and resumes there.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from tqdm.auto import tqdm

from ofe import config as C
from ofe.analysis.decomposition import KurtosisUpdateTracker
from ofe.data import TokenData, check_lengths, prepare, train_batch, val_windows
from ofe.models import GPT, lm_loss
from ofe.monitor import OutlierMonitor
from ofe.optim import build_optimizer, lr_at
from ofe.train import distributed as D
from ofe.io import atomic_write
from ofe.train.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from ofe.train.config import TrainConfig, incompatible_keys, with_model
from ofe.train.logger import RunLogger

CONFIG_FILE = "config.json"


class TrainError(RuntimeError):
    """A user-facing training problem: output directory, resume mismatch, non-finite loss."""


class NonFiniteLoss(TrainError):
    pass


def prepare_out_dir(cfg: TrainConfig) -> Path:
    """Check the output directory contract before anything is written."""
    out = Path(cfg.out_dir)
    if cfg.resume:
        if not (out / CONFIG_FILE).is_file():
            raise TrainError(f"cannot resume: {out} holds no run ({CONFIG_FILE} missing)")
        return out
    if (out / CONFIG_FILE).exists() or (out / CHECKPOINT).exists():
        raise TrainError(f"{out} already holds a run; pass --resume to continue it or choose another --out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"output directory {out} is not writable: {e.strerror or e}") from None
    return out


def resolve(cfg: TrainConfig, data: TokenData) -> TrainConfig:
    """Fix what depends on the data: the vocabulary size; resolve the block's defaults."""
    model = C.from_dict(type(cfg.model), {**C.to_dict(cfg.model), "vocab_size": data.vocab_size}).resolved()
    check_lengths(data, model.seq_len)
    return with_model(cfg, model)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _record_monitor(record: dict[str, Any], stats: dict[str, Any] | None) -> None:
    """Copy the residual-stream metrics and per-layer attention entropy into a log record."""
    if not stats:
        return
    for name, values in stats.get("resid", {}).items():
        record[name] = values
    heads = stats.get("attn_probs", {}).get("attention_entropy")
    if heads:
        record["attention_entropy"] = [sum(h) / len(h) for h in heads]
        record["attention_entropy_min"] = [min(h) for h in heads]


class Trainer:
    """Holds the run's state; :meth:`run` executes it. Use :func:`train` from outside."""

    def __init__(self, cfg: TrainConfig, log=print) -> None:
        self.env = D.setup(cfg.device)
        if cfg.batch_size % (self.env.world_size * cfg.grad_accum):  # before anything is written
            raise TrainError(f"batch_size {cfg.batch_size} is not divisible by processes x grad_accum = "
                             f"{self.env.world_size} x {cfg.grad_accum}")
        self.log = log if self.env.is_main else (lambda *a, **k: None)
        self.out = prepare_out_dir(cfg) if self.env.is_main else Path(cfg.out_dir)
        D.barrier()
        data = self._prepare_data(cfg)
        self.cfg = cfg = resolve(cfg, data)
        self.data = data
        self.start = 0
        saved = None
        if cfg.resume:
            saved = self._check_resume(cfg)
        elif self.env.is_main:
            atomic_write(self.out / CONFIG_FILE, lambda p: p.write_text(json.dumps(C.to_dict(cfg), indent=1)))
            shutil.copyfile(data.directory / "tokenizer.json", self.out / "tokenizer.json")

        self.micro_bs = cfg.batch_size // cfg.grad_accum  # sequences per micro-step over all ranks
        self.local_bs = self.micro_bs // self.env.world_size
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        dev = self.env.device
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = GPT(cfg.model).to(dev)
        self.optimizer = build_optimizer(cfg.optim, self.model)
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            _set_rng_state(saved["rng"], dev)
            self.start = int(saved["step"])
        self.monitor = OutlierMonitor(self.model, every=cfg.monitor_interval)  # hooks before DDP / compile
        fwd: torch.nn.Module = self.model
        if self.env.world_size > 1:
            fwd = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.ddp = fwd
        self.forward = torch.compile(fwd) if cfg.compile else fwd
        n_val = cfg.eval_batches * cfg.batch_size
        val = val_windows(data.val, n_val, cfg.model.seq_len)
        per_rank = math.ceil(n_val / self.env.world_size)
        self.val = val[self.env.rank * per_rank : (self.env.rank + 1) * per_rank]
        self.tracker = None  # kurtosis-update terms on fixed validation sequences, main process only
        if cfg.decomposition_sequences and self.env.is_main:
            self.tracker = KurtosisUpdateTracker(self.model, val[: cfg.decomposition_sequences, :-1].to(dev))
            if saved is not None and "decomposition" in saved:
                self.tracker.load_state_dict(saved["decomposition"])

    def _prepare_data(self, cfg: TrainConfig) -> TokenData:
        if self.env.is_main:
            data = prepare(cfg.data, log=self.log)
        D.barrier()
        if not self.env.is_main:
            data = prepare(cfg.data, log=self.log)
        return data

    def _check_resume(self, cfg: TrainConfig) -> dict[str, Any]:
        saved_cfg = json.loads((self.out / CONFIG_FILE).read_text())
        bad = incompatible_keys(saved_cfg, C.to_dict(cfg))
        if bad:
            raise TrainError(f"cannot resume {self.out}: the config differs from the saved run in {', '.join(bad)}")
        state = load_checkpoint(self.out / CHECKPOINT)
        if incompatible_keys(json.loads(state["config"]), saved_cfg):
            raise CheckpointError(f"checkpoint in {self.out} belongs to a different config")
        return state

    # ---- pieces of a step ----------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.dtype == "bfloat16":
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        full = train_batch(self.data.train, self.micro_bs, self.cfg.model.seq_len, self.cfg.seed, step, micro)
        local = full[self.env.rank * self.local_bs : (self.env.rank + 1) * self.local_bs].to(self.env.device)
        return local[:, :-1], local[:, 1:]

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.env.device)
        for i in range(0, len(self.val), self.local_bs):
            chunk = self.val[i : i + self.local_bs].to(self.env.device)
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
                with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                    loss = lm_loss(self.forward(x), y) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
        stats = self.monitor.collect(reduce=D.mean_across_ranks)
        if cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        else:
            grad_norm = torch.zeros((), device=self.env.device)
        loss_value, norm_value = D.mean_across_ranks(torch.stack([loss_sum, grad_norm.float()])).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise NonFiniteLoss(f"loss became {loss_value} (gradient norm {norm_value}) at step {step}; "
                                f"stopped before the update; the last good checkpoint in {self.out} is kept")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, stats

    def _save(self, step: int) -> None:
        if self.env.is_main:
            state = {
                "step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": _rng_state(self.env.device), "config": json.dumps(C.to_dict(self.cfg)),
            }
            if self.tracker is not None:
                state["decomposition"] = self.tracker.state_dict()
            save_checkpoint(self.out / CHECKPOINT, state)

    def _record_decomposition(self, record: dict[str, Any]) -> None:
        """Kurtosis-update terms since the previous monitored step (fixed inputs), per layer."""
        if self.tracker is not None:
            terms = self.tracker.update()
            if terms is not None:
                record["kurtosis_update"] = terms

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.start >= cfg.steps:
            self.log(f"{self.out}: already finished ({self.start} of {cfg.steps} steps)")
            return {"step": self.start}
        tokens_per_step = cfg.batch_size * cfg.model.seq_len
        logger = RunLogger(self.out, self.start, enabled=self.env.is_main)
        bar = tqdm(total=cfg.steps, initial=self.start, disable=not (cfg.progress and self.env.is_main),
                   desc=f"{cfg.model.block}", dynamic_ncols=True)
        self.log(f"training {self.model.num_params() / 1e6:.2f}M parameters ({cfg.model.block}) on {self.env.device}"
                 f" x{self.env.world_size}, steps {self.start}..{cfg.steps}, output {self.out}")
        last_kurtosis = float("nan")
        record: dict[str, Any] = {}
        try:
            for step in range(self.start, cfg.steps):
                t0 = time.perf_counter()
                lr = lr_at(cfg.optim, step, cfg.steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                record = {"step": step, "lr": lr, "tokens": step * tokens_per_step}
                if step % cfg.eval_interval == 0:
                    record["val_loss"] = self.evaluate()
                if self.monitor.due(step):
                    self._record_decomposition(record)
                loss, stats = self._train_step(step)
                record["train_loss"] = loss
                _record_monitor(record, stats)
                if "kurtosis" in record:
                    last_kurtosis = max(record["kurtosis"])
                record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
                logger.log(record)
                if (step + 1) % cfg.ckpt_interval == 0 or step + 1 == cfg.steps:
                    self._save(step + 1)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", max_kurt=f"{last_kurtosis:.2f}", tok_s=f"{record['tokens_per_s']:.0f}")
            final = {"step": cfg.steps, "tokens": cfg.steps * tokens_per_step, "val_loss": self.evaluate()}
            x, _ = self._micro_batch(cfg.steps, 0)
            with self.monitor.observe(), torch.no_grad(), self._autocast():
                self.forward(x)
            _record_monitor(final, self.monitor.collect(reduce=D.mean_across_ranks))
            self._record_decomposition(final)
            logger.log(final)
            if self.env.is_main:
                atomic_write(self.out / "model.safetensors", lambda p: save_model(self.model, str(p)))
        finally:
            bar.close()
            logger.close()
            self.monitor.close()
        self.log(f"done: val_loss {final['val_loss']:.4f}, max kurtosis {max(final.get('kurtosis', [float('nan')])):.3f}; "
                 f"wrote {self.out}")
        return final


def train(cfg: TrainConfig, log=print) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the final record."""
    try:
        return Trainer(cfg, log=log).run()
    finally:
        D.teardown()
