"""`ofe remedies`: every remedy for outlier features, train-time and post-hoc, side by side.

Train-time remedies (:data:`TRAIN_REMEDIES`) are `ofe train` settings on top of a Pre-LN + AdamW
baseline; each runs the study's lr grid on one seed and is compared at its own tuned lr
(:func:`ofe.analysis.fair.tuned_lrs`). Post-hoc remedies (:data:`POSTHOC_REMEDIES`) are `ofe quantize`
settings applied to the baseline's trained weights. Every model is then quantised the same way: the
inputs of every linear layer but the LM head (what an int8 GEMM consumes; SmoothQuant and the
Hadamard rotation act there), at W8A8 and W4A4; train-time rows also show the paper's protocol
(every activation site, per tensor). Finally the best train-time remedy (lowest W4A4 cost) gets the
best post-hoc remedy that applies to it.

Settings come from ``ofe reproduce``'s studies (:data:`ofe.experiment.reproduce.STUDIES`), so the
comparison runs on the headline study's setting. The runs form an ordinary sweep (resumable); the
table, ``remedies.json`` and the scatter plot are written into the sweep directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ofe import config as C
from ofe.analysis import load_runs
from ofe.analysis.fair import arm_key, tuned_lrs
from ofe.analysis.runs import Run
from ofe.errors import OfeError
from ofe.experiment.reproduce import DEFAULT_STUDY, STUDIES, ReproduceOptions, _base, study_of
from ofe.experiment.sweep import exclusive_study, parse_spec, run_sweep
from ofe.io import atomic_write
from ofe.models import preset_fields
from ofe.quant.quantize import evaluation_data, load_trained
from ofe.quant.transforms import TRANSFORMS, TransformError
from ofe.quant.simulate import QuantConfig, SimulatedQuantModel, perplexity

BASELINE = "pre-ln + adamw"

# name -> (the `ofe train` overrides on top of Pre-LN + AdamW, what the literature expects)
TRAIN_REMEDIES: dict[str, tuple[dict[str, Any], str]] = {
    BASELINE: ({}, "the baseline: outlier features grow (He et al. 2024)"),
    "op": ({"model.block": "op"}, "far smaller kurtosis than Pre-LN (He et al. 2024, C2)"),
    "soap": ({"optim.name": "soap"}, "far smaller kurtosis than AdamW (He et al. 2024, C6)"),
    "op + soap": ({"model.block": "op", "optim.name": "soap"}, "the paper's remedy: smallest kurtosis, W8A8 "
                  "cost far below Pre-LN + AdamW's (C8)"),
    "muon": ({"optim.name": "muon"}, "Muon's orthogonalised updates avoid Adam's per-coordinate scaling, "
             "a driver of outliers (OSP, Park et al. 2025)"),
    "osp": ({"optim.name": "muon", "model.block": "pre-srms", "model.embed_proj": True},
            "excess kurtosis ~0 and usable W4A4 (OSP at 1.4B, Park et al. 2025)"),
    "swiglu": ({"model.activation": "swiglu"}, "GLUs amplify the step-up into massive activations (more outliers)"),
    "gated attention": ({"model.gated_attention": True, "model.gate": "element"},
                        "a sigmoid gate after SDPA removes massive activations and attention sinks "
                        "(Qwen, arXiv 2505.06708)"),
}

# name -> (the post-hoc transforms applied in order, what the literature expects): every registered
# transform alone (ofe.quant.transforms.TRANSFORMS), then QuaRot's deployment, rotation plus per-token ranges
POSTHOC_REMEDIES: dict[str, tuple[tuple[str, ...], str]] = {
    **{name: ((name,), t.expected) for name, t in TRANSFORMS.items()},
    "hadamard + per-token": (("hadamard", "per-token"), "QuaRot's deployment: rotation plus per-token activations"),
}

LINEAR_INPUTS = QuantConfig(sites="linear-inputs")
FORMATS = {"W8A8": (8, 8), "W4A4": (4, 4)}


class RemediesError(OfeError):
    """A user-facing problem with an ``ofe remedies`` request."""


def _check_names(key: str, values: tuple[str, ...], known: dict[str, Any]) -> None:
    bad = [v for v in values if v not in known]
    if bad:
        raise C.ConfigError(f"config key '{key}': unknown remedy {bad[0]!r} (known: {', '.join(known)})")


@dataclass(frozen=True)
class RemediesOptions:
    """Options of ``ofe remedies``."""

    preset: str = C.field(DEFAULT_STUDY, f"model preset; the study's settings follow ofe reproduce ({', '.join(STUDIES)})")
    out_dir: str = C.field("runs/remedies", "directory of the runs; remedies.md, remedies.json and remedies.png go there")
    remedies: tuple[str, ...] = C.field(tuple(TRAIN_REMEDIES), "comma-separated train-time remedies (the baseline "
                                        f"'{BASELINE}' is always run)")
    posthoc: tuple[str, ...] = C.field(tuple(POSTHOC_REMEDIES), "comma-separated post-hoc remedies, applied to the baseline")
    lrs: tuple[float, ...] = C.field((), "comma-separated lr grid of every train-time remedy; empty: the study's")
    fixed_lrs: tuple[float, ...] = C.field((), "also compare every remedy at each of these lrs (from the grid), "
                                                "beside the tuned-lr table")
    steps: int = C.field(0, "updates per run; 0: the study's default")
    batch_size: int = C.field(0, "sequences per update; 0: the study's default")
    seed: int = C.field(0, "seed of every run")
    corpus: str = C.field("", "corpus (see ofe train --data.corpus); empty: the study's (see ofe reproduce --corpus)")
    eval_sequences: int = C.field(0, "validation windows per quantised evaluation; 0: the run's eval size")
    device: str = C.field("auto", "auto, cpu, cuda, cuda:N")
    progress: bool = C.field(True, "show a progress bar over the runs")

    def __post_init__(self) -> None:
        preset_fields(self.preset)
        _check_names("remedies", self.remedies, TRAIN_REMEDIES)
        _check_names("posthoc", self.posthoc, POSTHOC_REMEDIES)
        if BASELINE not in self.remedies:
            object.__setattr__(self, "remedies", (BASELINE, *self.remedies))
        grid = self.lrs or tuple(study_of(self.preset)["tune"])
        missing = [lr for lr in self.fixed_lrs if not any(math.isclose(lr, g) for g in grid)]
        if missing:
            raise C.ConfigError(f"config key 'fixed_lrs': {missing[0]:g} is not in the lr grid ({', '.join(f'{g:g}' for g in grid)})")
        if any(lr <= 0 for lr in self.lrs) or min(self.steps, self.batch_size, self.eval_sequences) < 0:
            raise C.ConfigError("config keys 'lrs' must be positive; 'steps', 'batch_size' and 'eval_sequences' >= 0")


def _slug(name: str) -> str:
    return name.replace(" + ", "+").replace(" ", "-")


def study_spec(cfg: RemediesOptions) -> dict[str, Any]:
    """One variant per (train-time remedy, lr) on one seed; quantisation is done here, not by the sweep."""
    base = _base(ReproduceOptions(preset=cfg.preset, out_dir=cfg.out_dir, steps=cfg.steps, batch_size=cfg.batch_size,
                                 corpus=cfg.corpus, device=cfg.device, progress=cfg.progress))
    base["keep_weights"] = False  # only final weights are compared
    grid = cfg.lrs or tuple(study_of(cfg.preset)["tune"])
    variants = [{"name": f"{_slug(name)}_lr{lr:g}", "seed": cfg.seed, "optim.lr": lr, **TRAIN_REMEDIES[name][0]}
                for name in cfg.remedies for lr in grid]
    return {"out_dir": cfg.out_dir, "quantize": False, "base": base, "variants": variants}


def _remedy_of(run: Run) -> str:
    return run.path.name.rsplit("_lr", 1)[0]


def step_seconds(run: Run) -> float:
    """Median seconds per update over the run's logged steps."""
    rates = [r["tokens_per_s"] for r in run.records if r.get("tokens_per_s")]
    tokens = run.config["batch_size"] * run.config.get("grad_accum", 1) * run.config["model"]["seq_len"]
    return tokens / float(np.median(rates)) if rates else math.nan


