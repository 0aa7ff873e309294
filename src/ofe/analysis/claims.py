"""Test the paper's claims (REFERENCE 6) on whatever runs are given.

Each claim compares configurations that differ in one setting only (the block, the optimiser,
the lr, eps, the final norm), seed by seed; a claim with no such pair among the runs is
``untested`` rather than guessed. Outlier size is the mean-over-layers residual-stream kurtosis,
at the end of training and at matched training loss (the step where both runs first reach the
worse run's final smoothed loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

import numpy as np

from ofe.analysis.fair import LR, at_tuned_lr, matched_point
from ofe.analysis.runs import BLOCK_DEFAULTS, Run, at_block_defaults
from ofe.models import BLOCKS

NORMALISED = tuple(name for name, spec in BLOCKS.items() if spec.normalised)  # the paper's "normalised blocks"
FLOOR = 1.0  # kurtosis of perfectly even neurons; effect sizes are ratios of the excess over it


C8_RATIO = 2.0  # "much more": Pre-LN + AdamW's W8A8 cost at least this many times OP + SOAP's
# "degrades": a W8A8 cost under this (% perplexity) counts as quantising well (issue 12's bar for OP + SOAP),
# so a ratio of two noise-level costs (e.g. +0.08% vs +0.02%) is no evidence either way
C8_MIN_PCT = 0.3
@dataclass
class ClaimResult:
    id: str
    claim: str
    status: str  # "held", "not held", "partly held", "untested"
    evidence: str
    rule: str = ""
    data: list[dict[str, Any]] = field(default_factory=list)  # the numbers behind the verdict, per seed / pair
    rule_version: int = 0  # the version of the rule that decided it (Claim.version)


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
# A check's answer: status, evidence, and optionally the numbers behind it (claims.json's "data").
Verdict = tuple[str, str] | tuple[str, str, list[dict[str, Any]]]


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


def _compare(pairs: list[tuple[Run, Run]], what: str, matched: bool = True) -> tuple[str, str, list[dict[str, Any]]]:
    """Status, evidence and per-pair numbers for "a has larger kurtosis than b", seed by seed."""
    if not pairs:
        return "untested", "no pair of runs differing only in this setting", []
    lines, wins, data = [], [], []
    for ra, rb in pairs:
        ka, kb = mean_kurtosis(ra), mean_kurtosis(rb)
        ok = ka > kb
        row: dict[str, Any] = {"a": ra.label, "b": rb.label, "seed": ra.seed, "lr_a": ra.settings.get(LR),
                               "lr_b": rb.settings.get(LR), "final_kurtosis_a": ka, "final_kurtosis_b": kb}
        text = f"{ra.label} vs {rb.label}, seed {ra.seed}: final {ka:.2f} vs {kb:.2f}"
        if matched:
            ma, mb = _matched(ra, rb)
            if ma is not None and mb is not None:
                text += f", at matched loss {ma:.2f} vs {mb:.2f}"
                row.update(matched_kurtosis_a=ma, matched_kurtosis_b=mb)
                ok = ok and ma > mb
        row["agrees"] = ok
        wins.append(ok)
        lines.append(text)
        data.append(row)
    ratio = np.mean([(mean_kurtosis(a) - FLOOR) / max(mean_kurtosis(b) - FLOOR, 1e-3) for a, b in pairs])
    return (_status(wins), f"{what}: {sum(wins)}/{len(wins)} pairs; mean excess-kurtosis ratio {ratio:.1f}x. "
            + "; ".join(lines), data)


def claim_c1(runs: list[Run]) -> Verdict:
    """Judged on the reference Pre-LN + AdamW configuration at its tuned lr (the one labelled without
    departures, else the one with most runs); other Pre-LN + AdamW runs are listed as context."""
    every = _of(runs, "pre-ln", "adamw")
    tuned = {id(r) for r in at_tuned_lr(every)}
    chosen = [r for r in every if id(r) in tuned] + [r for r in every if id(r) not in tuned]
    if not chosen:
        return "untested", "no Pre-LN + AdamW run"
    labels = [r.label for r in chosen if id(r) in tuned]
    reference = "pre-ln + adamw" if "pre-ln + adamw" in labels else max(dict.fromkeys(labels), key=labels.count)
    lines, held, data = [], [], []
    for r in chosen:
        _, k = r.kurtosis_curve()
        start, peak, end = float(k[0].mean()), float(k.mean(1).max()), float(k[-1].mean())
        row = {"configuration": r.label, "seed": r.seed, "judged": r.label == reference, "start": start, "peak": peak,
               "final": end, "final_max_layer": float(k[-1].max())}
        if r.label == reference:
            row["agrees"] = peak >= 3.0 and end >= 2.0 * start
            held.append(row["agrees"])
        lines.append(f"{r.label} seed {r.seed}: {start:.2f} -> peak {peak:.2f} -> final {end:.2f}")
        data.append(row)
    return _status(held), (f"mean-over-layers kurtosis at step 0, its peak, and at the end; judged on '{reference}' "
                    f"(held: peak >= 3 and final >= 2x start in every seed): " + "; ".join(lines)), data


def claim_c2(runs: list[Run]) -> Verdict:
    pairs = _pairs(at_tuned_lr(runs), ("model.block", LR), lambda v: v[0] in NORMALISED, lambda v: v[0] == "op")
    return _compare(pairs, "normalised block vs OP, each at its tuned lr")


def claim_c3(runs: list[Run]) -> Verdict:
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


def claim_c4(runs: list[Run]) -> Verdict:
    pairs = _pairs(runs, "optim.lr", lambda v: True, lambda v: True)
    pairs = [(a, b) for a, b in pairs if a.settings["optim.lr"] > b.settings["optim.lr"]]
    return _compare(pairs, "larger lr vs smaller lr", matched=False)


def claim_c5(runs: list[Run]) -> Verdict:
    return _compare([(a, b) for a, b in _pairs(runs, "optim.eps", lambda v: True, lambda v: True)
                     if a.settings["optim.eps"] < b.settings["optim.eps"]], "smaller eps vs larger eps", matched=False)


def claim_c6(runs: list[Run]) -> Verdict:
    tuned, keys = at_tuned_lr(runs), ("optim.name", LR)
    pairs = _pairs(tuned, keys, lambda v: v[0] == "adamw", lambda v: v[0] == "soap")
    pairs += _pairs(tuned, keys, lambda v: v[0] == "adafactor", lambda v: v[0] == "rotated-adafactor")
    return _compare(pairs, "diagonal vs rotated optimiser, each at its tuned lr")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def claim_c7(runs: list[Run]) -> Verdict:
    points = [(c, k) for r in runs if _ok(r) and "input_correlation" in r.final
              for c, k in zip(r.final["input_correlation"], r.final["kurtosis"])]
    if len(points) < 4:
        return "untested", "too few (run, layer) points"
    corr, kurt = map(np.array, zip(*points))
    rho = spearman(corr, kurt)
    status, text = ("held" if rho >= 0.5 else "not held"), f"Spearman rho(input correlation, kurtosis) over {len(points)} final (run, layer) points = {rho:.2f} (held: >= 0.5)"
    norm_pairs = _pairs(runs, "model.final_norm", lambda v: v is True, lambda v: v is False)
    if norm_pairs:
        s2, t2, _ = _compare(norm_pairs, "with vs without final norm", matched=False)
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


def _ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None:
        return None
    return x / y if y > 0 else (math.inf if x > 0 else None)


def c8_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """(Pre-LN + AdamW, OP + SOAP) pairs of one seed, each at its tuned lr, otherwise the same settings:
    the runs C8 compares (and whose matched-loss weights ``ofe reproduce`` quantises)."""
    return _pairs(at_tuned_lr(runs), ("model.block", "optim.name", LR), lambda v: v[:2] == ("pre-ln", "adamw"),
                  lambda v: v[:2] == ("op", "soap"))


def claim_c8(runs: list[Run]) -> Verdict:
    """Pairs are Pre-LN + AdamW and OP + SOAP of one seed, each at its tuned lr (the rule: CLAIMS["C8"])."""
    pairs = [(a, b) for a, b in c8_pairs(runs) if a.quant is not None and b.quant is not None]
    if not pairs:
        return "untested", "no quantised Pre-LN + AdamW and OP + SOAP runs with the same seed and other settings", []
    lines, wins, data = [], [], []
    for a, b in pairs:
        w8a, w8b = a.quant_increase("W8A8"), b.quant_increase("W8A8")
        equal = _ratio(w8a, w8b)
        row: dict[str, Any] = {"seed": a.seed, "lr_preln_adamw": a.settings.get(LR), "lr_op_soap": b.settings.get(LR),
                               "steps": a.steps, "val_loss_preln_adamw": a.val_loss(), "val_loss_op_soap": b.val_loss(),
                               "w8a8_pct_preln_adamw": w8a, "w8a8_pct_op_soap": w8b, "ratio_equal_steps": equal,
                               "w8a4_pct_preln_adamw": a.quant_increase("W8A4"), "w8a4_pct_op_soap": b.quant_increase("W8A4"),
                               "max_kurtosis_preln_adamw": float(np.max(a.final["kurtosis"])),
                               "max_kurtosis_op_soap": float(np.max(b.final["kurtosis"])),
                               "residual_sqnr_db_preln_adamw": _residual_sqnr(a), "residual_sqnr_db_op_soap": _residual_sqnr(b)}
        line = (f"seed {a.seed}: equal steps ({a.steps}) W8A8 {w8a:+.2f}% vs {w8b:+.2f}% "
                f"(val loss {a.val_loss():.3f} vs {b.val_loss():.3f})" if w8a is not None and w8b is not None
                else f"seed {a.seed}: W8A8 not measured")
        point = matched_point(a, b)
        matched = None
        if point.better_step is not None and point.better.quant_result(point.better_step) is not None:
            # the worse run at its final weights, the better one at its matched step
            ma = a.quant_increase("W8A8", point.better_step if point.better is a else None)
            mb = b.quant_increase("W8A8", point.better_step if point.better is b else None)
            matched = _ratio(ma, mb)
            row.update(matched_target_val_loss=point.target, matched_better=point.better.label,
                       matched_better_step=point.better_step, matched_better_val_loss=point.better_loss,
                       w8a8_pct_preln_adamw_matched=ma, w8a8_pct_op_soap_matched=mb, ratio_matched=matched)
            line += (f"; matched val loss {point.target:.3f} ({point.better.label} at step {point.better_step}, "
                     f"{point.better_loss:.3f}): W8A8 {ma:+.2f}% vs {mb:+.2f}%")
        else:
            line += "; no matched-loss point (no kept weights reach the worse run's final loss)"
        compared = [(w8a, equal)] + ([(ma, matched)] if matched is not None else [])
        ok = all(cost is not None and cost >= C8_MIN_PCT and r is not None and r >= C8_RATIO for cost, r in compared)
        row["agrees"] = ok
        wins.append(ok)
        data.append(row)
        lines.append(line)
    return _status(wins), (f"W8A8 perplexity increase, Pre-LN + AdamW vs OP + SOAP (each at its tuned lr), held when "
                           f">= {C8_MIN_PCT:g}% and >= {C8_RATIO:g}x: {sum(wins)}/{len(wins)} seeds; " + "; ".join(lines)), data


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


def claim_c9(runs: list[Run]) -> Verdict:
    """u4,2's dominance in Pre-LN + AdamW runs, and its shrinking under SOAP, a smaller lr and a larger
    eps (the rule: CLAIMS["C9"])."""
    pre = [(r, t) for r in _of(runs, "pre-ln", "adamw") if (t := _u4_terms(r)) is not None]
    if not pre:
        return "untested", "no Pre-LN + AdamW run with kurtosis_update records"
    dominant = [_u4_2_dominates(t) for _, t in pre]
    data: list[dict[str, Any]] = [{"configuration": r.label, "seed": r.seed, "terms": t, "u4_2_dominates": d}
                                  for (r, t), d in zip(pre, dominant)]
    parts = [f"u4,2 dominates (positive, largest in magnitude) in {sum(dominant)}/{len(dominant)} Pre-LN + AdamW "
             f"runs ({'; '.join(f'seed {r.seed}: {_describe(t)}' for r, t in pre)})"]
    op = [(r, t) for r in _of(runs, "op", "adamw") if (t := _u4_terms(r)) is not None]
    data += [{"configuration": r.label, "seed": r.seed, "terms": t, "context": True} for r, t in op]
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
                data.append({"comparison": name, "seed": ra.seed, "u4_2_without": ta["u4_2"], "u4_2_with": tb["u4_2"],
                             "shrinks": tb["u4_2"] < ta["u4_2"]})
        if results:
            checks += [ok for ok, _ in results]
            parts.append(f"{name} shrinks u4,2 in {sum(ok for ok, _ in results)}/{len(results)} pairs "
                         f"({', '.join(t for _, t in results)})")
    parts.append("values: cumulative kurtosis change from each term, mean over layers")
    ok = all(dominant) and checks and all(checks)
    status = "held" if ok else ("partly held" if any(dominant) or any(checks) else "not held")
    return status, "; ".join(parts), data


@dataclass(frozen=True)
class Claim:
    """One claim of the paper: what it says, the rule that decides it, the rule's version (a new
    version for any change of the rule; docs/claims-protocol.md keeps the changelog) and the check
    that applies the rule to runs."""

    id: str
    statement: str
    rule: str
    version: int
    check: Callable[[list[Run]], Verdict]


CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("C1", "OFs (kurtosis well above 1, growing) emerge in Pre-LN + AdamW training",
          "on the reference Pre-LN + AdamW configuration at its tuned lr, mean-over-layers kurtosis peaks at >= 3 and "
          "ends at >= 2x its step-0 value: held in every seed, partly held in some, not held in none", 2, claim_c1),
    Claim("C2", "normalised blocks show OFs; OP shows far less at matched loss",
          "each normalised block against OP (same optimiser and settings, each block at its tuned lr, same seed): "
          "the normalised block's final mean kurtosis is larger, and also at matched training loss where both reach "
          "it: held in every pair, partly held in some, not held in none", 2, claim_c2),
    Claim("C3", "OP without entropy regulation diverges; tanh soft-cap trains but slower",
          "every OP run without QK-norm or soft-cap diverges, and soft-capped runs train to a worse val loss than "
          "QK-normed ones: held; partly held when only the divergence part holds", 1, claim_c3),
    Claim("C4", "smaller lr gives smaller OFs",
          "in every pair that differs only in the lr, the larger lr ends with the larger final mean kurtosis: held "
          "in every pair, partly held in some, not held in none", 1, claim_c4),
    Claim("C5", "larger Adam eps gives smaller OFs",
          "in every pair that differs only in Adam eps, the smaller eps ends with the larger final mean kurtosis: "
          "held in every pair, partly held in some, not held in none", 1, claim_c5),
    Claim("C6", "SOAP / rotated AdaFactor give far smaller OFs than AdamW / AdaFactor on the same block",
          "AdamW against SOAP and AdaFactor against rotated AdaFactor (same block and settings, each at its tuned "
          "lr, same seed): the diagonal optimiser's final mean kurtosis is larger, and also at matched training "
          "loss: held in every pair, partly held in some, not held in none", 2, claim_c6),
    Claim("C7", "high kurtosis goes with high input correlation; the final norm makes both worse",
          "Spearman rho between final input correlation and kurtosis over (run, layer) points >= 0.5, and the final "
          "norm raises kurtosis in every pair differing only in it: held; partly held when one part holds", 1, claim_c7),
    Claim("C8", "W8A8 perplexity degrades much more for Pre-LN + AdamW than for OP + SOAP",
          f"per seed, Pre-LN + AdamW and OP + SOAP each at its tuned lr: Pre-LN + AdamW's W8A8 perplexity increase "
          f"is >= {C8_MIN_PCT:g}% and >= {C8_RATIO:g}x OP + SOAP's, both at equal steps (final weights) and at "
          f"matched validation loss (the better run's kept weights at the worse run's final val loss; equal steps "
          f"only when none were kept): held in every seed, partly held in some, not held in none", 3, claim_c8),
    Claim("C9", "u4,2 dominates kurtosis growth in Pre-LN; small lr, big eps and SOAP shrink it",
          "u4,2 dominates a Pre-LN + AdamW run when it is positive and at least as large in magnitude as every other "
          "u4 term (cumulative contribution to the kurtosis change, mean over layers); held when it dominates in "
          "every such run and SOAP, a smaller lr and a larger eps each shrink it in every pair isolating them; "
          "partly held when some of these hold; not held when none does", 2, claim_c9),
)}


def evaluate_claims(runs: list[Run]) -> list[ClaimResult]:
    results = []
    for claim in CLAIMS.values():
        status, evidence, *data = claim.check(runs)
        results.append(ClaimResult(claim.id, claim.statement, status, evidence, claim.rule, data[0] if data else [],
                                   claim.version))
    return results


def format_claims(results: list[ClaimResult]) -> str:
    lines = [f"{'claim':<6} {'status':<12} statement"]
    for r in results:
        lines.append(f"{r.id:<6} {r.status:<12} {r.claim}")
    return "\n".join(lines)
