"""Test the paper's claims (REFERENCE 6) on whatever runs are given.

Each claim compares configurations that differ in one setting only (the block, the optimiser,
the lr, eps, the final norm), seed by seed; a claim with no such pair among the runs is
``untested`` rather than guessed. Outlier size is the mean-over-layers residual-stream kurtosis,
at the end of training and at matched training loss (the step where both runs first reach the
worse run's final smoothed loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import numpy as np

from ofe.analysis.runs import BLOCK_DEFAULTS, Run, at_block_defaults

CLAIMS = {
    "C1": "OFs (kurtosis well above 1, growing) emerge in Pre-LN + AdamW training",
    "C2": "normalised blocks show OFs; OP shows far less at matched loss",
    "C3": "OP without entropy regulation diverges; tanh soft-cap trains but slower",
    "C4": "smaller lr gives smaller OFs",
    "C5": "larger Adam eps gives smaller OFs",
    "C6": "SOAP / rotated AdaFactor give far smaller OFs than AdamW / AdaFactor on the same block",
    "C7": "high kurtosis goes with high input correlation; the final norm makes both worse",
    "C8": "W8A8 perplexity degrades much more for Pre-LN + AdamW than for OP + SOAP",
    "C9": "u4,2 dominates kurtosis growth in Pre-LN; small lr, big eps and SOAP shrink it",
}
NORMALISED = ("pre-ln", "post-ln", "pre-rms", "pre-srms")
FLOOR = 1.0  # kurtosis of perfectly even neurons; effect sizes are ratios of the excess over it


@dataclass
class ClaimResult:
    id: str
    claim: str
    status: str  # "held", "not held", "partly held", "untested"
    evidence: str


def mean_kurtosis(run: Run) -> float:
    return float(np.mean(run.final["kurtosis"]))


def _ok(run: Run) -> bool:
    return run.diverged is None


def _status(agree: list[bool]) -> str:
    return "held" if all(agree) else ("not held" if not any(agree) else "partly held")


def _of(runs: list[Run], block: str, optimizer: str) -> list[Run]:
    """The trained runs of one block and optimiser."""
    return [r for r in runs if _ok(r) and r.settings.get("model.block") == block and r.settings.get("optim.name") == optimizer]


Keys = str | tuple[str, ...]


def _value(run: Run, keys: Keys) -> Any:
    return run.settings.get(keys) if isinstance(keys, str) else tuple(run.settings.get(k) for k in keys)


def _comparable(ra: Run, rb: Run, keys: Keys) -> bool:
    """Both trained, the same seed, and the same settings except ``keys``. Blocks are compared as each
    is defined: when the block is one of ``keys``, both runs must use their block's defaults for
    QK-norm, beta and the norms, and those settings are not compared."""
    varied = {keys} if isinstance(keys, str) else set(keys)
    by_block = "model.block" in varied
    skip = varied | (BLOCK_DEFAULTS if by_block else set())
    if rb is ra or not (_ok(ra) and _ok(rb)) or ra.seed != rb.seed:
        return False
    if by_block and not (at_block_defaults(ra) and at_block_defaults(rb)):
        return False
    return {k: v for k, v in ra.settings.items() if k not in skip} == {k: v for k, v in rb.settings.items() if k not in skip}


def _pairs(runs: list[Run], keys: Keys, a: Callable[[Any], bool], b: Callable[[Any], bool]) -> list[tuple[Run, Run]]:
    """(run_a, run_b) that are :func:`_comparable` in ``keys`` with ``a(value_a)`` and ``b(value_b)``."""
    return [(ra, rb) for ra in runs if a(_value(ra, keys)) for rb in runs
            if b(_value(rb, keys)) and _comparable(ra, rb, keys)]


def _matched(ra: Run, rb: Run) -> tuple[float | None, float | None]:
    target = max(ra.final_train_loss(), rb.final_train_loss())
    return ra.kurtosis_at_loss(target), rb.kurtosis_at_loss(target)


def _compare(pairs: list[tuple[Run, Run]], what: str, matched: bool = True) -> tuple[str, str]:
    """Status and evidence for "a has larger kurtosis than b", seed by seed."""
    if not pairs:
        return "untested", "no pair of runs differing only in this setting"
    lines, wins = [], []
    for ra, rb in pairs:
        ka, kb = mean_kurtosis(ra), mean_kurtosis(rb)
        ok = ka > kb
        text = f"{ra.label} vs {rb.label}, seed {ra.seed}: final {ka:.2f} vs {kb:.2f}"
        if matched:
            ma, mb = _matched(ra, rb)
            if ma is not None and mb is not None:
                text += f", at matched loss {ma:.2f} vs {mb:.2f}"
                ok = ok and ma > mb
        wins.append(ok)
        lines.append(text)
    ratio = np.mean([(mean_kurtosis(a) - FLOOR) / max(mean_kurtosis(b) - FLOOR, 1e-3) for a, b in pairs])
    return _status(wins), f"{what}: {sum(wins)}/{len(wins)} pairs; mean excess-kurtosis ratio {ratio:.1f}x. " + "; ".join(lines)


def claim_c1(runs: list[Run]) -> tuple[str, str]:
    """Judged on the reference Pre-LN + AdamW configuration (the one labelled without departures,
    else the one with most runs); other Pre-LN + AdamW configurations are listed as context."""
    chosen = _of(runs, "pre-ln", "adamw")
    if not chosen:
        return "untested", "no Pre-LN + AdamW run"
    labels = [r.label for r in chosen]
    reference = "pre-ln + adamw" if "pre-ln + adamw" in labels else max(dict.fromkeys(labels), key=labels.count)
    lines, held = [], []
    for r in chosen:
        _, k = r.kurtosis_curve()
        start, peak, end = k[0].mean(), k.mean(1).max(), k[-1].mean()
        if r.label == reference:
            held.append(peak >= 3.0 and end >= 2.0 * start)
        lines.append(f"{r.label} seed {r.seed}: {start:.2f} -> peak {peak:.2f} -> final {end:.2f}")
    return _status(held), (f"mean-over-layers kurtosis at step 0, its peak, and at the end; judged on '{reference}' "
                    f"(held: peak >= 3 and final >= 2x start in every seed): " + "; ".join(lines))


def claim_c2(runs: list[Run]) -> tuple[str, str]:
    return _compare(_pairs(runs, "model.block", lambda v: v in NORMALISED, lambda v: v == "op"), "normalised block vs OP")


def claim_c3(runs: list[Run]) -> tuple[str, str]:
    op = [r for r in runs if r.settings.get("model.block") == "op"]
    bare = [r for r in op if r.settings.get("model.qk_norm") == "none" and not r.settings.get("model.attn_softcap")]
    capped = [r for r in op if r.settings.get("model.qk_norm") == "none" and r.settings.get("model.attn_softcap")]
    if not bare:
        return "untested", "no OP run without QK-norm and soft-cap"
    diverged = [r for r in bare if r.diverged]
    parts = [f"OP without QK-norm or soft-cap: {len(diverged)}/{len(bare)} runs diverged"]
    held = len(diverged) == len(bare)
    regulation = ("model.qk_norm", "model.attn_softcap")

    def qk_normed_twin(run: Run) -> Run | None:  # the same seed and otherwise the same settings
        return next((q for q in op if q.settings.get("model.qk_norm") not in (None, "none")
                     and _comparable(run, q, regulation)), None)

    def min_entropy(run: Run) -> float | None:
        values = run.final.get("attention_entropy_min") if run.monitored else None
        return min(values) if values else None

    for r in bare:
        ref = qk_normed_twin(r)
        if ref and min_entropy(r) is not None and min_entropy(ref) is not None:
            parts.append(f"seed {r.seed} lr {r.settings.get('optim.lr'):g} trained: val loss {r.val_loss():.3f} vs QK-norm "
                         f"{ref.val_loss():.3f}, lowest head entropy {min_entropy(r):.2f} vs {min_entropy(ref):.2f} nats")

    for r in capped:
        if r.diverged:
            parts.append(f"soft-capped seed {r.seed} diverged")
            held = False
        elif ref := qk_normed_twin(r):
            held = held and r.val_loss() > ref.val_loss()  # slower than QK-norm
            parts.append(f"soft-capped seed {r.seed} val loss {r.val_loss():.3f} vs QK-norm {ref.val_loss():.3f}")
    status = "held" if held else ("partly held" if diverged else "not held")
    return status, "; ".join(parts)


def claim_c4(runs: list[Run]) -> tuple[str, str]:
    pairs = _pairs(runs, "optim.lr", lambda v: True, lambda v: True)
    pairs = [(a, b) for a, b in pairs if a.settings["optim.lr"] > b.settings["optim.lr"]]
    return _compare(pairs, "larger lr vs smaller lr", matched=False)


def claim_c5(runs: list[Run]) -> tuple[str, str]:
    return _compare([(a, b) for a, b in _pairs(runs, "optim.eps", lambda v: True, lambda v: True)
                     if a.settings["optim.eps"] < b.settings["optim.eps"]], "smaller eps vs larger eps", matched=False)


def claim_c6(runs: list[Run]) -> tuple[str, str]:
    pairs = _pairs(runs, "optim.name", lambda v: v == "adamw", lambda v: v == "soap")
    pairs += _pairs(runs, "optim.name", lambda v: v == "adafactor", lambda v: v == "rotated-adafactor")
    return _compare(pairs, "diagonal vs rotated optimiser")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def claim_c7(runs: list[Run]) -> tuple[str, str]:
    points = [(c, k) for r in runs if _ok(r) and "input_correlation" in r.final
              for c, k in zip(r.final["input_correlation"], r.final["kurtosis"])]
    if len(points) < 4:
        return "untested", "too few (run, layer) points"
    corr, kurt = map(np.array, zip(*points))
    rho = spearman(corr, kurt)
    status, text = ("held" if rho >= 0.5 else "not held"), f"Spearman rho(input correlation, kurtosis) over {len(points)} final (run, layer) points = {rho:.2f} (held: >= 0.5)"
    norm_pairs = _pairs(runs, "model.final_norm", lambda v: v is True, lambda v: v is False)
    if norm_pairs:
        s2, t2 = _compare(norm_pairs, "with vs without final norm", matched=False)
        text += f". Final norm: {t2}"
        status = status if s2 == "held" else "partly held"
    else:
        text += ". Final-norm part untested (no pair of runs differing only in model.final_norm)"
        status = "partly held" if status == "held" else status
    return status, text


def _residual_sqnr(run: Run) -> float | None:
    """Mean over layers of the W8A8 model's residual-stream SQNR (dB), from its quantisation result."""
    layers = (run.quant or {}).get("layers") or []
    return float(np.mean([row["sqnr_db"] for row in layers])) if layers else None