class QuantCosts:
    """Perplexity costs of quantising trained runs, each (run, config) evaluated once: the tables at
    the tuned lr and at fixed lrs share runs."""

    def __init__(self, eval_sequences: int, log=print) -> None:
        self.eval_sequences, self.log = eval_sequences, log
        self.fp: dict[str, float] = {}
        self.done: dict[tuple[str, QuantConfig], dict[str, Any]] = {}

    def __call__(self, run: Run, qcfgs: dict[str, QuantConfig]) -> dict[str, Any]:
        """Float perplexity and, per named config, the perplexity increase in percent (or the reason
        it does not apply to this model)."""
        key = str(run.path)
        todo = {name: q for name, q in qcfgs.items() if (key, q) not in self.done}
        if todo:
            cfg, model = load_trained(run.path)
            windows, calib = evaluation_data(cfg, LINEAR_INPUTS, self.eval_sequences, log=lambda *_: None)
            if key not in self.fp:
                self.fp[key] = perplexity(model, windows)
            for name, qcfg in todo.items():
                cost = self.done[(key, qcfg)] = self._cost(model, qcfg, windows, calib, self.fp[key])
                if "increase_pct" in cost:
                    self.log(f"  {run.path.name} {name}: {cost['increase_pct']:+.2f}%")
        return {"fp_ppl": self.fp[key], **{name: self.done[(key, q)] for name, q in qcfgs.items()}}

    @staticmethod
    def _cost(model, qcfg: QuantConfig, windows, calib, fp: float) -> dict[str, Any]:
        try:
            sim = SimulatedQuantModel(model, qcfg)
        except TransformError as e:  # a transform out of its scope, e.g. a rotation of the OP block (no norm to fold it through)
            return {"not_applicable": str(e)}
        sim.calibrate(calib)
        ppl = perplexity(sim, windows)
        return {"ppl": ppl, "increase_pct": 100.0 * (ppl / fp - 1.0)}


