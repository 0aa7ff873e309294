"""Outlier-feature metrics: pure functions on activation tensors.

Conventions shared by every function here:

* An activation tensor has shape ``(..., d)``: the last dim is the width (neurons), every
  leading dim indexes inputs (batch, tokens). ``keep_dims=k`` keeps the first ``k`` leading
  dims as independent groups (e.g. stacked layers ``(L, B, T, d)`` with ``keep_dims=1`` gives
  one value per layer) and reduces over the rest.
* Computation is in float32, or float64 when the input is float64, whatever the input dtype.
  Inputs are rescaled by their maximum magnitude before any power is taken, so bf16/fp16
  activations of any size cannot overflow.
* Results are tensors on the input's device. Nothing calls ``.item()`` or otherwise syncs with
  the host, so the functions can run inside a training step.
* Degenerate inputs: an empty tensor, or too few tokens for a pairwise statistic, raises
  ``ValueError`` (a shape check, no sync). Inputs whose value is undefined give NaN, never a
  finite wrong number: an all-zero input (no signal), any NaN or inf element. Documented
  per function where a statistic has its own undefined cases.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "kurtosis",
    "max_median_ratio",
    "input_correlation",
    "attention_entropy",
    "max_abs",
    "abs_max_median",
    "top_positions",
    "position0_share",
    "sink_score",
    "sequence_max_abs",
    "sequence_kurtosis",
    "int8_token_frac",
    "int8_outlier_dims",
    "outlier_dims_from_token_frac",
    "kurtosis_update_terms",
]


def _to_float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check(x: Tensor, keep_dims: int, min_dims: int, name: str) -> None:
    if x.dim() < keep_dims + min_dims:
        raise ValueError(
            f"{name}: expected at least {keep_dims + min_dims} dims (keep_dims={keep_dims}), got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name}: empty input of shape {tuple(x.shape)}")


def _rows(x: Tensor, keep_dims: int, name: str) -> Tensor:
    """Reshape ``(*G, ..., d)`` to float ``(*G, n, d)``: ``n`` inputs of width ``d``."""
    _check(x, keep_dims, 1, name)
    x = _to_float(x)
    return x.reshape(*x.shape[:keep_dims], -1, x.shape[-1])


def _normalise_max(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Divide by the max magnitude over ``dims``: values land in [-1, 1]; zeros/inf/NaN give NaN."""
    return x / x.abs().amax(dim=dims, keepdim=True)


def kurtosis(x: Tensor, center: bool = False, keep_dims: int = 0) -> Tensor:
    """Kurtosis of the neuron RMS values (paper Eq. 1).

    With ``s_j = sqrt(mean_i x_ij^2)`` the RMS of neuron ``j`` over all ``n`` inputs,
    ``Kurt = mean_j(s_j^4) / mean_j(s_j^2)^2``. It lies in ``[1, d]``: 1 when every neuron has
    the same RMS, ``d`` when one neuron carries all the signal. Invariant to a global scale and
    to permuting neurons.

    Args:
        x: activations ``(..., d)``.
        center: subtract each input's mean over the width first (the authors' code option).
        keep_dims: leading dims kept as groups.
    Returns:
        float tensor of shape ``x.shape[:keep_dims]``. NaN for an all-zero input or any
        non-finite element.
    """
    x = _rows(x, keep_dims, "kurtosis")
    if center:
        x = x - x.mean(-1, keepdim=True)
    x = _normalise_max(x, (-2, -1))
    s2 = x.square().mean(-2)  # (*G, d): squared neuron RMS
    r = s2 / s2.mean(-1, keepdim=True)
    return r.square().mean(-1)


