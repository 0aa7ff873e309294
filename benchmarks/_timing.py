"""Shared by the benchmarks: interleaved step timing, a paired bootstrap interval, the CPU's name, a
training step's FLOP count."""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], steps: int, sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time ``steps`` calls of every function, one call each per round, rotating the order each
    round so drift and noise hit every contender alike. Returns seconds per call, by name."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_ci(times: list[float], base: list[float], block: int = 1, n_boot: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of ``sum(times) / sum(base)``, resampling paired blocks of ``block``
    consecutive interleaved rounds (use the period of any periodic work, e.g. 10 for "every 10")."""
    pairs = [(sum(times[i : i + block]), sum(base[i : i + block])) for i in range(0, len(times) - block + 1, block)]
    rng = random.Random(0)
    ratios = []
    for _ in range(n_boot):
        sample = rng.choices(pairs, k=len(pairs))
        ratios.append(sum(t for t, _ in sample) / sum(b for _, b in sample))
    ratios.sort()
    return ratios[int(0.025 * n_boot)], ratios[int(0.975 * n_boot) - 1]


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), to print beside every timing."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def train_step_flops(model, batch_size: int) -> float:
    """A GPT training step's FLOPs: 6 x parameters x tokens (forward + backward of every weight) plus
    the attention products 12 x layers x T^2 x d per sequence (QK^T and PV, forward and backward)."""
    c = model.cfg
    return 6 * model.num_params() * batch_size * c.seq_len + 12 * c.n_layer * c.seq_len**2 * c.d_model * batch_size


def mode_ratios(per_step: dict[str, list[float]], base: str = "off") -> dict[str, dict[str, object]]:
    """Print each mode's mean step time and its ratio to ``base`` with a bootstrap 95% interval (blocks of
    10 steps); return the same numbers, ``{mode: {"s_per_step", "ratio", "ratio_ci95"}}``."""
    import statistics

    mean_base = statistics.fmean(per_step[base])
    print(f"{'mode':<10} {'mean s/step':>12} {'ratio':>7} {'95% CI of ratio':>18}")
    out: dict[str, dict[str, object]] = {}
    for name, times in per_step.items():
        mean = statistics.fmean(times)
        lo, hi = ratio_ci(times, per_step[base], block=10)
        out[name] = {"s_per_step": mean, "ratio": mean / mean_base, "ratio_ci95": [lo, hi]}
        print(f"{name:<10} {mean:>12.4f} {mean / mean_base:>7.3f} {f'[{lo:.3f}, {hi:.3f}]':>18}")
    return out
