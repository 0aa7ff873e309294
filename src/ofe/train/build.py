"""Turn a :class:`TrainConfig` into the parts a run needs, one short function per part.

:func:`build` is the only entry point: it checks the run directory, prepares the data, resolves the
config against it, writes (or checks) the saved config, builds the model, optimiser, monitor and
kurtosis-update tracker, and restores them from the checkpoint when resuming. The loop
(:mod:`ofe.train.loop`) takes the :class:`Parts` and knows nothing of how any of them is made.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ofe import config as C
from ofe.data import TokenData, check_lengths, prepare, val_windows
from ofe.data.synthetic import NAME as SYNTHETIC_NAME
from ofe.errors import OfeError
from ofe.models import GPT
from ofe.monitor import TRAIN_METRICS, KurtosisUpdateTracker, OutlierMonitor
from ofe.optim import build_optimizer
from ofe.run_dir import CheckpointError, RunDir, RunState
from ofe.train import distributed as D
from ofe.train import sharded as S
from ofe.train.estimate import GIB, estimate
from ofe.resources import too_big
from ofe.run_config import TrainConfig, incompatible_keys


class TrainError(OfeError):
    """A user-facing training problem: output directory, resume mismatch, batch layout."""


@dataclass
class Parts:
    """Everything a run is made of; built by :func:`build`, used by the loop."""

    cfg: TrainConfig  # resolved against the data (vocabulary size, block defaults)
    env: D.DistEnv
    run: RunDir
    data: TokenData
    model: GPT
    optimizer: torch.optim.Optimizer
    ddp: nn.Module  # the model, wrapped in DDP when there are several processes
    forward: nn.Module  # what the loop calls: ``ddp``, compiled if asked
    monitor: OutlierMonitor
    tracker: KurtosisUpdateTracker | None  # main process only; None when disabled
    val: torch.Tensor  # this process's validation windows (B, T + 1)
    start: int  # updates already done
    resuming: bool

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-step over all processes."""
        return self.cfg.batch_size // self.cfg.grad_accum

    @property
    def local_batch_size(self) -> int:
        return self.micro_batch_size // self.env.world_size


def check_run_dir(cfg: TrainConfig, run: RunDir) -> None:
    """The output directory contract, checked before anything is written."""
    state = run.state()
    if cfg.resume:
        if state is RunState.NEW:
            raise TrainError(f"cannot resume: {run} holds no run")
        if state is RunState.BROKEN:
            raise TrainError(f"cannot resume {run}: its saved config is missing or unreadable")
        if state is RunState.FOREIGN:
            raise TrainError(f"cannot resume {run}: it holds files ofe did not write ({', '.join(run.foreign_files())})")
        if state is RunState.DIVERGED:
            reason = (run.read_diverged() or "no reason recorded").split(";")[0].strip()
            raise TrainError(f"cannot resume {run}: its training diverged ({reason}) and would diverge again; start a "
                             "new run in another --out_dir (e.g. with a smaller --optim.lr)")
        return
    if state is RunState.FOREIGN:
        raise TrainError(f"{run} holds files ofe did not write ({', '.join(run.foreign_files())}); choose another "
                         "--out_dir")
    if state is not RunState.NEW:
        raise TrainError(f"{run} already holds a run; pass --resume to continue it or choose another --out_dir")


def check_batch_layout(cfg: TrainConfig, env: D.DistEnv) -> None:
    if cfg.batch_size % (env.world_size * cfg.grad_accum):
        raise TrainError(f"batch_size {cfg.batch_size} is not divisible by processes x grad_accum = "
                         f"{env.world_size} x {cfg.grad_accum}")


def check_memory(cfg: TrainConfig, env: D.DistEnv) -> None:
    """Refuse a run whose estimated memory (:func:`ofe.train.estimate.estimate`) exceeds what the device
    has available, before anything is allocated: per process on a GPU (each has its own), and for all the
    processes of this machine together on the CPU (they share its memory; ``LOCAL_WORLD_SIZE``, set by
    torchrun)."""
    est = estimate(cfg, env.world_size)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if env.device.type == "cpu" else 1
    if problem := too_big(est["memory_gib"]["total"] * GIB * sharing, env.device):
        who = f" x {sharing} processes on this machine" if sharing > 1 else ""
        raise TrainError(f"this run ({est['params']:,} parameters, batch {cfg.batch_size} x {cfg.model.seq_len}{who}) {problem}; "
                         "lower --model.d_model / --model.n_layer / --batch_size, raise --grad_accum, or use more "
                         "processes with --parallel fsdp")