def _median_last(a: Tensor) -> Tensor:
    """Median over the last dim, averaging the two middle values when the size is even (NumPy's).

    One selection (``torch.median`` gives the lower middle value) plus an O(d) pass for the upper
    middle value: about 3x faster than a full sort on CPU.
    """
    d = a.shape[-1]
    lower = a.median(dim=-1, keepdim=True).values
    if d % 2:
        return lower.squeeze(-1)
    # The upper middle value is `lower` itself if it occurs at rank d/2 + 1 too, else the next larger value.
    at_most = (a <= lower).sum(-1, keepdim=True)
    above = a.masked_fill(a <= lower, float("inf")).amin(-1, keepdim=True)
    upper = torch.where(at_most > d // 2, lower, above)
    return (0.5 * (lower + upper)).squeeze(-1)


def _evenly_spaced(n: int, k: int, device: torch.device) -> Tensor:
    """``k`` distinct indices spread evenly over ``range(n)`` (first and last included)."""
    return torch.linspace(0, n - 1, k, device=device).round().long()


def max_median_ratio(x: Tensor, keep_dims: int = 0, max_rows: int | None = None) -> Tensor:
    """Mean over inputs of ``max_j |x_ij| / median_j |x_ij|`` (median as in NumPy).

    Args:
        x: activations ``(..., d)``.
        keep_dims: leading dims kept as groups.
        max_rows: if set and there are more inputs, average over this many evenly spaced inputs
            (deterministic): the median is the one super-linear step, so this bounds the cost.
    Returns:
        float tensor of shape ``x.shape[:keep_dims]``. An input whose median magnitude is zero
        (e.g. a ReLU output with most units off) contributes inf, so the mean is inf; an all-zero
        input contributes NaN. Both are honest: the ratio is unbounded or undefined there.
    """
    x = _rows(x, keep_dims, "max_median_ratio")
    if max_rows is not None and x.shape[-2] > max_rows:
        if max_rows < 1:
            raise ValueError(f"max_median_ratio: max_rows must be >= 1, got {max_rows}")
        x = x.index_select(-2, _evenly_spaced(x.shape[-2], max_rows, x.device))
    x = x.abs()
    ratio = x.amax(-1) / _median_last(x)
    return ratio.mean(-1)


def input_correlation(x: Tensor, max_tokens: int | None = None, keep_dims: int = 0) -> Tensor:
    """Mean off-diagonal cosine similarity between the token representations of each sequence.

    For a sequence with unit-normalised tokens ``u_1..u_T`` this is
    ``sum_{s != t} <u_s, u_t> / (T (T - 1))``, computed in O(T d) as
    ``(||sum_t u_t||^2 - T) / (T (T - 1))``. 1 when all tokens point the same way (rank
    collapse), 0 for mutually orthogonal tokens.

    Args:
        x: ``(..., T, d)``; every dim before ``T`` (after the kept ones) indexes sequences.
        max_tokens: if set and ``T > max_tokens``, use ``max_tokens`` evenly spaced positions
            (deterministic), bounding the cost.
        keep_dims: leading dims kept as groups.
    Returns:
        the mean over sequences, shape ``x.shape[:keep_dims]``. NaN if any token is all zeros
        (its direction is undefined) or non-finite.
    """
    _check(x, keep_dims, 2, "input_correlation")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"input_correlation: max_tokens must be >= 2, got {max_tokens}")
    x = _to_float(x)
    T = x.shape[-2]
    if T < 2:
        raise ValueError(f"input_correlation: needs at least 2 tokens per sequence, got shape {tuple(x.shape)}")
    if max_tokens is not None and T > max_tokens:
        x = x.index_select(-2, _evenly_spaced(T, max_tokens, x.device))
        T = max_tokens
    x = x.reshape(*x.shape[:keep_dims], -1, T, x.shape[-1])
    x = _normalise_max(x, (-1,))
    u = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    total = u.sum(-2).square().sum(-1)  # ||sum_t u_t||^2, shape (*G, S)
    return ((total - T) / (T * (T - 1))).mean(-1)


