"""What the monitor computes on an observed activation, and how per-layer results are combined.

:func:`site_metrics` turns one activation into small result tensors on the device (the activation
itself is not kept); :func:`combine` turns the flat list of results of a step, copied to the host
once, into ``{site: {metric: [value per layer]}}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ofe import metrics as M
from ofe.monitor.reduce import REDUCTIONS, finish

ACTIVATION_METRICS: dict[str, Callable[[Tensor], Tensor]] = {
    "kurtosis": M.kurtosis,
    "kurtosis_centered": lambda x: M.kurtosis(x, center=True),
    "mmr": M.max_median_ratio,
    "input_correlation": M.input_correlation,
    "max_abs": M.max_abs,
    "seq_max_abs": M.sequence_max_abs,
    "seq_kurtosis": M.sequence_kurtosis,
    "token_excess_kurtosis": M.token_excess_kurtosis,
    "int8_outlier_dims": M.int8_token_frac,  # per-layer token fractions, combined over layers by combine()
    "int8_sqnr_db": M.int8_sqnr_db,
    "abs_max_median": M.abs_max_median,
    "position0_share": M.position0_share,
}
PROBS_METRICS: dict[str, Callable[[Tensor], Tensor]] = {"attention_entropy": M.attention_entropy,
                                                        "sink_score": M.sink_score}
DEFAULT_METRICS = ("kurtosis", "mmr", "input_correlation", "max_abs", "attention_entropy")
ALL_METRICS = tuple(ACTIVATION_METRICS) + tuple(PROBS_METRICS)
PROBS_SITE = "attn_probs"
# What training logs: the defaults plus where the largest activations sit (massive activations, sinks)
# and how well one int8 scale holds each layer's activations (quantisability, step by step).
TRAIN_METRICS = DEFAULT_METRICS + ("abs_max_median", "position0_share", "sink_score", "int8_sqnr_db")
# Metrics that need a (..., T, d) tensor with T >= 2: skipped for 2-D outputs.
SEQUENCE_METRICS = frozenset({"input_correlation", "seq_max_abs", "seq_kurtosis", "position0_share"})

Results = dict[str, dict[str, Any]]
Pending = tuple[str, int, str, Tensor]  # (site, layer, metric, result on the device)


@dataclass(frozen=True)
class Costs:
    """Bounds on the work per observed activation (None: exact, over everything)."""

    max_tokens: int | None = None  # tokens per sequence used by input_correlation
    mmr_max_rows: int | None = 256  # tokens the max-median ratio averages over, evenly spaced
    median_max_elements: int | None = 1 << 14  # entries abs_max_median's median is taken over (evenly spaced): a
    # CPU median of 65k values costs ~4 ms, half of a monitored layer; 16k keep it within ~1% for Gaussian entries
    rank: int = 0  # data-parallel rank and world size: a rank samples the tokens of the global batch's
    world: int = 1  # mmr sample that fall in its slice, so the ranks together sample what one process would


def check_metrics(metrics: Sequence[str] | str) -> tuple[str, ...]:
    names = ALL_METRICS if metrics == "all" else tuple(metrics)
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(ALL_METRICS)}")
    return names


def applicable(site: str, x: Tensor, metrics: Sequence[str]) -> list[str]:
    """The metrics of ``metrics`` that apply to ``site``'s activation ``x``, in their order: attention
    probabilities take the attention metrics; other sites the activation metrics, the per-sequence
    ones only on ``(B, T, ...)`` activations."""
    if site == PROBS_SITE:
        return [name for name in metrics if name in PROBS_METRICS]
    return [name for name in metrics
            if name in ACTIVATION_METRICS and not (name in SEQUENCE_METRICS and x.dim() < 3)]


def site_metrics(site: str, x: Tensor, metrics: Sequence[str], costs: Costs) -> list[tuple[str, Tensor]]:
    """``(metric, value)`` for each metric that applies to ``site``'s activation ``x``."""
    def value(name: str) -> Tensor:
        if site == PROBS_SITE:
            return PROBS_METRICS[name](x)
        if name == "input_correlation":
            return M.input_correlation(x, max_tokens=costs.max_tokens)
        if name == "mmr":
            return M.max_median_ratio(x, max_rows=costs.mmr_max_rows)
        return ACTIVATION_METRICS[name](x)

    return [(name, value(name)) for name in applicable(site, x, metrics)]


