"""The report's figures, in the paper's style: one PNG each, one colour per configuration."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from ofe.analysis.claims import C8_MIN_PCT
from ofe.analysis.fair import LR, arm_key, lr_bands
from ofe.analysis.runs import Run, arm_name


class _Pyplot:
    """``matplotlib.pyplot`` (and ``.ticker``) on first use, with the file-only Agg backend: importing
    matplotlib costs ~0.6 s, which every ``ofe`` command would otherwise pay at start-up."""

    def __getattr__(self, name: str):
        return getattr(self.module(), name)

    @staticmethod
    @functools.cache  # imported and configured once, not on every attribute access
    def module() -> ModuleType:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot
        import matplotlib.ticker  # noqa: F401

        return matplotlib.pyplot


plt = _Pyplot()


def _ticker() -> ModuleType:
    """``matplotlib.ticker``, imported with pyplot on first use."""
    return plt.module().matplotlib.ticker

TERM_NAMES = {"u4_1": "u4,1 (linear)", "u4_2": "u4,2 (quadratic)", "u4_3": "u4,3", "u4_4": "u4,4", "u2": "2nd moment (u2)"}


def colours(labels: list[str]) -> dict[str, tuple]:
    """One distinct colour per configuration, the same in every figure."""
    if len(labels) <= 10:
        cmap = plt.get_cmap("tab10")
        return {label: cmap(i) for i, label in enumerate(labels)}
    if len(labels) <= 20:
        cmap = plt.get_cmap("tab20")
        return {label: cmap(i) for i, label in enumerate(labels)}
    cmap = plt.get_cmap("gist_ncar")
    return {label: cmap(i / len(labels) * 0.9) for i, label in enumerate(labels)}


def _legend(ax, fig, **kw) -> None:
    """Inside the axes for a few entries, outside on the right when there are many."""
    n = len(ax.get_legend_handles_labels()[1])
    if n <= 6:
        ax.legend(fontsize=8, **kw)
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)
        fig.set_size_inches(fig.get_size_inches()[0] + 3.2, max(fig.get_size_inches()[1], 0.22 * n + 1))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _log_if_spread(ax, values: np.ndarray) -> None:
    values = values[np.isfinite(values) & (values > 0)]
    if values.size and values.max() / values.min() > 8:
        ax.set_yscale("log")


def _plain_ticks(ax, axis: str = "y") -> None:
    """Tick labels as plain numbers (2, 3, 5), not 2x10^0, on a log axis."""
    def minor(v: float, _pos: int) -> str:  # label 2, 3, 5 (x 10^k) between the decades, no crowding
        return f"{v:g}" if v > 0 and f"{v:e}"[0] in "235" else ""

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(_ticker().FuncFormatter(lambda v, _pos: f"{v:g}"))
    target.set_minor_formatter(_ticker().FuncFormatter(minor))


def _panels(n: int, size: tuple[float, float] = (4.2, 3.2)):
    """A grid that fits a page: 2 columns up to 4 panels (2x2), 3 beyond."""
    cols = min(n, 2 if n <= 4 else 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _mean_curve(runs: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """Steps shared by all seeds and the mean over seeds of the per-layer kurtosis ``(S, L)``."""
    curves = [r.kurtosis_curve() for r in runs if r.monitored]
    n = min(len(s) for s, _ in curves)
    return curves[0][0][:n], np.mean([k[:n] for _, k in curves], axis=0)


def kurtosis_vs_step(groups: dict[str, list[Run]], path: Path) -> Path:
    fig, axes = _panels(len(groups))
    for ax, (label, runs) in zip(axes, groups.items()):
        steps, k = _mean_curve(runs)
        cmap = plt.get_cmap("viridis")
        for layer in range(k.shape[1]):
            ax.plot(steps, k[:, layer], color=cmap(layer / max(1, k.shape[1] - 1)), label=f"layer {layer}")
        ax.set_title(f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})", fontsize=9)
        ax.set_xlabel("step")
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    axes[0].set_ylabel("kurtosis of neuron RMS (residual stream)")
    allk = np.concatenate([_mean_curve(r)[1].ravel() for r in groups.values()])
    _log_if_spread(axes[0], allk)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _metric_curve(run: Run, key: str, reduce: Callable[[list[float]], float] = max) -> tuple[np.ndarray, np.ndarray]:
    """Monitored steps and the largest (``reduce``) per-layer value of ``key`` at each (empty if not logged)."""
    rows = [(r["step"], reduce(r[key])) for r in run.monitored if r.get(key)]
    return (np.array([s for s, _ in rows]), np.array([v for _, v in rows], dtype=float)) if rows else (np.zeros(0), np.zeros(0))


def massive_activations(groups: dict[str, list[Run]], colour: dict[str, tuple], path: Path) -> Path | None:
    """Largest |activation| over the median (left) and the share of the 50 largest at position 0
    (middle), the highest layer at each monitored step, and where logged (ofe >= 0.4) the lowest
    layer's int8 SQNR (right: quantisability during training); one line per run. None if not logged."""
    runs_all = [r for runs in groups.values() for r in runs]
    if not any(_metric_curve(r, "abs_max_median")[0].size for r in runs_all):
        return None
    panels = [("abs_max_median", max), ("position0_share", max)]
    if any(_metric_curve(r, "int8_sqnr_db", min)[0].size for r in runs_all):
        panels.append(("int8_sqnr_db", min))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for label, runs in groups.items():
        for i, r in enumerate(runs):
            for ax, (key, reduce) in zip(axes, panels):
                steps, values = _metric_curve(r, key, reduce)
                if steps.size:
                    ax.plot(steps, values, color=colour[label], lw=1, alpha=0.85, label=label if i == 0 else None)
    ax_m, ax_p = axes[0], axes[1]
    ax_m.set_yscale("log")
    _plain_ticks(ax_m)
    ax_m.set_ylabel("max |x| / median |x|")
    ax_p.set_ylabel("share of top-50 |x| at position 0")
    ax_p.set_ylim(0, 1.02)
    if len(panels) == 3:
        axes[2].set_ylabel("int8 SQNR of the worst layer (dB, per-tensor scale)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _legend(ax_m, fig)
    return _save(fig, path)


def final_kurtosis_by_layer(groups: dict[str, list[Run]], colour: dict[str, tuple], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    allk = []
    for label, runs in groups.items():
        finals = np.array([r.final["kurtosis"] for r in runs if r.diverged is None])
        if not finals.size:
            continue
        layers = np.arange(finals.shape[1])
        mean, err = _spread(finals)
        allk.append(finals.ravel())
        ax.errorbar(layers, mean, yerr=err, color=colour[label], marker="o", capsize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("final kurtosis (mean over seeds, bars: min-max)")
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax.xaxis.set_major_locator(_ticker().MaxNLocator(integer=True))
    if allk:
        _log_if_spread(ax, np.concatenate(allk))
    _legend(ax, fig)
    return _save(fig, path)


def loss_curves(groups: dict[str, list[Run]], colour: dict[str, tuple], path: Path) -> Path:
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in groups.items():
        for i, r in enumerate(runs):
            steps, loss = r.train_loss_curve()
            ax_t.plot(steps, loss, color=colour[label], lw=1, alpha=0.8, label=label if i == 0 else None)
            val = [(x["step"], x["val_loss"]) for x in r.records if "val_loss" in x]
            if val:
                ax_v.plot(*zip(*val), color=colour[label], marker=".", alpha=0.8, label=label if i == 0 else None)
    ax_t.set_title("training loss (trailing mean of 20 steps)", fontsize=9)
    ax_v.set_title("validation loss", fontsize=9)
    for ax in (ax_t, ax_v):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_yscale("log")
        _plain_ticks(ax)
    _legend(ax_v, fig)
    return _save(fig, path)


def kurtosis_vs_loss(groups: dict[str, list[Run]], colour: dict[str, tuple], path: Path) -> Path:
    """Mean-over-layers kurtosis against smoothed training loss: configurations compared at matched loss."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    allk = []
    for label, runs in groups.items():
        for i, r in enumerate(runs):
            steps, loss = r.train_loss_curve()
            if not steps.size:
                continue
            best = np.minimum.accumulate(loss)  # loss reached so far: monotone, so runs line up by progress
            mon = [m for m in r.monitored if m["step"] <= steps[-1]]
            x = [best[min(np.searchsorted(steps, m["step"]), len(best) - 1)] for m in mon]
            y = [float(np.mean(m["kurtosis"])) for m in mon]
            allk += y
            ax.plot(x, y, color=colour[label], marker=".", lw=1, alpha=0.85, label=label if i == 0 else None)
    ax.invert_xaxis()  # training moves left to right
    ax.set_xscale("log")
    _plain_ticks(ax, "x")
    ax.set_xlabel("lowest training loss so far (trailing mean of 20 steps, nats / token)")
    ax.set_ylabel("kurtosis (mean over layers)")
    _log_if_spread(ax, np.array(allk))
    ax.axhline(1.0, color="grey", lw=0.6, ls=":")
    _legend(ax, fig)
    return _save(fig, path)


def correlation_vs_kurtosis(groups: dict[str, list[Run]], colour: dict[str, tuple], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, runs in groups.items():
        pts = [(c, k) for r in runs if r.diverged is None for rec in r.monitored[1:]
               if "input_correlation" in rec for c, k in zip(rec["input_correlation"], rec["kurtosis"])]
        if pts:
            ax.scatter(*zip(*pts), s=6, alpha=0.35, color=colour[label], label=label)
    ax.set_xlabel("input correlation (mean cosine similarity between tokens)")
    ax.set_ylabel("kurtosis")
    ax.set_yscale("log")
    ax.set_title("every layer at every monitored step after the first", fontsize=9)
    _legend(ax, fig, markerscale=3)
    return _save(fig, path)


def decomposition(groups: dict[str, list[Run]], path: Path) -> Path | None:
    have = {label: runs for label, runs in groups.items() if any(r.decomposition[0].size for r in runs)}
    if not have:
        return None
    fig, axes = _panels(len(have))
    for ax, (label, runs) in zip(axes, have.items()):
        parts = [r.decomposition for r in runs if r.decomposition[0].size]
        n = min(len(s) for s, _ in parts)
        steps = parts[0][0][:n]
        for term, name in TERM_NAMES.items():
            if term == "u2":
                series = [c["u2_1"][:n] + c["u2_2"][:n] for _, c in parts]
            else:
                series = [c[term][:n] for _, c in parts]
            ax.plot(steps, np.mean(series, axis=0).mean(1), label=name, lw=1.5 if term == "u4_2" else 1)
        total = np.mean([sum(c[k][:n] for k in c) for _, c in parts], axis=0).mean(1)
        ax.plot(steps, total, color="black", ls="--", lw=1, label="total = kurtosis change")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("cumulative kurtosis change")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


SWEEP_FORMATS = ("W8A8", "W8A6", "W8A5", "W8A4")


def _spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds (rows) and the (low, high) error-bar lengths of the min-max range (NaN where
    no seed measured that format: an older run's quantisation result lacks the newer formats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN: nothing is drawn there
        mean = np.nanmean(values, 0)
        # clipped at 0: the mean of equal values can round a hair past them, and matplotlib refuses negative errors
        return mean, np.clip(np.vstack([mean - np.nanmin(values, 0), np.nanmax(values, 0) - mean]), 0, None)


def quantisation(groups: dict[str, list[Run]], colour: dict[str, tuple], path: Path) -> Path | None:
    """Left: the activation bit-width sweep (weights 8-bit). Right: every format that was run.
    Perplexity increase over the float model on a symmetric-log axis (an 8-bit increase can be
    slightly negative); bars and markers are the mean over seeds, error bars the min-max."""
    have = {label: [r for r in runs if r.quant] for label, runs in groups.items()}
    have = {k: v for k, v in have.items() if v}
    if not have:
        return None
    formats = list(dict.fromkeys(f["format"] for runs in have.values() for r in runs for f in r.quant.get("formats", [])))
    fig, (ax_b, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    bits = np.array([8, 6, 5, 4])
    width = 0.8 / len(have)
    lowest = 0.0
    for i, (label, runs) in enumerate(have.items()):
        inc = np.array([[r.quant_increase(f) if r.quant_increase(f) is not None else np.nan for f in SWEEP_FORMATS]
                        for r in runs], dtype=float)
        keep = np.isfinite(inc).any(0)
        if keep.any():
            mean, err = _spread(inc[:, keep])
            ax_b.errorbar(bits[keep], mean, yerr=err, marker="o", capsize=3, color=colour[label], label=label)
        per_format = np.array([[r.quant_increase(f) if r.quant_increase(f) is not None else np.nan for f in formats]
                               for r in runs], dtype=float)
        mean, err = _spread(per_format)
        lowest = min(lowest, float(np.nanmin(per_format)))
        ax_f.bar(np.arange(len(formats)) + (i - (len(have) - 1) / 2) * width, mean, width, yerr=err, capsize=2,
                 color=colour[label], label=label)
    ax_b.set_xlabel("activation bits (weights 8-bit, integer per-tensor)")
    ax_b.set_xticks(bits)
    ax_b.invert_xaxis()
    ax_f.set_xticks(np.arange(len(formats)), formats, rotation=30, ha="right")
    ax_f.set_xlabel("format")
    for ax in (ax_b, ax_f):
        ax.set_ylabel("perplexity increase over float (%)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylim(bottom=lowest * 1.5 if lowest < 0 else 0)  # no empty negative half when nothing is negative
        _plain_ticks(ax)
        ax.axhline(0, color="grey", lw=0.6)
    _legend(ax_f, fig)
    return _save(fig, path)


def cost_vs_lr(groups: dict[str, list[Run]], colour: dict[str, tuple], path: Path) -> Path | None:
    """The headline against the lr: W8A8, W8A4 and W4A4 cost, final max kurtosis and max/median |x| for
    every arm run at more than one lr; every seed a point, the mean a line, the arm's near-optimal lr
    band shaded. None when no arm has several lrs."""
    runs = [r for rs in groups.values() for r in rs if r.settings.get(LR) is not None]
    bands = lr_bands(runs)
    arms: dict[tuple, list[Run]] = {}
    for r in runs:
        arms.setdefault(arm_key(r), []).append(r)
    arms = {k: v for k, v in arms.items() if len({r.settings[LR] for r in v}) > 1}
    if not arms:
        return None
    def value(r: Run, key: str) -> float | None:
        if key in ("kurtosis", "abs_max_median"):
            return float(np.max(r.final[key])) if r.final.get(key) else None
        return r.quant_increase(key)

    panels = [("W8A8", "W8A8 cost (%)"), ("W8A4", "W8A4 cost (%)"), ("W4A4", "W4A4 cost (%)"),
              ("kurtosis", "final max kurtosis"), ("abs_max_median", "final max |x| / median |x|")]
    panels = [(k, y) for k, y in panels if any(value(r, k) is not None for rs in arms.values() for r in rs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False)
    axes = axes[0]
    palette = plt.get_cmap("tab10")
    for i, (arm, members) in enumerate(arms.items()):
        col, band = palette(i % 10), bands[arm]["band"]
        for ax, (key, _) in zip(axes, panels):
            points = [(float(r.settings[LR]), v) for r in members if (v := value(r, key)) is not None]
            if not points:
                continue
            lrs, values = map(np.array, zip(*points))
            ax.scatter(lrs, values, color=col, s=14, alpha=0.8)
            grid = np.unique(lrs)
            ax.plot(grid, [values[lrs == lr].mean() for lr in grid], color=col, lw=1.2,
                    label=arm_name(members[0]) if ax is axes[0] else None)
            ax.axvspan(min(band) / 1.15, max(band) * 1.15, color=col, alpha=0.12, lw=0)
    for ax, (key, ylabel) in zip(axes, panels):
        ax.set_xscale("log")
        ax.set_xlabel("peak lr (band shaded)")
        ax.set_ylabel(ylabel)
        if key.startswith("W"):
            ax.set_yscale("symlog", linthresh=0.1)
        else:
            ax.set_yscale("log")
        _plain_ticks(ax)
        ax.grid(alpha=0.3)
    _legend(axes[0], fig)
    return _save(fig, path)


REMEDY_MARKERS = {"train-time": "o", "post-hoc": "s", "combination": "*"}


def remedies_scatter(rows: list[dict], path: Path) -> Path:
    """Float quality against quantisation cost, one point per remedy: validation perplexity (x) and
    the W4A4 and W8A8 perplexity increase at the linear-layer inputs (y), in two panels. The y axis
    is symmetric-log (linear within +-0.1%), so that costs spanning decades and costs at or below
    zero (measurement noise at this scale) are both shown as they are."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    rows = [r for r in rows if "diverged" not in r]
    colour = colours([r["remedy"] for r in rows])
    for ax, fmt in zip(axes, ("W4A4", "W8A8")):
        ys = []
        for r in rows:
            cost = r.get(fmt) or {}
            if "increase_pct" not in cost:
                continue
            y = cost["increase_pct"]
            ys.append(y)
            ax.scatter(r["val_ppl"], y, marker=REMEDY_MARKERS[r["kind"]], s=90 if r["kind"] == "combination" else 45,
                       color=colour[r["remedy"]], edgecolor="black", linewidth=0.5, label=f"{r['remedy']} ({r['kind']})")
        if ys and max(abs(y) for y in ys) > 1.0:
            ax.set_yscale("symlog", linthresh=0.1)
            ax.yaxis.set_major_formatter(_ticker().FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("validation perplexity (float model; lower is better)")
        ax.set_ylabel(f"{fmt} perplexity increase, % (lower is better)")
        ax.set_title(f"{fmt}, linear-layer inputs")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=130, format="png")
    plt.close(fig)
    return path


PROBE_ONSET_PCT = C8_MIN_PCT  # a W8A8 cost at or above C8's floor is the run's onset of an int8 cost
PROBE_KEYS = ("w8a8_probe_pct", "w4a4_probe_pct")  # what `ofe train --quant_probe` logs


def _probe_curve(run: Run, key: str) -> list[tuple[int, float]]:
    """``(step, cost %)`` of every probe of ``key`` in the run's records."""
    return [(int(r["step"]), float(r[key])) for r in run.records if isinstance(r.get(key), (int, float))]


def probe_onset(run: Run) -> tuple[int, float] | None:
    """The first probe whose W8A8 cost is at least :data:`PROBE_ONSET_PCT` percent, ``(step, cost)``."""
    return next(((s, v) for s, v in _probe_curve(run, PROBE_KEYS[0]) if v >= PROBE_ONSET_PCT), None)


def quant_probe(groups: dict[str, list[Run]], colour: dict[str, tuple], path: Path) -> Path | None:
    """W8A8 (left) and W4A4 (right) perplexity cost over training from the quantisation probe, one line
    per run, each run's onset step (W8A8 cost first >= PROBE_ONSET_PCT) marked. None without probes."""
    if not any(_probe_curve(run, key) for runs in groups.values() for run in runs for key in PROBE_KEYS):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs in groups.items():
        for i, run in enumerate(runs):
            for ax, key in zip(axes, PROBE_KEYS):
                if rows := _probe_curve(run, key):
                    steps, values = zip(*rows)
                    ax.plot(steps, values, color=colour[label], lw=1, alpha=0.85, label=label if i == 0 else None)
            if (onset := probe_onset(run)) is not None:
                axes[0].plot([onset[0]], [onset[1]], marker="v", color=colour[label], ms=8)
    axes[0].axhline(PROBE_ONSET_PCT, color="grey", ls=":", lw=1)
    for ax, name in zip(axes, ("W8A8", "W4A4")):
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} perplexity cost (%), held-out probe")
        ax.grid(alpha=0.3)
    _legend(axes[0], fig)
    return _save(fig, path)
