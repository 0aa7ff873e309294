"""`ofe report RUN_DIR...`: figures, a markdown report and a JSON summary of a set of runs."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ofe import config as C
from ofe.analysis.claims import ClaimResult, evaluate_claims, format_claims
from ofe.analysis.fair import BAND_FLOOR, arm_key, lr_bands, tuned_lrs
from ofe.analysis.runs import (EVIDENCE_SCHEMA, Run, RunError, arm_name, label_runs, load_runs, order_and_label,
                               run_evidence, run_from_evidence)
from ofe.errors import OfeError
from ofe.io import LockHeld, exclusive_lock, output_folder_problem, pause_point
from ofe.report import figures as F


def run_row(run: Run) -> dict[str, Any]:
    """The report table's numbers for one run."""
    row: dict[str, Any] = {"run": run.path.name, "configuration": run.label, "seed": run.seed,
                           "lr": run.settings.get("optim.lr"),
                           "steps": run.final["step"] if run.monitored else None, "diverged": run.diverged}
    if run.monitored:
        final = run.final["kurtosis"]
        row.update(avg_kurtosis=float(np.mean(final)), max_kurtosis=float(np.max(final)))
    loss = run.val_loss()
    row.update(val_loss=loss, val_ppl=math.exp(loss) if math.isfinite(loss) else None)
    if run.quant:
        row.update(fp_ppl=run.quant["fp_ppl"], w8a8_ppl=run.quant.get("w8a8_ppl"),
                   w8a8_increase_pct=run.quant_increase("W8A8"), w8a4_increase_pct=run.quant_increase("W8A4"))
    return row


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def runs_table(rows: list[dict[str, Any]]) -> str:
    head = "| configuration | seed | lr | steps | val ppl | W8A8 ppl | W8A8 cost | W8A4 cost | avg kurtosis | max kurtosis |"
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        lr = _fmt(r.get("lr"), "g")
        if r["diverged"]:
            lines.append(f"| {r['configuration']} | {r['seed']} | {lr} | diverged | - | - | - | - | - | - |")
            continue
        cost8 = _fmt(r.get("w8a8_increase_pct"), "+.2f") + ("%" if r.get("w8a8_increase_pct") is not None else "")
        cost4 = _fmt(r.get("w8a4_increase_pct"), "+.1f") + ("%" if r.get("w8a4_increase_pct") is not None else "")
        lines.append(f"| {r['configuration']} | {r['seed']} | {lr} | {r['steps']} | {_fmt(r['val_ppl'], '.3f')} | "
                     f"{_fmt(r.get('w8a8_ppl'), '.3f')} | {cost8} | {cost4} | {_fmt(r.get('avg_kurtosis'), '.2f')} | "
                     f"{_fmt(r.get('max_kurtosis'), '.2f')} |")
    return "\n".join(lines)


def claims_json(claims: list[ClaimResult], runs: list[Run]) -> dict[str, Any]:
    """``claims.json``: per claim its verdict, the rule that decided it, the evidence and the numbers
    behind it (per seed or pair), so every verdict can be re-derived without the runs."""
    return {
        "schema": CLAIMS_SCHEMA,
        "claims": [{"id": c.id, "statement": c.claim, "verdict": c.status, "rule": c.rule,
                    "rule_version": c.rule_version, "evidence": c.evidence, "effect": c.effect, "data": c.data}
                   for c in claims],
        "runs": [{"run": str(r.path), "configuration": r.label, "seed": r.seed, "lr": r.settings.get("optim.lr"),
                  "steps": r.steps, "val_loss": r.val_loss(), "diverged": r.diverged} for r in runs],
        "lr_tuning": lr_tuning(runs),
        "lr_bands": band_rows(runs),
    }


def _arm_names(runs: list[Run]) -> dict[tuple, str]:
    return {arm_key(r): arm_name(r) for r in runs}


def _finite(x: float | None) -> float | None:
    """``x``, or None for a missing or infinite value (a diverged lr): JSON has no infinity."""
    return x if x is not None and math.isfinite(x) else None