def attention_entropy(probs: Tensor, keep_dims: int = 0) -> Tensor:
    """Per-head attention entropy in nats: mean over queries (and batch) of each row's entropy.

    Args:
        probs: attention probabilities ``(..., H, T_q, T_k)``, rows summing to 1 (e.g.
            ``(B, H, T, T)``); zero entries (causal mask) contribute 0.
        keep_dims: leading dims kept as groups.
    Returns:
        ``(*kept, H)``. A uniform row over ``T_k`` keys has entropy ``log T_k``.
    """
    _check(probs, keep_dims, 3, "attention_entropy")
    p = _to_float(probs)
    row_entropy = -torch.special.xlogy(p, p).sum(-1)  # (..., H, T_q)
    per_head = row_entropy.mean(-1)  # (..., H)
    H = per_head.shape[-1]
    return per_head.reshape(*per_head.shape[:keep_dims], -1, H).mean(-2)


def max_abs(x: Tensor, keep_dims: int = 0) -> Tensor:
    """Largest magnitude (inf-norm) over everything but the kept dims; float tensor ``x.shape[:keep_dims]``."""
    _check(x, keep_dims, 1, "max_abs")
    x = _to_float(x)
    return x.abs().reshape(*x.shape[:keep_dims], -1).amax(-1)


def abs_max_median(x: Tensor, max_elements: int | None = 1 << 22) -> Tensor:
    """The largest ``|x|`` over all entries divided by the median ``|x|`` over all entries: how far
    the single biggest activation stands above a typical one (massive activations give 10^2-10^4).

    Unlike :func:`max_median_ratio` (a per-token ratio, averaged) this is one global ratio. The max is
    exact; the median is taken over at most ``max_elements`` evenly spaced entries (None: all; exact
    for inputs up to that size). Returns a float scalar; inf if the median is zero, NaN if all zero.
    """
    _check(x, 0, 1, "abs_max_median")
    a = _to_float(x).abs().reshape(-1)
    top = a.amax()
    if max_elements is not None and a.numel() > max_elements:
        a = a.index_select(0, _evenly_spaced(a.numel(), max_elements, a.device))
    return top / _median_last(a)


def top_positions(x: Tensor, k: int = 50) -> Tensor:
    """Sequence positions of the ``k`` largest ``|x|`` entries of ``x`` ``(B, T, d)``: int64 ``(k,)``
    (fewer if ``x`` has fewer entries), largest first."""
    _check(x, 0, 3, "top_positions")
    B, T, d = x.shape[-3:]
    flat = _to_float(x).abs().reshape(-1, T * d)  # (B', T * d)
    k = min(k, flat.numel())
    idx = flat.reshape(-1).topk(k).indices
    return (idx % (T * d)) // d


def position0_share(x: Tensor, k: int = 50) -> Tensor:
    """Fraction of the ``k`` largest ``|x|`` entries of ``(B, T, d)`` that sit at position 0: 1/T when
    outliers are spread over tokens, near 1 when they form on the first token (massive activations
    and attention sinks do). Float scalar."""
    return (top_positions(x, k) == 0).float().mean()


def sink_score(probs: Tensor) -> Tensor:
    """Per head, the attention mass that queries after the first put on key 0, averaged over those
    queries and the batch: ``(..., H, T, T)`` -> ``(H,)``. ``1/(t+1)`` on average for uniform causal
    attention; near 1 for an attention sink."""
    _check(probs, 0, 3, "sink_score")
    p = _to_float(probs)
    if p.shape[-2] < 2:
        raise ValueError(f"sink_score: needs at least 2 queries, got shape {tuple(p.shape)}")
    mass = p[..., 1:, 0]  # (..., H, T - 1)
    H = mass.shape[-2]
    return mass.mean(-1).reshape(-1, H).mean(0)


def _sequences(x: Tensor, keep_dims: int, name: str) -> Tensor:
    """Reshape ``(*G, ..., T, d)`` to float ``(*G, S, T * d)``: S sequences, each flattened."""
    _check(x, keep_dims, 2, name)
    x = _to_float(x)
    return x.reshape(*x.shape[:keep_dims], -1, x.shape[-2] * x.shape[-1])