def claim_c8(runs: list[Run]) -> tuple[str, str]:
    quantised = [r for r in runs if r.quant is not None]
    pairs = _pairs(quantised, ("model.block", "optim.name"), lambda v: v == ("pre-ln", "adamw"), lambda v: v == ("op", "soap"))
    if not pairs:
        return "untested", "no quantised Pre-LN + AdamW and OP + SOAP runs with the same seed and other settings"
    lines, wins = [], []
    for a, b in pairs:
        w8a, w8b = a.quant_increase("W8A8"), b.quant_increase("W8A8")
        w4a, w4b = a.quant_increase("W8A4"), b.quant_increase("W8A4")
        wins.append(w8a is not None and w8b is not None and w8a > w8b)
        line = f"seed {a.seed}: W8A8 +{w8a:.2f}% vs +{w8b:.2f}%"
        if w4a is not None and w4b is not None:
            line += f", W8A4 +{w4a:.1f}% vs +{w4b:.1f}%"
        sa, sb = _residual_sqnr(a), _residual_sqnr(b)
        if sa is not None and sb is not None:
            line += f", residual-stream W8A8 SQNR {sa:.1f} vs {sb:.1f} dB"
        lines.append(line)
    return _status(wins), "perplexity increase, Pre-LN + AdamW vs OP + SOAP: " + "; ".join(lines)