def lr_tuning(runs: list[Run]) -> list[dict[str, Any]]:
    """Per arm: its tuned lr, the mean final val loss of every lr tried (over ``seeds``) and the tuning
    margin over the runner-up (:mod:`ofe.analysis.fair`); infinite losses (diverged) as None."""
    names = _arm_names(runs)
    return [{"arm": names[arm], "lr": t["lr"], "seeds": t["seeds"],
             "grid": [{"lr": lr, "mean_val_loss": _finite(v)} for lr, v in t["grid"].items()],
             "runner_up": t["runner_up"], "margin": t["margin"], "margin_se": t["margin_se"], "clear": t["clear"]}
            for arm, t in tuned_lrs(runs).items()]


def band_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Per arm and lr: mean final val loss, the paired gap to the tuned lr +- its standard error, the
    band's epsilon there and whether the lr is in the band (:func:`ofe.analysis.fair.lr_bands`)."""
    names = _arm_names(runs)
    return [{"arm": names[arm], "seeds": band["seeds"], **{k: _finite(v) if isinstance(v, float) else v for k, v in row.items()}}
            for arm, band in lr_bands(runs).items() for row in band["rows"]]


def band_table(runs: list[Run]) -> str | None:
    """The near-optimal band of every arm run at more than one lr, as a markdown table; None if none."""
    every = band_rows(runs)
    lrs_per_arm = Counter(r["arm"] for r in every)
    rows = [r for r in every if lrs_per_arm[r["arm"]] > 1]
    if not rows:
        return None
    lines = ["| arm | lr | mean val loss | gap to the tuned lr (nats) | epsilon | in band |", "|" + " --- |" * 6]
    for r in rows:
        gap = "diverged" if r["gap"] is None else f"{r['gap']:+.4f}" + (f" +- {r['gap_se']:.4f}" if r["gap_se"] is not None else "")
        lines.append(f"| {r['arm']} | {r['lr']:g} | {_fmt(r['mean_val_loss'], '.4f')} | {gap} | {r['epsilon']:.4f} | "
                     f"{'**in**' if r['in_band'] else 'out'} |")
    return "\n".join(lines)


def lr_table(runs: list[Run]) -> str | None:
    """Final validation loss per arm and lr (mean over the seeds every lr of the arm has), the tuned lr
    in bold; None when no arm was run at more than one lr."""
    tuned = tuned_lrs(runs)
    if all(len(t["grid"]) < 2 for t in tuned.values()):
        return None
    names = _arm_names(runs)
    lrs = sorted({lr for t in tuned.values() for lr in t["grid"]})
    lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | seeds | margin over the runner-up (nats) |",
             "|" + " --- |" * (len(lrs) + 3)]
    for arm, t in tuned.items():
        cells = [("**" if lr == t["lr"] else "") + _fmt(t["grid"].get(lr), ".4f") + ("**" if lr == t["lr"] else "")
                 if lr in t["grid"] else "" for lr in lrs]
        lines.append(f"| {names[arm]} | " + " | ".join(cells) + f" | {', '.join(map(str, t['seeds']))} | {_margin_cell(t)} |")
    return "\n".join(lines)


def _margin_cell(t: dict) -> str:
    """'0.0041 +- 0.0008 over lr 0.01: clear', '... : tie', or '0.0002 over lr 0.01 (one seed)'."""
    if t["margin"] is None:
        return ""
    head = f"{t['margin']:.4f}" + (f" +- {t['margin_se']:.4f}" if t["margin_se"] is not None else "") + f" over lr {t['runner_up']:g}"
    if t["margin_se"] is None:
        return head + " (one seed: no error bar)"
    return head + (": clear" if t["clear"] else ": **tie** (within 2 standard errors)")


def claims_table(claims: list[ClaimResult]) -> str:
    lines = ["| claim | status | statement | evidence |", "| --- | --- | --- | --- |"]
    lines += [f"| {c.id} | **{c.status}** | {c.claim} | {c.evidence} |" for c in claims]
    return "\n".join(lines)


@dataclass(frozen=True)
class Figure:
    file: str
    caption: str
    draw: Callable[[dict[str, list[Run]], dict[str, tuple], Path], Path | None]  # None: nothing to draw