def sequence_max_abs(x: Tensor, keep_dims: int = 0) -> Tensor:
    """Mean over sequences of each sequence's max |x| (Bondarenko et al.'s average inf-norm).

    ``x`` is ``(..., T, d)``; returns ``x.shape[:keep_dims]``.
    """
    return _sequences(x, keep_dims, "sequence_max_abs").abs().amax(-1).mean(-1)


def sequence_kurtosis(x: Tensor, keep_dims: int = 0) -> Tensor:
    """Mean over sequences of the Pearson kurtosis ``mu4 / sigma^4`` of each sequence's T*d values.

    This is Bondarenko et al.'s "kurtosis" (about 3 for Gaussian values), a different statistic
    from :func:`kurtosis`. ``x`` is ``(..., T, d)``; returns ``x.shape[:keep_dims]``. NaN when a
    sequence is constant (sigma = 0) or non-finite.
    """
    v = _sequences(x, keep_dims, "sequence_kurtosis")
    v = v - v.mean(-1, keepdim=True)
    v = _normalise_max(v, (-1,))
    m2 = v.square().mean(-1)
    m4 = v.square().square().mean(-1)
    return (m4 / m2.square()).mean(-1)


def token_excess_kurtosis(x: Tensor, keep_dims: int = 0) -> Tensor:
    """Mean over tokens of each token's excess kurtosis across the width, clamped at 0 (OSP's metric,
    Park et al. 2025, arXiv 2506.19697): ``max(0, mu4 / sigma^4 - 3)`` of the ``d`` values of a row.

    About 0 for Gaussian rows, large when a few channels of a token dominate it (massive activations).
    A third meaning of "kurtosis" (beside :func:`kurtosis`, the paper's Eq. 1, and
    :func:`sequence_kurtosis`, Bondarenko et al.'s). ``x`` is ``(..., d)``; returns
    ``x.shape[:keep_dims]``. Rows with zero variance are left out; NaN when every row is constant.
    """
    v = _rows(x, keep_dims, "token_excess_kurtosis")
    v = v - v.mean(-1, keepdim=True)
    v = _normalise_max(v, (-1,))
    m2 = v.square().mean(-1)
    m4 = v.square().square().mean(-1)
    excess = (m4 / m2.square() - 3.0).clamp(min=0.0)
    return excess.nanmean(-1)


def int8_sqnr_db(x: Tensor, bits: int = 8, keep_dims: int = 0) -> Tensor:
    """How well one scale of ``bits``-bit integers holds the whole tensor: the signal-to-quantisation-noise
    ratio in dB, ``10 log10(sum x^2 / sum (x - q(x))^2)``, with ``q`` symmetric round-to-nearest on the
    grid ``max|x| / (2^(bits-1) - 1)`` (one per-tensor scale from the tensor's own range, as a W8A8
    activation quantiser calibrated on it would use).

    About 40 dB for Gaussian values at 8 bits; each doubling of the largest |x| relative to the
    bulk costs about 6 dB, so it falls as massive activations grow: quantisability, watched during
    training. It weighs errors by energy: an outlier channel that carries most of the tensor's energy
    hides what the rounding does to the other channels (read it beside the kurtosis). ``x`` is
    ``(..., d)``; returns ``x.shape[:keep_dims]``; inf for an exactly representable tensor, NaN for an
    all-zero or non-finite one.
    """
    v = _rows(x, keep_dims, "int8_sqnr_db").flatten(-2)
    levels = 2 ** (bits - 1) - 1
    scale = v.abs().amax(-1, keepdim=True) / levels
    noise = v - (v / scale).round().clamp(-levels, levels) * scale
    return 10 * torch.log10(v.square().sum(-1) / noise.square().sum(-1))


