"""The ``ofe`` command line. Each subcommand takes a typed config: a file plus ``--key value``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ofe import config as C
from ofe.data import CorpusError, default_sample, random_windows
from ofe.io import atomic_write
from ofe.models import BLOCK_TYPES, GPT, PRESETS, expected_param_count, preset
from ofe.monitor import OutlierMonitor
from ofe.analysis import RunError, load_runs
from ofe.analysis.claims import format_claims
from ofe.experiment import load_sweep, run_sweep, sweep_states
from ofe.experiment.reproduce import ReproduceConfig, reproduce
from ofe.report import ReportError, run_row
from ofe.report import write_report as write_run_report
from ofe.report.build import runs_table
from ofe.audit import AuditConfig, AuditError, audit, format_summary, write_report
from ofe.quant import QUANT_FILE, QuantConfig, QuantError, evaluate_run, format_table
from ofe.train import CheckpointError, NonFiniteLoss, TrainConfig, TrainError, build_train_config, train
from ofe.train.loop import CONFIG_FILE

T = TypeVar("T")


@dataclass(frozen=True)
class ZooConfig:
    """Build every block variant and print its per-layer outlier metrics on a corpus sample."""

    preset: str = C.field("small-cpu", f"model preset ({', '.join(PRESETS)})")
    blocks: tuple[str, ...] = C.field(BLOCK_TYPES, "comma-separated block types")
    batch_size: int = C.field(8, "sequences in the sample batch")
    seed: int = C.field(0, "seed for weights and the batch")
    sample_bytes: int = C.field(1 << 20, "bytes of the standard-library corpus to sample from")
    json_out: str = C.field("", "also write the results to this JSON file")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise C.ConfigError(f"unknown model preset '{self.preset}' (known: {', '.join(PRESETS)})")
        bad = [b for b in self.blocks if b not in BLOCK_TYPES]
        if bad or not self.blocks:
            raise C.ConfigError(f"config key 'blocks': unknown block {bad[0] if bad else '(none)'!r} (known: {', '.join(BLOCK_TYPES)})")
        for name in ("batch_size", "sample_bytes"):
            if getattr(self, name) <= 0:
                raise C.ConfigError(f"config key '{name}' must be positive, got {getattr(self, name)}")


def run_zoo(cfg: ZooConfig) -> dict[str, Any]:
    """Per block: parameter count and the monitor's per-layer metrics on one seeded batch."""
    tokens = default_sample(cfg.sample_bytes)
    results: dict[str, Any] = {}
    for block in cfg.blocks:
        model_cfg = preset(cfg.preset, block=block)
        if model_cfg.vocab_size < 256:
            raise C.ConfigError(f"preset '{cfg.preset}' has vocab {model_cfg.vocab_size} < 256 bytes")
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg).eval()
        idx = random_windows(tokens, cfg.batch_size, model_cfg.seq_len, cfg.seed)
        with OutlierMonitor(model) as monitor:
            stats = monitor.measure(idx)
        results[block] = {"params": model.num_params(), **stats}
        assert model.num_params() == expected_param_count(model_cfg)
        _print_block(block, results[block])
    return results


def _print_block(block: str, r: dict[str, Any]) -> None:
    resid, ent = r["resid"], r["attn_probs"]["attention_entropy"]
    print(f"\n{block}  ({r['params'] / 1e6:.2f}M parameters)")
    print(f"{'layer':>5} {'kurtosis':>9} {'mmr':>8} {'in-corr':>8} {'max|x|':>8} {'attn-H':>7}")
    for layer, k in enumerate(resid["kurtosis"]):
        mean_h = sum(ent[layer]) / len(ent[layer])
        print(f"{layer:>5} {k:>9.3f} {resid['mmr'][layer]:>8.2f} {resid['input_correlation'][layer]:>8.3f} "
              f"{resid['max_abs'][layer]:>8.3f} {mean_h:>7.3f}")


# ---- plumbing ------------------------------------------------------------------------------------
def load_config(cls: type[T], ns: argparse.Namespace) -> T:
    """File (``--config``) then ``--key value`` overrides, strictly typed."""
    data = C.load_file(ns.config) if getattr(ns, "config", None) else {}
    return C.from_dict(cls, C.apply_overrides(cls, data, C.overrides_from_namespace(ns)))