FIGURES: dict[str, Figure] = {
    "kurtosis_vs_step": Figure("kurtosis_vs_step.png", "Kurtosis of the residual stream against step, every layer "
                               "(mean over seeds).", lambda g, c, p: F.kurtosis_vs_step(g, p)),
    "final_kurtosis_by_layer": Figure("final_kurtosis_by_layer.png", "Final kurtosis per layer by configuration "
                                      "(bars: min-max over seeds).", F.final_kurtosis_by_layer),
    "massive_activations": Figure("massive_activations.png", "Massive activations: the largest |activation| over "
                                  "the median |activation| of the residual stream (left, log scale) and the share of "
                                  "the 50 largest that sit at position 0 (middle), highest layer; where logged, the "
                                  "int8 SQNR of the worst layer (right: quantisability during training); every run.",
                                  F.massive_activations),
    "loss_curves": Figure("loss_curves.png", "Training and validation loss.", F.loss_curves),
    "kurtosis_vs_loss": Figure("kurtosis_vs_loss.png", "Kurtosis against training loss: configurations at matched "
                               "loss (training moves left to right, to lower loss).", F.kurtosis_vs_loss),
    "input_correlation_vs_kurtosis": Figure("input_correlation_vs_kurtosis.png", "Signal propagation: input "
                                            "correlation against kurtosis.", F.correlation_vs_kurtosis),
    "kurtosis_update_terms": Figure("kurtosis_update_terms.png", "Cumulative contribution of each kurtosis-update "
                                    "term to the kurtosis change (fixed validation inputs; mean over layers and seeds).",
                                    lambda g, c, p: F.decomposition(g, p)),
    "cost_vs_lr": Figure("cost_vs_lr.png", "The headline against the learning rate: W8A8 / W8A4 / W4A4 perplexity "
                         "cost, final max kurtosis and max/median |x| per arm, every seed a point, the mean a line, "
                         "each arm's near-optimal lr band shaded.", F.cost_vs_lr),
    "quantisation": Figure("quantisation.png", "Perplexity cost of post-training quantisation: against "
                           "activation bit-width (left) and for every format run (right); mean over seeds, error bars "
                           "min-max.", F.quantisation),
    "quant_probe": Figure("quant_probe.png", "Quantisability during training (`ofe train --quant_probe N`): the "
                          "W8A8 (left) and W4A4 (right) perplexity cost of the simulated model on a fixed held-out "
                          f"batch; a triangle marks each run's onset, the first probe with a W8A8 cost >= "
                          f"{F.PROBE_ONSET_PCT:g}%.", F.quant_probe),
}


def _draw(groups: dict[str, list[Run]], figdir: Path) -> list[Figure]:
    """Every figure there is something to draw for, in :data:`FIGURES` order."""
    colour = F.colours(list(groups))
    live = {k: [r for r in v if r.diverged is None and r.monitored] for k, v in groups.items()}
    live = {k: v for k, v in live.items() if v}
    if not live:
        return []
    return [fig for fig in FIGURES.values() if fig.draw(live, colour, figdir / fig.file) is not None]


class ReportError(OfeError, ValueError):
    """An output directory the report may not replace."""


EVIDENCE = "evidence.json.gz"
REPORT_FILES = ("report.md", "summary.json", "claims.json", EVIDENCE)
CLAIMS_SCHEMA = 3  # 2: each claim carries its rule_version; 3: the report saves its evidence (evidence.json.gz). With figures/<FIGURES files>: all a report writes


def _check_report_dir(out: Path) -> None:
    """``out`` may be new, empty, or a report this writer made (its summary.json has our keys)."""
    own = [out / "figures", *(out / n for n in REPORT_FILES), *(out / "figures" / f.file for f in FIGURES.values())]
    problem = output_folder_problem(out, own, "summary.json", {"runs", "claims", "figures"}, REPORT_LOCK, "report")
    if problem:
        raise ReportError(problem)


