"""The lr-grid table of docs/results/studies/bigram-backcopy.md, section 4, from the sweeps' run directories.

    python scripts/backcopy_grid.py runs/backcopy-linear-*

One row per (block + optimiser, lr): the final validation loss (mean over the seeds, and per seed),
the largest per-layer kurtosis, largest |activation| and max-to-median ratio over layers and seeds
(on `ofe quantize`'s batch), the W8A8 perplexity increase per seed and the mean W8A4 increase; then
each arm's tuned lr (lowest mean final validation loss). Only finished, quantised runs count.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ARMS = {"pre-ln + adamw": "Pre-LN + AdamW", "op + soap": "OP + SOAP", "pre-ln + soap": "Pre-LN + SOAP",
        "op + adamw": "OP + AdamW"}


def finished_runs(sweep_dirs: list[str]) -> dict[tuple[str, float], list[dict]]:
    """(arm, lr) -> one dict per finished, quantised run."""
    runs: dict[tuple[str, float], list[dict]] = defaultdict(list)
    dirs = [Path(d) for d in sweep_dirs if Path(d).is_dir()]
    for run in sorted(p for d in dirs for p in d.iterdir() if (p / "quant.json").exists()):
        cfg = json.loads((run / "config.json").read_text())
        evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
        if not evals or evals[-1]["step"] != cfg["steps"]:
            continue
        quant = json.loads((run / "quant.json").read_text())
        formats = {f["format"]: f["increase_pct"] for f in quant["formats"]}
        layers = quant["layers"]
        runs[(f"{cfg['model']['block']} + {cfg['optim']['name']}", cfg["optim"]["lr"])].append(dict(
            seed=cfg["seed"], val=evals[-1]["val_loss"], kurt=max(x["kurtosis"] for x in layers),
            maxabs=max(x["max_abs"] for x in layers), mm=max(x["abs_max_median"] for x in layers),
            w8a8=formats["W8A8"], w8a4=formats["W8A4"]))
    return runs


def span(rows: list[dict], key: str, fmt: str) -> str:
    lo, hi = min(r[key] for r in rows), max(r[key] for r in rows)
    return fmt.format(lo) if len(rows) == 1 else f"{fmt.format(lo)}-{fmt.format(hi)}"


def main(sweep_dirs: list[str]) -> None:
    runs = finished_runs(sweep_dirs)
    print("| arm | lr | seeds | val loss, mean (per seed) | max kurtosis | max abs | max/median | W8A8 (per seed) | W8A4 (mean) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    best: dict[str, tuple[float, float]] = {}
    for (arm, lr), rows in sorted(runs.items(), key=lambda kv: (list(ARMS).index(kv[0][0]), kv[0][1])):
        rows.sort(key=lambda r: r["seed"])
        mean = statistics.mean(r["val"] for r in rows)
        if arm not in best or mean < best[arm][1]:
            best[arm] = (lr, mean)
        per_seed = " / ".join(f"{r['val']:.4f}" for r in rows)
        w8a8 = " / ".join(f"{r['w8a8']:+.2f}%" for r in rows)
        print(f"| {ARMS[arm]} | {lr:g} | {','.join(str(r['seed']) for r in rows)} | {mean:.4f} ({per_seed}) | "
              f"{span(rows, 'kurt', '{:.1f}')} | {span(rows, 'maxabs', '{:,.0f}')} | {span(rows, 'mm', '{:.0f}')} | "
              f"{w8a8} | {statistics.mean(r['w8a4'] for r in rows):+.0f}% |")
    print()
    for arm, (lr, mean) in best.items():
        print(f"{ARMS[arm]}: tuned lr {lr:g} (mean final val loss {mean:.4f})")


if __name__ == "__main__":
    main(sys.argv[1:])