def build_data(cfg: TrainConfig, env: D.DistEnv, log: Callable[..., None]) -> TokenData:
    """The tokenised corpus: prepared by the main process first, then mapped by the others."""
    if env.is_main:
        data = prepare(cfg.data, log=log)
    D.barrier()
    if not env.is_main:
        data = prepare(cfg.data, log=log)
    return data


def resolve(cfg: TrainConfig, data: TokenData) -> TrainConfig:
    """Fix what depends on the data (the vocabulary size) and resolve the block's defaults."""
    model = C.from_dict(type(cfg.model), {**C.to_dict(cfg.model), "vocab_size": data.vocab_size}).resolved()
    check_lengths(data, model.seq_len)
    return dataclasses.replace(cfg, model=model)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), per oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(cfg: TrainConfig, env: D.DistEnv, log: Callable[..., None]) -> TrainConfig:
    """bfloat16 autocast, or SOAP's bf16 products, on a CPU without bf16 units are emulated and slower
    than float32: warn and use float32 (the run's saved config says so)."""
    wants_bf16 = cfg.dtype == "bfloat16" or cfg.optim.rotation.matmul_dtype == "bfloat16"
    if not wants_bf16 or env.device.type != "cpu" or cpu_has_bf16():
        return cfg
    if cfg.dtype == "bfloat16":
        log("warning: this CPU has no bfloat16 matrix units (AVX512-BF16 / AMX): bf16 autocast would be slower "
            "than float32 here, so this run trains in float32")
        cfg = dataclasses.replace(cfg, dtype="float32")
    if cfg.optim.rotation.matmul_dtype == "bfloat16":
        log("warning: this CPU has no bfloat16 matrix units (AVX512-BF16 / AMX): optim.rotation.matmul_dtype "
            "bfloat16 would be slower than float32 here, so the rotation's products run in float32")
        rotation = dataclasses.replace(cfg.optim.rotation, matmul_dtype="float32")
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, rotation=rotation))
    return cfg


def corpus_fingerprint(data: TokenData) -> str:
    """Names the tokenised corpus: its files (paths, sizes, times) and the tokenisation settings."""
    return data.directory.name


def describe_corpus(data: TokenData) -> str:
    """One line that tells two users whether their runs saw the same text: what the corpus is (the
    default is this Python's standard library, so results depend on the Python version), its size
    and its fingerprint."""
    m = data.meta
    name = m.get("corpus")
    if name == "stdlib":
        what = f"the Python {platform.python_version()} standard library"
    elif str(name).partition(":")[0] == SYNTHETIC_NAME:
        what = f"the synthetic Bigram-Backcopy task {name!r}"
    else:
        what = repr(name)
    return (f"corpus: {what}, {m.get('train_docs', 0):,} train / {m.get('val_docs', 0):,} validation documents, "
            f"{m.get('train_tokens', 0):,} / {m.get('val_tokens', 0):,} {m.get('tokenizer')} tokens, "
            f"fingerprint {corpus_fingerprint(data)}")


def start_run(cfg: TrainConfig, run: RunDir, data: TokenData) -> None:
    """A new run: ofe's marker, its identity, the tokenizer, then the config (whose presence makes the
    directory a run)."""
    run.mark()
    run.write_identity(corpus_fingerprint(data), description=describe_corpus(data))
    run.write_tokenizer(data.tokenizer_file)
    run.write_config(cfg)


def check_corpus(run: RunDir, data: TokenData) -> None:
    """A run resumes only on the corpus it started on (a run from before run identities gets one)."""
    identity = run.read_identity()
    if identity is None:
        run.write_identity(corpus_fingerprint(data))
    elif identity.get("corpus") != corpus_fingerprint(data):
        raise TrainError(f"cannot resume {run}: the corpus {data.meta.get('corpus')!r} changed since the run started "
                         f"(fingerprint {identity.get('corpus')} -> {corpus_fingerprint(data)}); restore it or start "
                         "a new run")