U4 = ("u4_1", "u4_2", "u4_3", "u4_4")


def _u4_terms(run: Run) -> dict[str, float] | None:
    """Cumulative contribution of each u4 term to the kurtosis change over training, mean over layers."""
    steps, cum = run.decomposition
    if not steps.size:
        return None
    return {k: float(cum[k][-1].mean()) for k in U4}


def _u4_2_dominates(terms: dict[str, float]) -> bool:
    """u4,2 drives growth (positive) and no other u4 term is larger in magnitude, of either sign."""
    return terms["u4_2"] > 0 and all(abs(terms["u4_2"]) >= abs(terms[k]) for k in U4 if k != "u4_2")


def _describe(terms: dict[str, float]) -> str:
    rival = max((k for k in U4 if k != "u4_2"), key=lambda k: abs(terms[k]))
    return f"u4,2 {terms['u4_2']:+.1f}, largest other {rival.replace('_', ',')} {terms[rival]:+.1f}"


def claim_c9(runs: list[Run]) -> tuple[str, str]:
    """Rule: u4,2 dominates a run when it is positive and at least as large in magnitude as every
    other u4 term (cumulative contribution to the kurtosis change, mean over layers). Held when it
    dominates in every Pre-LN + AdamW run and SOAP, a smaller lr and a larger eps each shrink it in
    every pair that isolates them; partly held when some of these hold; not held when none does."""
    pre = [(r, t) for r in _of(runs, "pre-ln", "adamw") if (t := _u4_terms(r)) is not None]
    if not pre:
        return "untested", "no Pre-LN + AdamW run with kurtosis_update records"
    dominant = [_u4_2_dominates(t) for _, t in pre]
    parts = [f"u4,2 dominates (positive, largest in magnitude) in {sum(dominant)}/{len(dominant)} Pre-LN + AdamW "
             f"runs ({'; '.join(f'seed {r.seed}: {_describe(t)}' for r, t in pre)})"]
    op = [(r, t) for r in _of(runs, "op", "adamw") if (t := _u4_terms(r)) is not None]
    if op:
        parts.append(f"OP + AdamW for comparison: {'; '.join(f'seed {r.seed}: {_describe(t)}' for r, t in op)}")
    checks: list[bool] = []
    comparisons = (("SOAP", "optim.name", lambda a, b: a == "adamw" and b == "soap"),
                   ("smaller lr", "optim.lr", lambda a, b: a > b),
                   ("larger eps", "optim.eps", lambda a, b: a < b))
    for name, key, order in comparisons:
        results = []
        for ra, rb in _pairs(runs, key, lambda v: True, lambda v: True):
            if ra.settings.get("model.block") != "pre-ln" or not order(ra.settings[key], rb.settings[key]):
                continue
            ta, tb = _u4_terms(ra), _u4_terms(rb)
            if ta and tb:
                results.append((tb["u4_2"] < ta["u4_2"], f"{tb['u4_2']:+.1f} vs {ta['u4_2']:+.1f}"))
        if results:
            checks += [ok for ok, _ in results]
            parts.append(f"{name} shrinks u4,2 in {sum(ok for ok, _ in results)}/{len(results)} pairs "
                         f"({', '.join(t for _, t in results)})")
    parts.append("values: cumulative kurtosis change from each term, mean over layers")
    ok = all(dominant) and checks and all(checks)
    status = "held" if ok else ("partly held" if any(dominant) or any(checks) else "not held")
    return status, "; ".join(parts)


CHECKS = {"C1": claim_c1, "C2": claim_c2, "C3": claim_c3, "C4": claim_c4, "C5": claim_c5,
          "C6": claim_c6, "C7": claim_c7, "C8": claim_c8, "C9": claim_c9}


def evaluate_claims(runs: list[Run]) -> list[ClaimResult]:
    return [ClaimResult(cid, CLAIMS[cid], *CHECKS[cid](runs)) for cid in CHECKS]


def format_claims(results: list[ClaimResult]) -> str:
    lines = [f"{'claim':<6} {'status':<12} statement"]
    for r in results:
        lines.append(f"{r.id:<6} {r.status:<12} {r.claim}")
    return "\n".join(lines)