def _install(tmp: Path, out: Path) -> None:
    """Move the report's own files from ``tmp`` into ``out`` one by one (each an atomic rename);
    figures of an earlier report that this one did not draw are removed; nothing else is touched."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    known = {fig.file for fig in FIGURES.values()}
    for name in known:
        new, old = tmp / "figures" / name, out / "figures" / name
        if new.exists():
            os.replace(new, old)
        elif old.exists():
            old.unlink()
    for name in REPORT_FILES[::-1]:  # summary.json first: report.md last, once the rest is in place
        os.replace(tmp / name, out / name)


def write_report(runs: list[Run], out_dir: str | Path, title: str = "Outlier features report") -> list[ClaimResult]:
    """Write ``report.md``, ``summary.json`` and ``figures/*.png`` under ``out_dir``.

    Everything is drawn into a temporary sibling directory first; only when it is complete are the
    report's own files moved in, each atomically. Other files in ``out_dir`` are never touched, and
    a directory that is not an ofe report is refused."""
    out = Path(out_dir)
    _check_report_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(out / REPORT_LOCK):
            return _write_report_locked(runs, out, title)
    except LockHeld as e:
        raise ReportError(f"another ofe process (pid {e.pid}) is writing the report in {out}; wait for it") from None


REPORT_LOCK = ".report.lock"
DRAFT_MARK = ".ofe-report-draft"  # inside a draft folder: what a killed writer leaves is recognisably ours


def _remove_stale_drafts(out: Path) -> None:
    """Draft folders of this report that a killed writer left beside it (under the report's lock, so no
    live writer owns one); only folders with ofe's name pattern and mark, never through a link."""
    for draft in out.parent.glob(f".{out.name}-*"):
        if draft.is_dir() and not draft.is_symlink() and (draft / DRAFT_MARK).is_file():
            shutil.rmtree(draft)


def _write_report_locked(runs: list[Run], out: Path, title: str) -> list[ClaimResult]:
    _remove_stale_drafts(out)
    groups = label_runs(runs)
    rows = [run_row(r) for r in runs]
    claims = evaluate_claims(runs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / DRAFT_MARK).write_text("")
        (tmp / "figures").mkdir()
        made = _draw(groups, tmp / "figures")
        corpora = sorted({r.corpus_description for r in runs if r.corpus_description})
        md = [f"# {title}", "", f"{len(runs)} runs, {len(groups)} configurations: {', '.join(groups)}.", "",
              *(f"{c[0].upper()}{c[1:]}." for c in corpora), *([""] if corpora else []),
              "## Runs", "", "Validation perplexity at the end of training; W8A8 / W8A4 cost: perplexity increase of "
              "the simulated quantised model over the float one (`ofe quantize`); kurtosis: residual stream after each "
              "block at the last step, averaged / maximised over layers.", "", runs_table(rows), "", *_threads_line(runs), *_onset_lines(runs),
              "## Claims", "", "Tested on these runs only; `untested` means no pair of runs isolates the setting.", "",
              claims_table(claims), "", "How each verdict is decided (the numbers behind it are in `claims.json`):", ""]
        md += [f"- **{c.id}** (rule v{c.rule_version}, docs/claims-protocol.md): {c.rule}." for c in claims] + [""]
        if (lrs := lr_table(runs)) is not None:
            md += ["## Learning rates", "", "Final validation loss (nats/token) per arm and lr, mean over the seeds that "
                   "every lr of the arm was run with (seeds column); each arm is compared at its tuned lr (bold: the "
                   "lowest loss). Margin: the runner-up lr's loss minus the tuned lr's, mean of the per-seed "
                   "differences +- its standard error; a **tie** means the choice of lr is within seed noise, and "
                   "so is any claim that depends on it.", "", lrs, ""]
        if (bands := band_table(runs)) is not None:
            md += ["Near-optimal lr band of each arm: the lrs whose paired mean gap to the tuned lr is at most "
                   f"epsilon = max(2 standard errors, {BAND_FLOOR:g} nats, the measured thread/processor spread of a "
                   "final loss); C1, C2, C6 and C8 are judged at every lr (pair) in the bands "
                   "(docs/claims-protocol.md).", "", bands, ""]
        md += ["## Figures", ""]
        for fig in made:
            md += [f"![{fig.caption}](figures/{fig.file})", "", f"*{fig.caption}*", ""]
        md += ["## Runs included", ""] + [f"- `{r.path}`" for r in runs]
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        summary = {"runs": rows, "claims": [c.__dict__ for c in claims], "figures": [fig.file for fig in made]}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        (tmp / "claims.json").write_text(json.dumps(claims_json(claims, runs), indent=1))
        _write_evidence(tmp / EVIDENCE, runs, title)
        pause_point("report-drafted")
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return claims


def _onset_lines(runs: list[Run]) -> list[str]:
    """Each probed run's onset step (the first quantisation probe with a W8A8 cost >= the threshold)."""
    onsets = [(r.path.name, F.probe_onset(r)) for r in runs if any(F.PROBE_KEYS[0] in x for x in r.records)]
    if not onsets:
        return []
    cells = [f"{name} {'never' if onset is None else f'step {onset[0]}'}" for name, onset in onsets]
    return [f"Onset of an int8 cost (the first quantisation probe with W8A8 >= {F.PROBE_ONSET_PCT:g}%): "
            + "; ".join(cells) + ".", ""]


def _threads_line(runs: list[Run]) -> list[str]:
    """A sentence naming the CPU thread count each run trained with (its numbers vary with it), if recorded."""
    counts = Counter(r.records[-1].get("threads") for r in runs if r.records and r.records[-1].get("threads"))
    if not counts:
        return []
    text = ", ".join(f"{n} run{'s' if n > 1 else ''} on {t} thread{'s' if t > 1 else ''}" for t, n in sorted(counts.items()))
    return [f"Threads per run (final losses and costs move slightly with it; see docs/claims-protocol.md): {text}.", ""]


def _write_evidence(path: Path, runs: list[Run], title: str) -> None:
    """The runs' numbers behind the report (:func:`ofe.analysis.runs.run_evidence`), gzipped with a fixed
    timestamp so that the same runs give the same bytes."""
    data = json.dumps({"schema": EVIDENCE_SCHEMA, "title": title, "runs": [run_evidence(r) for r in runs]})
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data.encode())


def read_evidence(path: str | Path) -> tuple[str, list[Run]]:
    """The title and the runs of a report's evidence file, labelled as a report labels them."""
    try:
        with gzip.open(path, "rb") as f:
            data = json.loads(f.read().decode())
    except (OSError, EOFError, ValueError) as e:
        raise RunError(f"{path}: not a readable evidence file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("schema") != EVIDENCE_SCHEMA or not isinstance(data.get("runs"), list):
        raise RunError(f"{path}: not an evidence file of schema {EVIDENCE_SCHEMA}")
    if not data["runs"]:
        raise RunError(f"{path}: holds no runs")
    return str(data.get("title", "Outlier features report")), order_and_label([run_from_evidence(e) for e in data["runs"]])


def rejudge(paths: list[str], log: Callable[[str], None] = print) -> list[Path]:
    """``ofe rejudge``: every report under ``paths`` that saved its evidence is judged again with
    today's rules and rewritten in place (report.md, claims.json, summary.json, figures); returns the
    report directories. The runs themselves are not needed."""
    found = sorted({p.parent for root in map(Path, paths)
                    for p in ([root / EVIDENCE] if (root / EVIDENCE).is_file() else root.rglob(EVIDENCE))})
    if not found:
        raise RunError(f"no {EVIDENCE} under {', '.join(paths)} (a report saves one since claims.json schema 3)")
    for report_dir in found:
        title, runs = read_evidence(report_dir / EVIDENCE)
        claims = write_report(runs, report_dir, title)
        log(f"{report_dir}: " + ", ".join(f"{c.id} {c.status}" for c in claims))
    return found


@dataclass(frozen=True)
class ReportOptions:
    """Options of ``ofe report``."""

    out_dir: str = C.field("report", "directory for report.md, summary.json and figures/ (an earlier report's files "
                                     "there are replaced; nothing else in it is touched)")
    title: str = C.field("Outlier features report", "title of report.md")


def report(run_dirs: list[str], opts: ReportOptions = ReportOptions(), log=print) -> list[ClaimResult]:
    """``ofe report``: load the runs, write the report, print the runs and claims tables."""
    runs = load_runs(run_dirs)
    claims = write_report(runs, opts.out_dir, opts.title)
    log(runs_table([run_row(r) for r in runs]))
    log("\n" + format_claims(claims))
    log(f"\nwrote {Path(opts.out_dir) / 'report.md'}")
    return claims