def load_resume_state(cfg: TrainConfig, run: RunDir, data: TokenData) -> dict[str, Any] | None:
    """Check that ``cfg`` continues the saved run; its checkpoint, or None (start again at step 0)
    when the run was stopped before its first checkpoint."""
    saved = C.to_dict(run.config())
    bad = incompatible_keys(saved, C.to_dict(cfg))
    if bad:
        raise TrainError(f"cannot resume {run}: the config differs from the saved run in {', '.join(bad)}")
    check_corpus(run, data)
    if not run.tokenizer_path.is_file():
        run.write_tokenizer(data.tokenizer_file)
    if not run.has_checkpoint():
        return None
    state = run.load_checkpoint()
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= cfg.steps:
        raise CheckpointError(f"checkpoint in {run} is at step {step!r}, outside the run's 0..{cfg.steps}: it is "
                              "damaged; remove the run's checkpoints to start it again")
    if incompatible_keys(C.to_dict(run.checkpoint_config(state)), saved):
        raise CheckpointError(f"checkpoint in {run} belongs to a different config")
    return state


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def build_model(cfg: TrainConfig, env: D.DistEnv) -> GPT:
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return GPT(cfg.model).to(env.device)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore(state: dict[str, Any] | None, model: GPT, optimizer: torch.optim.Optimizer, env: D.DistEnv) -> int:
    """Load the checkpoint's weights, optimiser and RNG state; the step to start from. A sharded
    checkpoint (``"shards"``) loads into this process's shards, whatever world size wrote it."""
    if state is None:
        return 0
    if "shards" in state:
        S.load(model, optimizer, Path(state["shards"]))
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"], env.device)
    return int(state["step"])


def wrap_model(model: GPT, cfg: TrainConfig, env: D.DistEnv) -> tuple[nn.Module, nn.Module]:
    """``(ddp, forward)``: DDP over processes when there are several, compiled if asked.
    The monitor's hooks must be attached before this."""
    ddp: nn.Module = model
    if env.world_size > 1 and cfg.parallel == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return ddp, (torch.compile(ddp) if cfg.compile else ddp)


def validation_windows(cfg: TrainConfig, data: TokenData) -> torch.Tensor:
    """All validation windows ``(eval_batches * batch_size, T + 1)``, the same for every process."""
    return val_windows(data.val, cfg.eval_batches * cfg.batch_size, cfg.model.seq_len, bos_id=data.bos_id)


def local_share(val: torch.Tensor, env: D.DistEnv) -> torch.Tensor:
    per_rank = math.ceil(len(val) / env.world_size)
    return val[env.rank * per_rank : (env.rank + 1) * per_rank]


def build_tracker(cfg: TrainConfig, model: GPT, val: torch.Tensor, env: D.DistEnv,
                  state: dict[str, Any] | None) -> KurtosisUpdateTracker | None:
    """Kurtosis-update terms on fixed validation sequences: on the main process only, or, when the
    model is sharded, on every process (its forward passes gather shards from all of them)."""
    if not cfg.decomposition_sequences or not (env.is_main or S.is_sharded(env, cfg.parallel)):
        return None
    tracker = KurtosisUpdateTracker(model, val[: cfg.decomposition_sequences, :-1].to(env.device))
    if state is not None and "decomposition" in state:
        tracker.load_state_dict(state["decomposition"])
    return tracker


def build(cfg: TrainConfig, env: D.DistEnv, run: RunDir, log: Callable[..., None]) -> Parts:
    """Every part of the run, restored from its checkpoint when resuming. The main process must
    hold ``run``'s lock."""
    check_batch_layout(cfg, env)
    check_memory(cfg, env)
    if env.is_main:
        check_run_dir(cfg, run)
        run.create()
    D.barrier()
    data = build_data(cfg, env, log)
    log(describe_corpus(data))
    cfg = resolve(cfg, data)
    if not cfg.resume:
        cfg = check_precision(cfg, env, log)
    state = None
    if cfg.resume:
        state = load_resume_state(cfg, run, data) if env.is_main else _checkpoint_or_none(run)
    elif env.is_main:
        start_run(cfg, run, data)
    seed_everything(cfg.seed)
    model = build_model(cfg, env)
    if S.is_sharded(env, cfg.parallel):
        S.shard(model, env, cfg.dtype)  # before the optimiser: the parameters become DTensors
    optimizer = build_optimizer(cfg.optim, model)
    start = restore(state, model, optimizer, env)
    monitor = OutlierMonitor(model, every=cfg.monitor_interval, metrics=TRAIN_METRICS)  # hooks before DDP / compile
    monitor.shard(env.rank, env.world_size)  # each rank observes its slice; collect() gathers the global batch
    ddp, forward = wrap_model(model, cfg, env)
    val = validation_windows(cfg, data)
    tracker = build_tracker(cfg, model, val, env, state)
    return Parts(cfg, env, run, data, model, optimizer, ddp, forward, monitor, tracker, local_share(val, env),
                 start, resuming=cfg.resume)


def _checkpoint_or_none(run: RunDir) -> dict[str, Any] | None:
    """Other processes read the checkpoint too (only the main process checks it against the config)."""
    return run.load_checkpoint() if run.has_checkpoint() else None
