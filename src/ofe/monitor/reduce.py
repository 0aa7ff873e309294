"""The monitor's metrics as partial sums that combine exactly: over micro-batches, and over
data-parallel ranks in one collective.

A metric of a whole (global) batch is not the mean of the metric of its parts: the paper's kurtosis
(Eq. 1) of 8 ranks' activations is not the mean of 8 kurtoses. So the monitor's hook computes, for
each metric, a small *partial* of the activation it sees (a 1-D float64 tensor: per-neuron sums of
squares and a count for the kurtosis, a sum and a count for a per-token mean, the top-k values for
where the largest activations sit, ...). At collection the partials of every observation (micro-batch)
on every rank are gathered (one ``all_gather`` per due step) and :func:`finish` turns the rows into
the metric of everything observed.

Exact (equal to one process over the global batch, up to float64 summation order): kurtosis,
kurtosis_centered, seq_kurtosis, token_excess_kurtosis, input_correlation, max_abs, seq_max_abs,
int8_outlier_dims, position0_share (ties aside), attention_entropy, sink_score, and mmr when no
row sample is drawn (``mmr_max_rows`` at least the tokens observed). Not decomposable, so averaged
over observations: abs_max_median (a median over the whole tensor) and int8_sqnr_db (one int8
scale from the whole tensor's range). The attention statistics use the sequences whose
probabilities were materialised (``probs_max_batch`` per rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ofe import metrics as M

F64 = torch.float64
TOP_K = 50  # position0_share's k


@dataclass(frozen=True)
class Reduction:
    """``partial(x)``: a 1-D float64 tensor of a fixed length for the activation's shape;
    ``finish(rows)``: the metric from the ``(R, k)`` partials of every observation and rank."""

    partial: Callable[..., Tensor]
    finish: Callable[[Tensor], Tensor]


def _rows64(x: Tensor) -> Tensor:
    return x.detach().reshape(-1, x.shape[-1]).to(F64)


def _count(n: int, like: Tensor) -> Tensor:
    return torch.tensor([float(n)], dtype=F64, device=like.device)


# ---- per-neuron moments ------------------------------------------------------------------------
def _kurtosis_partial(x: Tensor, center: bool = False) -> Tensor:
    """Per-neuron sums of squares (accumulated in float32, then float64: the activation itself is never
    copied to float64) and the row count."""
    r = x.detach().reshape(-1, x.shape[-1]).float()
    if center:
        r = r - r.mean(-1, keepdim=True)
    return torch.cat([r.square().sum(0).to(F64), _count(len(r), r)])


def _kurtosis_finish(rows: Tensor) -> Tensor:
    total = rows.sum(0)
    s2 = total[:-1] / total[-1]  # squared RMS of each neuron over every input
    return (s2.square().mean() / s2.mean().square()).reshape(1)


def _outliers_partial(x: Tensor, threshold: float = 6.0) -> Tensor:
    r = _rows64(x)
    return torch.cat([(r.abs() >= threshold).sum(0).to(F64), _count(len(r), r)])


def _fraction_finish(rows: Tensor) -> Tensor:
    total = rows.sum(0)
    return total[:-1] / total[-1]


# ---- means over items (tokens, sequences, queries) ------------------------------------------
def _mean_of(values: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Partial of a per-item statistic: ``[sum over items, count]`` (NaN items left out)."""
    def partial(x: Tensor, *args) -> Tensor:
        v = values(x, *args).to(F64).reshape(-1)
        ok = ~v.isnan()
        return torch.stack([v[ok].sum(), ok.sum().to(F64)])
    return partial