def _cmd_zoo(ns: argparse.Namespace) -> int:
    cfg = load_config(ZooConfig, ns)
    results = run_zoo(cfg)
    if cfg.json_out:
        atomic_write(Path(cfg.json_out), lambda p: p.write_text(json.dumps(results, indent=1)))
    return 0


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _cmd_train(ns: argparse.Namespace) -> int:
    data = C.load_file(ns.config) if ns.config else {}
    overrides = C.overrides_from_namespace(ns)
    probe = build_train_config(data, overrides)
    saved = Path(probe.out_dir) / CONFIG_FILE
    if probe.resume and saved.is_file():  # resume: the saved run is the base, what was given goes on top
        data = _deep_merge(json.loads(saved.read_text()), data)
    train(build_train_config(data, overrides))
    return 0


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of ``ofe quantize`` beside the quantisation settings (``quant.*``)."""

    quant: QuantConfig = QuantConfig()
    eval_sequences: int = C.field(0, "validation windows to evaluate; 0: the run's eval_batches x batch_size")
    sweep: bool = C.field(True, "also evaluate W8A6/A5/A4, FP8 and W4 weight-only")


def _cmd_quantize(ns: argparse.Namespace) -> int:
    cfg = load_config(QuantizeConfig, ns)
    if cfg.eval_sequences < 0:
        raise C.ConfigError(f"config key 'eval_sequences' must be >= 0, got {cfg.eval_sequences}")
    result = evaluate_run(ns.run_dir, cfg.quant, cfg.eval_sequences, cfg.sweep)
    atomic_write(Path(ns.run_dir) / QUANT_FILE, lambda p: p.write_text(json.dumps(result, indent=1)))
    print(format_table(result))
    return 0


def _cmd_audit(ns: argparse.Namespace) -> int:
    cfg = load_config(AuditConfig, ns)
    result = audit(ns.model_dir, cfg)
    out = Path(cfg.out_dir or f"audit-{Path(ns.model_dir).resolve().name}")
    paths = write_report(result, out)
    print(format_summary(result))
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


@dataclass(frozen=True)
class SweepOptions:
    """Options of ``ofe sweep`` (the runs themselves are described by SPEC)."""

    out_dir: str = C.field("", "directory of the runs; empty: the spec's out_dir")
    progress: bool = C.field(True, "show a progress bar over the whole sweep")
    dry_run: bool = C.field(False, "list the runs and their state, train nothing")


def _cmd_sweep(ns: argparse.Namespace) -> int:
    opts = load_config(SweepOptions, ns)
    if not Path(ns.spec).is_file():
        raise C.ConfigError(f"sweep spec {ns.spec} does not exist")
    sweep = load_sweep(ns.spec, opts.out_dir or None)
    if opts.dry_run:
        for run, state in zip(sweep.runs, sweep_states(sweep)):
            print(f"{state:>7}  {run.config.out_dir}")
        return 0
    run_sweep(sweep, progress=opts.progress)
    return 0


@dataclass(frozen=True)
class ReportOptions:
    """Options of ``ofe report``."""

    out_dir: str = C.field("report", "directory for report.md, summary.json and figures/ (replaced if it holds a report)")
    title: str = C.field("Outlier features report", "title of report.md")


def _cmd_report(ns: argparse.Namespace) -> int:
    opts = load_config(ReportOptions, ns)
    runs = load_runs(ns.run_dirs)
    claims = write_run_report(runs, opts.out_dir, opts.title)
    print(runs_table([run_row(r) for r in runs]))
    print("\n" + format_claims(claims))
    print(f"\nwrote {Path(opts.out_dir) / 'report.md'}")
    return 0


def _cmd_reproduce(ns: argparse.Namespace) -> int:
    reproduce(load_config(ReproduceConfig, ns))
    return 0


def _cmd_presets(_ns: argparse.Namespace) -> int:
    print(f"{'preset':<16} {'layers':>6} {'width':>6} {'heads':>5} {'vocab':>6} {'seq':>5} {'params (pre-ln)':>16}")
    for name in PRESETS:
        c = preset(name)
        print(f"{name:<16} {c.n_layer:>6} {c.d_model:>6} {c.n_head:>5} {c.vocab_size:>6} {c.seq_len:>5} {expected_param_count(c):>16,}")
    return 0


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace], int]
    config: type | None = None  # typed options: --config FILE plus one flag per field
    positional: tuple[str, str, str] | None = None  # (dest, metavar, help)
    nargs: str | None = None  # of the positional: "+" for one or more


COMMANDS: dict[str, Command] = {
    "train": Command("train a model on a corpus (the embedded default: the Python standard library)", _cmd_train, TrainConfig),
    "quantize": Command("simulate W8A8 (and other formats) on a trained run; writes RUN_DIR/quant.json", _cmd_quantize,
                        QuantizeConfig, ("run_dir", "RUN_DIR", "directory of a finished `ofe train` run")),
    "audit": Command("outlier features and W8A8 cost of a Hugging Face checkpoint on disk", _cmd_audit, AuditConfig,
                     ("model_dir", "MODEL_DIR", "a local Hugging Face model directory")),
    "sweep": Command("train (and quantise) a grid of runs described by a spec file; resumable", _cmd_sweep,
                     SweepOptions, ("spec", "SPEC", "a .toml or .json sweep spec (see docs/experiments.md)")),
    "report": Command("figures, a markdown report and the claims table of a set of runs", _cmd_report, ReportOptions,
                      ("run_dirs", "RUN_DIR", "run directories, or directories holding runs (a sweep)"), nargs="+"),
    "reproduce": Command("the paper's study end to end: train Pre-LN/OP x AdamW/SOAP, quantise, report the claims",
                         _cmd_reproduce, ReproduceConfig),
    "zoo": Command("build every block variant and print per-layer outlier metrics", _cmd_zoo, ZooConfig),
    "presets": Command("list the model presets with their parameter counts", _cmd_presets),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofe", description="Measure, understand and minimise outlier features.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.positional is not None:
            dest, metavar, help_text = command.positional
            p.add_argument(dest, metavar=metavar, help=help_text, nargs=command.nargs)
        if command.config is not None:
            p.add_argument("--config", metavar="FILE", help="a .toml or .json config file; flags override it")
            C.add_arguments(p, command.config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return COMMANDS[ns.command].run(ns)
    except NonFiniteLoss as e:
        print(f"ofe {ns.command}: error: {e}", file=sys.stderr)
        return 3
    except (C.ConfigError, CorpusError, TrainError, CheckpointError, QuantError, AuditError, RunError, ReportError) as e:
        print(f"ofe {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ofe {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
