"""`ofe reproduce`: the paper's central study on the embedded corpus, end to end.

Trains the *arms* {Pre-LN, OP} x {AdamW, SOAP} (and any other blocks / optimisers asked for), each
at its own tuned lr, with identical settings otherwise; quantises every model, and for the C8 pair
(Pre-LN + AdamW against OP + SOAP, one seed at a time) also the better run's weights at the worse
run's final validation loss (matched loss); writes the report and ``claims.json`` and prints the
claims table. The C8 pair runs on ``seeds``, the other arms (which isolate the block, C2, and the
optimiser, C6) on ``other_seeds``. It is an ordinary :mod:`ofe.experiment.sweep`, so an interrupted
study resumes where it stopped.

Learning rates: each study carries the per-arm lrs that its committed tuning sweep chose
(``configs/sweeps/``; results in ``docs/results/``); ``--tune`` re-runs that grid on the first seed
(the tuning runs at the chosen lr are the study's runs of that seed) and uses what it finds.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ofe import config as C
from ofe.analysis import load_runs
from ofe.analysis.claims import ClaimResult, c8_pairs, format_claims
from ofe.analysis.fair import arm_key, matched_point, tuned_lrs
from ofe.analysis.runs import Run
from ofe.train.estimate import describe, estimate
from ofe.experiment.sweep import exclusive_study, parse_spec, run_sweep
from ofe.models import BLOCK_TYPES, preset_fields
from ofe.optim import OPTIMIZERS
from ofe.quant import QuantizeOptions, quantize_run
from ofe.report import run_row, write_report
from ofe.report.write import runs_table

C8_PAIR = (("pre-ln", "adamw"), ("op", "soap"))
SLOW_OPTIMIZERS = ("soap", "rotated-adafactor")  # per step ~1.6x AdamW's on the CPU studies (bigram-backcopy.md)

# Settings per study scale (by preset); every one can be overridden by ReproduceOptions's options.
# "lrs": each arm's lr ("block+optimiser"), or a list of lrs trained on every seed; "lr": the lr of any
# other arm; "tune": the grid of --tune.
STUDIES: dict[str, dict[str, Any]] = {
    # The quick study (0.84M parameters, 7.5 min on 2 cores). lrs: each arm's best final val loss over
    # the grid on seed 0 (`ofe reproduce --tune true`, docs/results/studies/reproduce.md): Pre-LN + AdamW 3e-3
    # (at 1e-2 it grows kurtosis 7-9 but its loss is 0.49 nats worse), OP + AdamW 3e-2 (the grid's edge).
    "study-cpu": {"train": {"steps": 300, "batch_size": 32, "eval_interval": 100, "monitor_interval": 20,
                            "ckpt_interval": 100, "keep_weights": True}, "lr": 1e-2,
                  "lrs": {"pre-ln+adamw": 3e-3, "pre-ln+soap": 1e-2, "op+adamw": 3e-2, "op+soap": 1e-2},
                  "tune": [1e-3, 3e-3, 1e-2, 3e-2],
                  "seeds": (0, 1), "other_seeds": (0, 1)},
    # The headline regime (docs/results/studies/headline-search.md): 4.8M parameters, bytes, a constant lr
    # after warmup, no weight decay, bf16 autocast, weights kept at every evaluation (matched loss),
    # 4000 steps. Pre-LN + AdamW's tuned lr: 1e-3 (final val loss 0.951 against 3e-4's and 3e-3's
    # 0.955-1.0, section 7); at 1e-3 its outlier features grow late, from step ~2000. OP + SOAP: 3e-3,
    # not tuned. About 35 min (AdamW) and 60 min (SOAP) per run on 2 CPU cores.
    "small-cpu": {"train": {"steps": 4000, "batch_size": 32, "eval_interval": 250, "monitor_interval": 100,
                            "ckpt_interval": 500, "dtype": "bfloat16", "keep_weights": True,
                            "model": {"activation": "gelu"},
                            "optim": {"weight_decay": 0.0, "decay": "constant"}},
                  "lr": 3e-3, "lrs": {"pre-ln+adamw": 1e-3}, "tune": [3e-4, 1e-3, 3e-3], "seeds": (0, 1, 2),
                  "other_seeds": (0,)},
    # The synthetic Bigram-Backcopy task (docs/results/studies/bigram-backcopy.md), the default: 0.43M parameters,
    # 2 blocks, every window starts with a BOS token; an attention sink and a position-0 spike form
    # within minutes. The paper's schedule (5% warmup, linear decay to 0), no weight decay. The C8 pair
    # trains at three lrs each on every seed, spanning each arm's near-optimal band, so that C8 is judged
    # over the bands the study itself measures (docs/claims-protocol.md); the other arms at one lr each.
    # 1500 steps of 16 sequences (the 2000 x 32 grid of bigram-backcopy.md section 4 takes ~55 min on a
    # 2-core AMD EPYC; this fits 20 min with two one-thread runs at a time: probes in section 5).
    "backcopy-cpu": {"train": {"steps": 1500, "batch_size": 16, "eval_interval": 150, "monitor_interval": 75,
                               "ckpt_interval": 750, "dtype": "bfloat16", "keep_weights": True,
                               "data": {"corpus": "bigram-backcopy", "bos": True}, "model": {"activation": "gelu"},
                               "optim": {"weight_decay": 0.0, "decay": "linear", "warmup_frac": 0.05}},
                     "lr": 3e-3, "lrs": {"pre-ln+adamw": [3e-3, 1e-2, 3e-2], "op+soap": [1e-3, 3e-3, 1e-2],
                                         "pre-ln+soap": 1e-2, "op+adamw": 3e-3},
                     "tune": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "seeds": (0, 1, 2), "other_seeds": (0,)},
    # Real text (the Python standard library, bytes) within two hours on 2 cores: the width-64 regime of
    # docs/results/studies/realtext-search.md (probes B and C), in which Pre-LN + AdamW's W8A8 cost passes 2%
    # at an lr tied for its best loss. BOS on every window, batch 16, 3000 steps, a constant lr after a 5%
    # warmup, no weight decay, float32 (the probes' dtype, the same numbers on every processor). Only the
    # C8 pair, three lrs each around the probes' best, on three seeds: 18 runs of ~8-11 min on one core.
    "realtext-cpu": {"train": {"steps": 3000, "batch_size": 16, "eval_interval": 500, "eval_batches": 16,
                               "monitor_interval": 250, "ckpt_interval": 1000, "dtype": "float32", "keep_weights": True,
                               "data": {"bos": True}, "model": {"activation": "gelu"},
                               "optim": {"weight_decay": 0.0, "decay": "constant", "warmup_frac": 0.05}},
                     "lr": 1e-2, "lrs": {"pre-ln+adamw": [3e-3, 6e-3, 1e-2], "op+soap": [6e-3, 1e-2, 2e-2]},
                     "tune": [3e-3, 6e-3, 1e-2, 2e-2], "seeds": (0, 1, 2), "other_seeds": ()},
    "codeparrot-130m": {"train": {"steps": 10000, "batch_size": 128, "eval_interval": 500, "monitor_interval": 100,
                                  "ckpt_interval": 1000, "dtype": "bfloat16", "compile": True, "keep_weights": True,
                                  "data": {"tokenizer": "bpe", "bpe_vocab_size": 32768}},
                        "lr": 1e-3, "lrs": {}, "tune": [3e-4, 1e-3, 3e-3], "seeds": (0, 1, 2), "other_seeds": (0,)},
}
DEFAULT_STUDY = "backcopy-cpu"  # the main job: the one CPU study that shows C8 within minutes
FALLBACK_STUDY = "study-cpu"  # the settings of a preset without its own study (real text)


@dataclass(frozen=True)
class ReproduceOptions:
    """Options of ``ofe reproduce``."""

    preset: str = C.field(DEFAULT_STUDY, f"model preset; studies are tuned for {', '.join(STUDIES)} "
                                         f"(others use {FALLBACK_STUDY}'s)")
    out_dir: str = C.field("runs/reproduce", "directory of the runs; the report goes to OUT_DIR/report")
    blocks: tuple[str, ...] = C.field(("pre-ln", "op"), "comma-separated blocks to compare")
    optimizers: tuple[str, ...] = C.field(("adamw", "soap"), "comma-separated optimisers to compare")
    seeds: tuple[int, ...] = C.field((), "comma-separated seeds of the C8 pair (Pre-LN + AdamW, OP + SOAP); empty: the "
                                         "study's (study-cpu 0,1; small-cpu, backcopy-cpu 0,1,2)")
    other_seeds: tuple[int, ...] | None = C.field(None, "comma-separated seeds of the other arms (e.g. Pre-LN + SOAP); "
                                                        "empty: only the C8 pair; none: the study's (study-cpu 0,1; "
                                                        "small-cpu, backcopy-cpu 0)")
    steps: int = C.field(0, "updates per run; 0: the study's default (study-cpu 300, small-cpu 4000, "
                                 "backcopy-cpu 1500)")
    batch_size: int = C.field(0, "sequences per update; 0: the study's default (32; backcopy-cpu 16)")
    lr: float = C.field(0.0, "peak lr of every arm; 0: each arm's lr from the study's table (or --tune), else the "
                             "study's lr (study-cpu 1e-2, small-cpu 3e-3)")
    tune: bool = C.field(False, "first run the study's lr grid for every arm on the first seed and use the "
                                "best (lowest final val loss) lr of each")
    betas: tuple[float, ...] = C.field((0.9, 0.95), "(beta1, beta2) of every optimiser")
    corpus: str = C.field("", "corpus (see ofe train --data.corpus); empty: the study's (the Python standard "
                                 "library; bigram-backcopy for backcopy-cpu)")
    quantize: bool = C.field(True, "quantise every run (W8A8 and the bit-width sweep), and the matched-loss weights")
    device: str = C.field("auto", "auto, cpu, cuda, cuda:N")
    workers: int = C.field(0, "runs trained at a time, each on cpu_count / workers threads; 0: 2 on a CPU (two "
                              "one-thread runs use 2 cores ~1.4x better than one two-thread run), 1 on a GPU")
    progress: bool = C.field(True, "show a progress bar over the study")
    dry_run: bool = C.field(False, "list the runs the study would train with their estimated FLOPs and memory "
                                   "(ofe.train.estimate); train nothing")

    def __post_init__(self) -> None:
        preset_fields(self.preset)
        for key, values, known in (("blocks", self.blocks, BLOCK_TYPES), ("optimizers", self.optimizers, OPTIMIZERS)):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise C.ConfigError(f"config key '{key}': unknown {bad[0] if bad else '(none)'!r} (known: {', '.join(known)})")
        study = study_of(self.preset)
        if not self.seeds:
            object.__setattr__(self, "seeds", tuple(study["seeds"]))
        if self.other_seeds is None:
            object.__setattr__(self, "other_seeds", tuple(study["other_seeds"]))
        if self.steps < 0 or self.lr < 0 or self.batch_size < 0:
            raise C.ConfigError("config keys 'steps', 'batch_size' and 'lr' must be >= 0 (0: the study's default)")
        if self.workers < 0:
            raise C.ConfigError("config key 'workers' must be >= 0 (0: 2 on a CPU, 1 on a GPU)")
        if self.tune and self.lr:
            raise C.ConfigError("config keys 'tune' and 'lr' exclude each other (tune chooses each arm's lr)")


def workers(cfg: ReproduceOptions) -> int:
    """How many runs train at a time (:class:`ReproduceOptions` ``workers``)."""
    if cfg.workers:
        return cfg.workers
    on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    return 1 if on_gpu or (os.cpu_count() or 1) < 2 else 2


def study_of(preset: str) -> dict[str, Any]:
    """The study settings of a preset (a preset without its own study borrows the default's)."""
    return STUDIES.get(preset, STUDIES[FALLBACK_STUDY])


def _base(cfg: ReproduceOptions) -> dict[str, Any]:
    """The `ofe train` settings every run shares."""
    study = study_of(cfg.preset)
    base: dict[str, Any] = {"preset": cfg.preset, "device": cfg.device, **copy.deepcopy(study["train"])}
    if cfg.preset not in STUDIES:  # another preset's model is its own; only the schedule is borrowed
        base.pop("model", None)
    base["optim"] = {**base.get("optim", {}), "betas": list(cfg.betas)}
    if cfg.steps:
        base["steps"] = cfg.steps
        base["ckpt_interval"] = min(base["ckpt_interval"], cfg.steps)
        for key in ("eval_interval", "monitor_interval"):  # at least ten of each in a run
            base[key] = max(1, min(base[key], cfg.steps // 10 or 1))
    if cfg.batch_size:
        base["batch_size"] = cfg.batch_size
    if cfg.corpus:
        base["data"] = {**base.get("data", {}), "corpus": cfg.corpus}
    return base


def arms(cfg: ReproduceOptions) -> list[tuple[str, str]]:
    """The (block, optimiser) pairs the study trains: the C8 pair always, the others when
    ``other_seeds`` is not empty."""
    return [(b, o) for b in cfg.blocks for o in cfg.optimizers if (b, o) in C8_PAIR or cfg.other_seeds]


def arm_lrs(cfg: ReproduceOptions, arm: tuple[str, str], tuned: dict[tuple[str, str], float] | None = None) -> tuple[float, ...]:
    """The lrs an arm trains at: --lr, else what --tune found, else the study's table (one lr, or the lrs
    spanning the arm's near-optimal band), else the study's default lr."""
    study = study_of(cfg.preset)
    if cfg.lr:
        return (cfg.lr,)
    if tuned and arm in tuned:
        return (tuned[arm],)
    lrs = study["lrs"].get("+".join(arm), study["lr"])
    return tuple(float(lr) for lr in lrs) if isinstance(lrs, (list, tuple)) else (float(lrs),)


def _variant(arm: tuple[str, str], lr: float, seed: int) -> dict[str, Any]:
    block, optimizer = arm
    return {"name": f"{block}_{optimizer}_lr{lr:g}_seed{seed}", "model.block": block, "optim.name": optimizer,
            "optim.lr": lr, "seed": seed}


def study_spec(cfg: ReproduceOptions, tuned: dict[tuple[str, str], float] | None = None) -> dict[str, Any]:
    """The sweep spec of the study: one variant per (arm, seed), seed by seed (so that a study cut
    short has whole pairs), each seed's slower runs first (the rotated optimisers' steps cost ~1.6x
    AdamW's; started first, the parallel workers finish closer together)."""
    variants = []
    for seed in dict.fromkeys([*cfg.seeds, *cfg.other_seeds]):
        runs = [_variant(arm, lr, seed) for arm in arms(cfg) if seed in (cfg.seeds if arm in C8_PAIR else cfg.other_seeds)
                for lr in arm_lrs(cfg, arm, tuned)]
        variants += sorted(runs, key=lambda v: v["optim.name"] not in SLOW_OPTIMIZERS)  # stable: spec order otherwise
    return {"out_dir": cfg.out_dir, "quantize": cfg.quantize, "base": _base(cfg), "variants": variants}


def tuning_spec(cfg: ReproduceOptions) -> dict[str, Any]:
    """The lr grid of every arm on its first seed (no quantisation: only the losses decide)."""
    grid = study_of(cfg.preset)["tune"]
    variants = [_variant(arm, lr, (cfg.seeds if arm in C8_PAIR else cfg.other_seeds)[0]) for arm in arms(cfg) for lr in grid]
    return {"out_dir": cfg.out_dir, "quantize": False, "base": _base(cfg), "variants": variants}


def tune(cfg: ReproduceOptions, log: Callable[[str], None] = print) -> tuple[dict[tuple[str, str], float], list[Path]]:
    """Run the lr grid; returns each arm's lr with the lowest final validation loss, and the grid's runs."""
    paths = run_sweep(parse_spec(tuning_spec(cfg)), progress=cfg.progress, log=log, workers=workers(cfg))
    runs = load_runs(paths)
    best = tuned_lrs(runs)
    chosen = {}
    for run in runs:
        arm = (run.settings["model.block"], run.settings["optim.name"])
        chosen[arm] = best[arm_key(run)]["lr"]
    log("tuned lr per arm: " + ", ".join(f"{b} + {o} {lr:g}" for (b, o), lr in chosen.items()))
    return chosen, paths


def quantise_matched(runs: list[Run], log: Callable[[str], None] = print) -> int:
    """Quantise, for every C8 pair of one seed, the better run's kept weights at the worse run's final
    validation loss (skipped when already done or when no kept step reaches it). Returns how many."""
    done: set[tuple[Path, int]] = set()
    for a, b in c8_pairs(runs):  # the pairs C8 judges (same seed and settings, trained, lrs in the arms' bands)
        point = matched_point(a, b)
        step = point.better_step
        if (step is None or step == point.better.steps or point.better.quant_result(step) is not None
                or (point.better.path, step) in done):
            continue
        log(f"{point.better.path.name}: quantising the weights of step {step} (val loss {point.better_loss:.4f}, "
            f"matched to {point.worse.path.name}'s {point.target:.4f})")
        quantize_run(point.better.path, QuantizeOptions(step=step), log=log)
        done.add((point.better.path, step))
    return len(done)


def dry_run(cfg: ReproduceOptions, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The runs of the study (and of its lr grid with ``--tune``), each with its estimated cost."""
    specs = ([tuning_spec(cfg)] if cfg.tune else []) + [study_spec(cfg)]
    plans = []
    for spec in specs:
        for run in parse_spec(spec).runs:
            est = estimate(run.config)
            log(describe(run.name, run.config, est))
            plans.append({"run": run.name, **est})
    flops = sum(p["train_flops"] for p in plans)
    log(f"{len(plans)} runs, {flops:.2e} training FLOPs in all; the largest needs ~"
        f"{max(p['memory_gib']['total'] for p in plans):.3g} GiB")
    return plans


def reproduce(cfg: ReproduceOptions, log=print) -> list[ClaimResult]:
    if cfg.dry_run:
        dry_run(cfg, log)
        return []
    with exclusive_study(Path(cfg.out_dir), "reproduce"):
        return _reproduce_locked(cfg, log)


def _reproduce_locked(cfg: ReproduceOptions, log=print) -> list[ClaimResult]:
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    tuned, grid = tune(cfg, log=log) if cfg.tune else (None, [])
    if cfg.tune:
        phases["lr tuning"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    study = run_sweep(parse_spec(study_spec(cfg, tuned)), progress=cfg.progress, log=log, workers=workers(cfg))
    phases["training and quantisation"] = time.perf_counter() - t1
    paths = list(dict.fromkeys([*study, *grid]))  # the report shows the lr grid too; claims use the bands' runs
    runs = load_runs(paths)
    if cfg.quantize:
        t2 = time.perf_counter()
        if quantise_matched(runs, log=log):
            runs = load_runs(paths)
        phases["matched-loss quantisation"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    report_dir = Path(cfg.out_dir) / "report"
    claims = write_report(runs, report_dir, title=f"ofe reproduce: {cfg.preset}")
    phases["report"] = time.perf_counter() - t3
    log("\n" + runs_table([run_row(r) for r in runs]))
    log("\n" + format_claims(claims))
    log(f"\nreport: {report_dir / 'report.md'} (figures in {report_dir / 'figures'}; verdicts, rules and numbers "
        f"in {report_dir / 'claims.json'})")
    log("time: " + ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in phases.items())
        + f"; total {(time.perf_counter() - t0) / 60:.1f} min")
    return claims
