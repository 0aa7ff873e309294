"""`ofe reproduce`: the paper's central study on the embedded corpus, end to end.

Trains {Pre-LN, OP} x {AdamW, SOAP} (and any other blocks / optimisers asked for) with identical
settings except the block and the optimiser, over one or more seeds, quantises every model,
writes the report (figures, tables, the claims it could test) and prints the claims table.
It is an ordinary :mod:`ofe.experiment.sweep`, so an interrupted study resumes where it stopped.

The CPU default (``study-cpu``: 4 x 128, bytes, 300 steps of 32 x 128 tokens, lr 1e-2, betas
(0.9, 0.95)) fits in 15 minutes on 2 cores; ``--preset codeparrot-130m`` runs the same study at the
authors' CodeParrot shape for a GPU (BPE, bf16, compile).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ofe import config as C
from ofe.analysis import load_runs
from ofe.analysis.claims import ClaimResult, format_claims
from ofe.experiment.sweep import parse_spec, run_sweep
from ofe.models import BLOCK_TYPES, preset_fields
from ofe.optim import OPTIMIZERS
from ofe.report import run_row, write_report
from ofe.report.build import runs_table

# Settings per study scale; every one can be overridden by the options of ReproduceConfig.
STUDIES: dict[str, dict[str, Any]] = {
    "study-cpu": {"steps": 300, "batch_size": 32, "eval_interval": 100, "monitor_interval": 20,
                  "ckpt_interval": 100, "optim": {"lr": 1e-2}},
    "codeparrot-130m": {"steps": 10000, "batch_size": 128, "eval_interval": 500, "monitor_interval": 100,
                        "ckpt_interval": 1000, "dtype": "bfloat16", "compile": True,
                        "data": {"tokenizer": "bpe", "bpe_vocab_size": 32768}, "optim": {"lr": 1e-3}},
}


@dataclass(frozen=True)
class ReproduceConfig:
    """Options of ``ofe reproduce``."""

    preset: str = C.field("study-cpu", f"model preset; schedules are tuned for {', '.join(STUDIES)} (others use study-cpu's)")
    out_dir: str = C.field("runs/reproduce", "directory of the runs; the report goes to OUT_DIR/report")
    blocks: tuple[str, ...] = C.field(("pre-ln", "op"), "comma-separated blocks to compare")
    optimizers: tuple[str, ...] = C.field(("adamw", "soap"), "comma-separated optimisers to compare")
    seeds: tuple[int, ...] = C.field((0, 1), "comma-separated seeds")
    steps: int = C.field(0, "updates per run; 0: the study's default (study-cpu 300, codeparrot-130m 10000)")
    batch_size: int = C.field(0, "sequences per update; 0: the study's default (study-cpu 32, codeparrot-130m 128)")
    lr: float = C.field(0.0, "peak lr of every run; 0: the study's default (study-cpu 1e-2, codeparrot-130m 1e-3)")
    betas: tuple[float, ...] = C.field((0.9, 0.95), "(beta1, beta2) of every optimiser")
    corpus: str = C.field("", "corpus (see ofe train --data.corpus); empty: the Python standard library")
    quantize: bool = C.field(True, "quantise every run (W8A8 and the bit-width sweep)")
    device: str = C.field("auto", "auto, cpu, cuda, cuda:N")
    progress: bool = C.field(True, "show a progress bar over the study")

    def __post_init__(self) -> None:
        preset_fields(self.preset)
        for key, values, known in (("blocks", self.blocks, BLOCK_TYPES), ("optimizers", self.optimizers, OPTIMIZERS)):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise C.ConfigError(f"config key '{key}': unknown {bad[0] if bad else '(none)'!r} (known: {', '.join(known)})")
        if not self.seeds:
            raise C.ConfigError("config key 'seeds' needs at least one seed")
        if self.steps < 0 or self.lr < 0 or self.batch_size < 0:
            raise C.ConfigError("config keys 'steps', 'batch_size' and 'lr' must be >= 0 (0: the study's default)")


def study_spec(cfg: ReproduceConfig) -> dict[str, Any]:
    """The sweep spec of the study."""
    base: dict[str, Any] = {"preset": cfg.preset, "device": cfg.device, **STUDIES.get(cfg.preset, STUDIES["study-cpu"])}
    base["optim"] = {**base.get("optim", {}), "betas": list(cfg.betas)}
    if cfg.steps:
        base["steps"] = cfg.steps
        for key in ("eval_interval", "ckpt_interval"):
            base[key] = min(base[key], cfg.steps)
        base["monitor_interval"] = max(1, min(base["monitor_interval"], cfg.steps // 10 or 1))
    if cfg.batch_size:
        base["batch_size"] = cfg.batch_size
    if cfg.lr:
        base["optim"]["lr"] = cfg.lr
    if cfg.corpus:
        base["data"] = {**base.get("data", {}), "corpus": cfg.corpus}
    grid = {"model.block": list(cfg.blocks), "optim.name": list(cfg.optimizers), "seed": list(cfg.seeds)}
    return {"out_dir": cfg.out_dir, "quantize": cfg.quantize, "base": base, "grid": grid}


def reproduce(cfg: ReproduceConfig, log=print) -> list[ClaimResult]:
    sweep = parse_spec(study_spec(cfg))
    paths = run_sweep(sweep, progress=cfg.progress, log=log)
    runs = load_runs(paths)
    report_dir = Path(cfg.out_dir) / "report"
    claims = write_report(runs, report_dir, title=f"ofe reproduce: {cfg.preset}")
    log("\n" + runs_table([run_row(r) for r in runs]))
    log("\n" + format_claims(claims))
    log(f"\nreport: {report_dir / 'report.md'} (figures in {report_dir / 'figures'})")
    return claims