def site_partials(site: str, x: Tensor, metrics: Sequence[str], costs: Costs) -> list[tuple[str, Tensor]]:
    """``(metric, partial)`` for each metric that applies to ``site``'s activation ``x``: what
    :func:`combine` reduces over observations and ranks (:mod:`ofe.monitor.reduce`)."""
    def partial(name: str) -> Tensor:
        if site == PROBS_SITE:
            return REDUCTIONS[name].partial(x)
        if name == "input_correlation":
            return REDUCTIONS[name].partial(x, costs.max_tokens)
        if name == "mmr":
            return REDUCTIONS[name].partial(x, costs.mmr_max_rows, costs.rank, costs.world)
        if name == "abs_max_median":
            return REDUCTIONS[name].partial(x, costs.median_max_elements)
        return REDUCTIONS[name].partial(x)

    return [(name, partial(name)) for name in applicable(site, x, metrics)]


def gather_local(flat: Tensor) -> Tensor:
    """One process's partials as the ``(1, K)`` rows a cross-rank gather would give."""
    return flat[None]


def gather_across_ranks(flat: Tensor, group: "torch.distributed.ProcessGroup | None" = None) -> Tensor:
    """``(K,)`` -> ``(world, K)``: every process's partials (of ``group``, default all), on every process
    (one all-gather; ``flat[None]`` in a single process)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        out = flat.new_empty(world * flat.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.13 renamed it
        gather(out, flat.contiguous().reshape(-1), group=group)
        return out.view(world, *flat.shape)
    return flat[None]


def combine(pending: list[Pending], gather: Callable[[Tensor], Tensor] = gather_local) -> Results:
    """Reduce the partials of every observation (micro-batches) and, through ``gather`` (``(K,)`` ->
    ``(world, K)``, one collective, e.g. :func:`gather_across_ranks`), of every
    rank into each metric of everything observed; one transfer to the host. Every rank must have
    observed the same sites, as often."""
    rows = gather(torch.cat([v.reshape(-1) for *_, v in pending])).cpu()
    grouped: dict[tuple[str, str], dict[int, list[Tensor]]] = {}
    offset = 0
    for site, layer, name, value in pending:
        n = value.numel()
        grouped.setdefault((site, name), {}).setdefault(layer, []).append(rows[:, offset : offset + n])
        offset += n
    results: Results = {}
    for (site, name), by_layer in grouped.items():
        per_layer = [finish(name, torch.cat(by_layer[layer])) for layer in sorted(by_layer)]
        if name == "int8_outlier_dims":
            token_frac = torch.tensor(per_layer)  # (L, d)
            results.setdefault(site, {})[name] = int(M.outlier_dims_from_token_frac(token_frac).sum())
        elif name in PROBS_METRICS:  # one value per head
            results.setdefault(site, {})[name] = per_layer
        else:
            results.setdefault(site, {})[name] = [v[0] for v in per_layer]
    return results


def flatten_results(results: Results) -> dict[str, float]:
    """``{"site/metric/layer": value}`` scalars for loggers; entropy as ``.../layer/head``."""
    flat: dict[str, float] = {}
    for site, by_metric in results.items():
        for name, values in by_metric.items():
            if isinstance(values, (int, float)):
                flat[f"{site}/{name}"] = float(values)
                continue
            for layer, value in enumerate(values):
                if isinstance(value, list):
                    for head, v in enumerate(value):
                        flat[f"{site}/{name}/{layer}/{head}"] = v
                else:
                    flat[f"{site}/{name}/{layer}"] = value
    return flat