def _configs(transforms: tuple[str, ...], protocol: bool) -> dict[str, QuantConfig]:
    base = dataclasses.replace(LINEAR_INPUTS, transforms=transforms)
    out = {fmt: dataclasses.replace(base, weight_bits=w, act_bits=a) for fmt, (w, a) in FORMATS.items()}
    if protocol:
        out |= {f"{fmt} protocol": QuantConfig(weight_bits=w, act_bits=a) for fmt, (w, a) in FORMATS.items()}
    return out


def _row(kind: str, name: str, run: Run, costs: dict[str, Any], step_ratio: float | None, expected: str) -> dict[str, Any]:
    final = run.final
    return {"kind": kind, "remedy": name, "run": str(run.path), "lr": run.settings.get("optim.lr"),
            "val_loss": run.val_loss(), "val_ppl": math.exp(run.val_loss()),
            "max_kurtosis": float(np.max(final["kurtosis"])), "max_abs": float(np.max(final.get("max_abs", [math.nan]))),
            "max_median": float(np.max(final.get("abs_max_median", [math.nan]))),
            "step_time_ratio": step_ratio,
            "expected": expected, **costs}


def _increase(row: dict[str, Any], fmt: str) -> float:
    value = row.get(fmt, {})
    return value.get("increase_pct", math.inf) if isinstance(value, dict) else math.inf