def int8_token_frac(x: Tensor, threshold: float = 6.0) -> Tensor:
    """Per dimension, the fraction of token positions with ``|x_ij| >= threshold``: float ``(d,)``
    for one layer's activations ``(..., d)``. The per-layer input of :func:`int8_outlier_dims`."""
    x = _rows(x, 0, "int8_token_frac")
    return (x.abs() >= threshold).float().mean(-2)


def int8_outlier_dims(
    layers: Tensor | list[Tensor],
    threshold: float = 6.0,
    min_layer_frac: float = 0.25,
    min_token_frac: float = 0.06,
) -> Tensor:
    """LLM.int8() outlier feature dimensions (Dettmers et al. 2022).

    A dimension ``j`` is affected in a layer when ``|x_ij| >= threshold`` for at least
    ``min_token_frac`` of that layer's token positions; it is an outlier dimension when affected
    in at least ``min_layer_frac`` of the layers.

    Args:
        layers: hidden states of every layer, stacked ``(L, ..., d)`` or a list of ``(..., d)``.
    Returns:
        bool mask of shape ``(d,)``; ``.sum()`` is the outlier-dimension count.
    """
    if isinstance(layers, Tensor):
        _check(layers, 1, 1, "int8_outlier_dims")
    token_frac = torch.stack([int8_token_frac(x, threshold) for x in layers])
    return outlier_dims_from_token_frac(token_frac, min_layer_frac, min_token_frac)


def outlier_dims_from_token_frac(
    token_frac: Tensor, min_layer_frac: float = 0.25, min_token_frac: float = 0.06
) -> Tensor:
    """The ``(d,)`` outlier mask from per-layer token fractions ``(L, d)`` (:func:`int8_token_frac`)."""
    affected = (token_frac >= min_token_frac).float()
    return affected.mean(0) >= min_layer_frac


def kurtosis_update_terms(x: Tensor, x_new: Tensor) -> dict[str, Tensor]:
    """Decompose the change of Eq. 1's moments between activations ``x`` and ``x_new`` (REFERENCE 4).

    With ``dX = x_new - x`` on the same ``n`` inputs and, per neuron ``j``,
    ``a_j = (2/n) sum_i X_ij dX_ij``, ``b_j = (1/n) sum_i dX_ij^2``, ``s_j^2`` the squared RMS:

    * ``mean(s_new^2) = mean(s^2) + u2_1 + u2_2`` with ``u2_1 = mean(a)``, ``u2_2 = mean(b)``;
    * ``mean(s_new^4) = mean(s^4) + u4_1 + u4_2 + u4_3 + u4_4`` with ``u4_1 = mean(2 s^2 a)``,
      ``u4_2 = mean(2 s^2 b + a^2)``, ``u4_3 = mean(2 a b)``, ``u4_4 = mean(b^2)``.

    So ``Kurt(x_new) = (m4 + sum u4) / (m2 + sum u2)^2`` exactly. The terms are returned unnormalised
    (units of activation^2 and ^4; the paper's normalisation is OPEN), together with ``m2 = mean(s^2)``
    and ``m4 = mean(s^4)`` of ``x``, all computed in float64. ``x`` and ``x_new``: ``(..., d)``, same shape.
    """
    if x.shape != x_new.shape:
        raise ValueError(f"kurtosis_update_terms: shapes differ, {tuple(x.shape)} vs {tuple(x_new.shape)}")
    x = _rows(x, 0, "kurtosis_update_terms").double()
    dx = x_new.reshape(x.shape).double() - x
    s2 = x.square().mean(0)
    a = 2.0 * (x * dx).mean(0)
    b = dx.square().mean(0)
    return {
        "m2": s2.mean(), "m4": s2.square().mean(),
        "u2_1": a.mean(), "u2_2": b.mean(),
        "u4_1": (2.0 * s2 * a).mean(), "u4_2": (2.0 * s2 * b + a.square()).mean(),
        "u4_3": (2.0 * a * b).mean(), "u4_4": b.square().mean(),
    }