def _per_head_mean_of(values: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Partial of a per-head statistic ``(..., H, Q)``: ``[sum per head (H), count per head]``."""
    def partial(p: Tensor) -> Tensor:
        v = values(p).to(F64)
        H = v.shape[-2]
        v = v.movedim(-2, 0).reshape(H, -1)
        return torch.cat([v.sum(-1), torch.full((1,), float(v.shape[1]), dtype=F64, device=v.device)])
    return partial


def _mean_finish(rows: Tensor) -> Tensor:
    total = rows.sum(0)
    return (total[:-1] / total[-1]).reshape(-1)


def _token_ratio(x: Tensor, max_rows: int | None, rank: int = 0, world: int = 1) -> Tensor:
    """max/median of each token's ``|x|``; over at most ``max_rows`` evenly spaced tokens of the
    global batch (``world`` equal slices, this rank's is the ``rank``-th): those in this slice."""
    r = x.detach().reshape(-1, x.shape[-1])
    n = len(r)
    if max_rows is not None and n * world > max_rows:
        chosen = M._evenly_spaced(n * world, max_rows, r.device) - rank * n
        r = r.index_select(0, chosen[(chosen >= 0) & (chosen < n)])
    a = r.abs().to(F64)
    return a.amax(-1) / M._median_last(a)


def _sequence_values(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` of each sequence of ``(..., T, d)``: the metric functions keep one group per sequence."""
    seqs = x.detach().reshape(-1, x.shape[-2], x.shape[-1])
    return fn(seqs)


def _row_entropy(p: Tensor) -> Tensor:
    p = p.detach().to(F64)
    return -torch.special.xlogy(p, p).sum(-1)  # (..., H, Q)


def _sink_mass(p: Tensor) -> Tensor:
    return p.detach()[..., 1:, 0]  # (..., H, T - 1)


# ---- maxima and top-k ------------------------------------------------------------------------
def _max_partial(x: Tensor) -> Tensor:
    return x.detach().abs().amax().to(F64).reshape(1)


def _max_finish(rows: Tensor) -> Tensor:
    return rows.amax(0)


def _top_partial(x: Tensor, k: int = TOP_K) -> Tensor:
    """The ``k`` largest ``|x|`` of ``(B, T, d)`` and whether each sits at position 0 (padded with -1)."""
    T, d = x.shape[-2:]
    flat = x.detach().abs().reshape(-1).to(F64)
    top = flat.topk(min(k, flat.numel()))
    at0 = ((top.indices % (T * d)) // d == 0).to(F64)
    pad = k - len(top.values)
    minus = torch.full((pad,), -1.0, dtype=F64, device=flat.device)
    return torch.cat([top.values, minus, at0, torch.zeros(pad, dtype=F64, device=flat.device)])


def _top_finish(rows: Tensor, k: int = TOP_K) -> Tensor:
    values, at0 = rows[:, :k].reshape(-1), rows[:, k:].reshape(-1)
    keep = values >= 0
    values, at0 = values[keep], at0[keep]
    best = values.topk(min(k, len(values))).indices
    return at0[best].mean().reshape(1)


# ---- averaged (not decomposable) ----------------------------------------------------------------
def _averaged(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def partial(x: Tensor, *args) -> Tensor:
        return torch.stack([fn(x, *args).to(F64).reshape(()), torch.ones((), dtype=F64, device=x.device)])
    return partial


REDUCTIONS: dict[str, Reduction] = {
    "kurtosis": Reduction(_kurtosis_partial, _kurtosis_finish),
    "kurtosis_centered": Reduction(lambda x: _kurtosis_partial(x, center=True), _kurtosis_finish),
    "mmr": Reduction(_mean_of(_token_ratio), _mean_finish),
    "input_correlation": Reduction(
        _mean_of(lambda x, max_tokens: _sequence_values(x, lambda s: M.input_correlation(s, max_tokens, keep_dims=1))),
        _mean_finish),
    "max_abs": Reduction(_max_partial, _max_finish),
    "seq_max_abs": Reduction(_mean_of(lambda x: _sequence_values(x, lambda s: M.sequence_max_abs(s[:, None], keep_dims=1))),
                             _mean_finish),
    "seq_kurtosis": Reduction(_mean_of(lambda x: _sequence_values(x, lambda s: M.sequence_kurtosis(s[:, None], keep_dims=1))),
                              _mean_finish),
    "token_excess_kurtosis": Reduction(_mean_of(lambda x: M.token_excess_kurtosis(x.detach().reshape(-1, 1, x.shape[-1]), keep_dims=1)),
                                       _mean_finish),
    "int8_outlier_dims": Reduction(_outliers_partial, _fraction_finish),
    "int8_sqnr_db": Reduction(_averaged(M.int8_sqnr_db), _mean_finish),
    "abs_max_median": Reduction(_averaged(M.abs_max_median), _mean_finish),
    "position0_share": Reduction(_top_partial, _top_finish),
    "attention_entropy": Reduction(_per_head_mean_of(_row_entropy), _mean_finish),
    "sink_score": Reduction(_per_head_mean_of(_sink_mass), _mean_finish),
}


def finish(name: str, rows: Tensor) -> list[float]:
    """The metric ``name`` from the ``(R, k)`` partials of every observation on every rank."""
    return REDUCTIONS[name].finish(rows).tolist()