def compare(runs: list[Run], cfg: RemediesOptions, costs: QuantCosts, lr: float | None = None, log=print) -> dict[str, Any]:
    """One comparison table (as rows) from the trained runs of :func:`study_spec`: every remedy at
    its tuned lr (``lr`` None), or every remedy at ``lr``."""
    tuned = tuned_lrs(runs)
    if lr is None:
        chosen = {_remedy_of(r): r for r in runs if float(r.settings["optim.lr"]) == tuned[arm_key(r)]["lr"]}
    else:
        chosen = {_remedy_of(r): r for r in runs if math.isclose(float(r.settings["optim.lr"]), lr)}
    baseline = chosen[_slug(BASELINE)]
    if baseline.diverged:
        where = "at every lr of the grid" if lr is None else f"at lr {lr:g}"
        raise RemediesError(f"the baseline diverged {where} ({baseline.path}); choose other --lrs")
    # step time of an arm: the median over its runs at every lr (runs of a study may share the machine
    # with other work; the median over the grid damps that)
    arm_step = {_slug(n): float(np.median([step_seconds(r) for r in runs if _remedy_of(r) == _slug(n)]))
                for n in cfg.remedies}
    base_step = arm_step[_slug(BASELINE)]
    rows = []
    for name in cfg.remedies:
        run = chosen[_slug(name)]
        if run.diverged:
            rows.append({"kind": "train-time", "remedy": name, "run": str(run.path), "diverged": run.diverged})
            continue
        log(f"quantising {name} (lr {run.settings['optim.lr']:g})")
        rows.append(_row("train-time", name, run, costs(run, _configs((), True)), arm_step[_slug(name)] / base_step, TRAIN_REMEDIES[name][1]))
    for name in cfg.posthoc:
        log(f"post-hoc {name} on the baseline")
        rows.append(_row("post-hoc", name, baseline, costs(baseline, _configs(POSTHOC_REMEDIES[name][0], False)),
                         None, POSTHOC_REMEDIES[name][1]))
    combination = _combination(rows, chosen, costs)
    return {"lr": "tuned" if lr is None else lr, "rows": rows + ([combination] if combination else [])}


def _combination(rows, chosen, costs: QuantCosts) -> dict[str, Any] | None:
    """The train-time remedy with the lowest W4A4 cost, with the best post-hoc remedy that applies."""
    train = [r for r in rows if r["kind"] == "train-time" and "diverged" not in r and r["remedy"] != BASELINE]
    post = sorted((r for r in rows if r["kind"] == "post-hoc"), key=lambda r: _increase(r, "W4A4"))
    if not train or not post:
        return None
    best_train = min(train, key=lambda r: _increase(r, "W4A4"))
    run = chosen[_slug(best_train["remedy"])]
    skipped = []
    for p in post:
        both = costs(run, _configs(POSTHOC_REMEDIES[p["remedy"]][0], False))
        if all("increase_pct" in both[f] for f in FORMATS):
            row = _row("combination", f"{best_train['remedy']} + {p['remedy']}", run, both, None,
                       "the best of both kinds")
            row["skipped"] = skipped
            return row
        skipped.append({"remedy": p["remedy"], "reason": both["W8A8"].get("not_applicable", "")})
    return None


def _pct(row: dict[str, Any], fmt: str) -> str:
    value = row.get(fmt)
    if value is None:
        return ""
    if "not_applicable" in value:
        return "n/a"
    return f"{value['increase_pct']:+.2f}%"


def _table(table: dict[str, Any]) -> list[str]:
    columns = ["kind", "remedy", "lr", "val ppl", "max kurtosis", "max \\|x\\|", "max/median", "W8A8", "W4A4",
               "W8A8 protocol", "W4A4 protocol", "time / step"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in table["rows"]:
        if "diverged" in r:
            lines.append(f"| {r['kind']} | {r['remedy']} | | diverged | | | | | | | | |")
            continue
        ratio = f"{r['step_time_ratio']:.2f}x" if r.get("step_time_ratio") else ""
        lr = f"{r['lr']:g}" if r["kind"] != "post-hoc" else "(baseline)"
        lines.append(f"| {r['kind']} | {r['remedy']} | {lr} | {r['val_ppl']:.3f} | {r['max_kurtosis']:.2f} | "
                     f"{r['max_abs']:.1f} | {r['max_median']:.1f} | {_pct(r, 'W8A8')} | {_pct(r, 'W4A4')} | "
                     f"{_pct(r, 'W8A8 protocol')} | {_pct(r, 'W4A4 protocol')} | {ratio} |")
    skipped = [s for r in table["rows"] for s in r.get("skipped", [])]
    lines += [""] + [f"- not applicable to the combination: {s['remedy']} ({s['reason']})" for s in skipped]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """Each comparison as a markdown table, the lr grid, and what each remedy was expected to do."""
    lines = ["Columns: validation perplexity of the float model; kurtosis, largest |activation| and its ratio to the "
             "median, of the residual stream at the last monitored step (max over layers); W8A8 / W4A4: perplexity "
             "increase with the inputs of every linear layer but the LM head quantised (per tensor, static ranges, "
             "unless the remedy changes that); `protocol`: the paper's W8A8 protocol (every activation site); "
             "time / step: the remedy's median step time over its lr grid, relative to the baseline's.", ""]
    for table in result["tables"]:
        heading = "each remedy at its tuned lr" if table["lr"] == "tuned" else f"every remedy at lr {table['lr']:g}"
        lines += [f"### {heading[0].upper()}{heading[1:]}", "", *_table(table), ""]
    lrs = sorted({float(lr) for grid in result["lr_grid"].values() for lr in grid})
    lines += ["### Learning-rate grid", "", "Final validation loss (nats/token) per remedy and lr; bold: the tuned lr.", "",
              "| remedy | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|" + " --- |" * (len(lrs) + 1)]
    for name, grid in result["lr_grid"].items():
        losses = {float(k): v for k, v in grid.items()}
        best = min(losses, key=lambda k: (losses[k], k))
        cells = [("**{:.4f}**" if lr == best else "{:.4f}").format(losses[lr]) if lr in losses else "" for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    expected = {**{k: v[1] for k, v in TRAIN_REMEDIES.items()}, **{k: v[1] for k, v in POSTHOC_REMEDIES.items()}}
    shown = dict.fromkeys(r["remedy"] for t in result["tables"] for r in t["rows"] if r["kind"] != "combination")
    lines += ["", "Expected from the literature:", ""] + [f"- **{n}**: {expected[n]}" for n in shown]
    return "\n".join(lines) + "\n"


def figure_name(table: dict[str, Any]) -> str:
    return "remedies.png" if table["lr"] == "tuned" else f"remedies_lr{table['lr']:g}.png"


def write_outputs(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``remedies.json``, ``remedies.md`` and one scatter plot per table in ``out_dir``, each written
    atomically."""
    from ofe.report.figures import remedies_scatter

    paths = [out_dir / "remedies.json", out_dir / "remedies.md"]
    atomic_write(paths[0], lambda p: p.write_text(json.dumps(result, indent=1)))
    atomic_write(paths[1], lambda p: p.write_text(markdown(result)))
    for table in result["tables"]:
        paths.append(out_dir / figure_name(table))
        atomic_write(paths[-1], lambda p, t=table: remedies_scatter(t["rows"], p))
    return paths


def remedies(cfg: RemediesOptions, log=print) -> dict[str, Any]:
    with exclusive_study(Path(cfg.out_dir), "remedies"):
        return _remedies_locked(cfg, log)


def _remedies_locked(cfg: RemediesOptions, log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    paths = run_sweep(parse_spec(study_spec(cfg)), progress=cfg.progress, log=log)
    t1 = time.perf_counter()
    runs = load_runs(paths)
    costs = QuantCosts(cfg.eval_sequences, log)
    tables = [compare(runs, cfg, costs, lr, log) for lr in (None, *cfg.fixed_lrs)]
    tuned, names = tuned_lrs(runs), {_slug(n): n for n in cfg.remedies}
    grid = {names[_remedy_of(r)]: {f"{lr:g}": loss for lr, loss in tuned[arm_key(r)]["grid"].items()}
            for r in runs}  # remedy -> {lr: final val loss}
    result = {"schema": 1, "preset": cfg.preset, "seed": cfg.seed, "steps": runs[0].steps, "lr_grid": grid,
              "tables": tables}
    result["minutes"] = {"training": (t1 - t0) / 60, "quantisation": (time.perf_counter() - t1) / 60}
    written = write_outputs(result, Path(cfg.out_dir))
    log("\n" + markdown(result))
    log("wrote " + ", ".join(str(p) for p in written))
    return result
