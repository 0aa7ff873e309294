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

from ofe.analysis.fair import BAND_FLOOR, LR, arm_key, at_tuned_lr, in_band, matched_point
from ofe.analysis.runs import BLOCK_DEFAULTS, Run, at_block_defaults
from ofe.models import BLOCKS

NORMALISED = tuple(name for name, spec in BLOCKS.items() if spec.normalised)  # the paper's "normalised blocks"
FLOOR = 1.0  # kurtosis of perfectly even neurons; effect sizes are ratios of the excess over it
C8_COST_RESOLUTION = 0.01  # % perplexity: a W8A8 cost at or below this (zero, negative) counts as this in a ratio


def effect(ratios: list[float]) -> dict[str, Any] | None:
    """The geometric mean of ``ratios`` (each > 0) with a 95% Student-t interval on their logarithm
    (None with fewer than two), and how many point against the claim (ratio <= 1)."""
    values = np.log(np.asarray([r for r in ratios if r is not None and math.isfinite(r) and r > 0], dtype=float))
    if not values.size:
        return None
    centre, n = float(values.mean()), int(values.size)
    interval = None
    if n >= 2:
        from scipy import stats  # imported here: ~1 s that commands which judge nothing should not pay

        half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))
        interval = [math.exp(centre - half), math.exp(centre + half)]
    return {"geometric_mean": math.exp(centre), "ci95": interval, "n": n, "against": int((values <= 0).sum())}


def describe_effect(e: dict[str, Any] | None, what: str) -> str:
    if e is None:
        return f"{what}: no finite ratio"
    ci = f", 95% CI [{e['ci95'][0]:.3g}, {e['ci95'][1]:.3g}]" if e["ci95"] else " (one value: no interval)"
    return f"{what} {e['geometric_mean']:.3g}x (geometric mean of {e['n']}{ci}; {e['against']} against)"


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
    effect: dict[str, Any] | None = None  # the effect size with its interval over seeds or pairs (see effect())


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
Verdict = tuple  # (status, evidence) or (status, evidence, data) or (status, evidence, data, effect)


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
    size = effect([(mean_kurtosis(a) - FLOOR) / max(mean_kurtosis(b) - FLOOR, 1e-3) for a, b in pairs])
    return (_status(wins), f"{what}: {sum(wins)}/{len(wins)} pairs; {describe_effect(size, 'excess-kurtosis ratio')}. "
            + "; ".join(lines), data, size)


def claim_c1(runs: list[Run]) -> Verdict:
    """Judged on every run of the reference Pre-LN + AdamW arm (the configuration labelled without
    departures at its tuned lr, else the one with most runs) whose lr is in the arm's band; other
    Pre-LN + AdamW runs are listed as context."""
    every = _of(runs, "pre-ln", "adamw")
    if not every:
        return "untested", "no Pre-LN + AdamW run"
    tuned = {id(r) for r in at_tuned_lr(every)}
    labels = [r.label for r in every if id(r) in tuned]
    reference = "pre-ln + adamw" if "pre-ln + adamw" in labels else max(dict.fromkeys(labels), key=labels.count)
    arm = arm_key(next(r for r in every if r.label == reference))
    judged = {id(r) for r in in_band(every) if arm_key(r) == arm}
    chosen = [r for r in every if id(r) in judged] + [r for r in every if id(r) not in judged]
    lines, held, data = [], [], []
    for r in chosen:
        _, k = r.kurtosis_curve()
        start, peak, end = float(k[0].mean()), float(k.mean(1).max()), float(k[-1].mean())
        row = {"configuration": r.label, "seed": r.seed, "lr": r.settings.get(LR), "judged": id(r) in judged,
               "start": start, "peak": peak, "final": end, "final_max_layer": float(k[-1].max())}
        if id(r) in judged:
            row["agrees"] = peak >= 3.0 and end >= 2.0 * start
            held.append(row["agrees"])
        lines.append(f"{r.label} seed {r.seed}: {start:.2f} -> peak {peak:.2f} -> final {end:.2f}")
        data.append(row)
    lrs = sorted({row["lr"] for row in data if row["judged"]})
    return _status(held), (f"mean-over-layers kurtosis at step 0, its peak, and at the end; judged on '{reference}' at "
                           f"every lr of its band ({', '.join(f'{lr:g}' for lr in lrs)}; held: peak >= 3 and final >= 2x "
                           "start in every run): " + "; ".join(lines)), data


def claim_c2(runs: list[Run]) -> Verdict:
    pairs = _pairs(in_band(runs), ("model.block", LR), lambda v: v[0] in NORMALISED, lambda v: v[0] == "op")
    return _compare(pairs, "normalised block vs OP, every pair of lrs from the two arms' bands")


def _op_without_regulation(runs: list[Run]) -> tuple[list[Run], list[Run], list[Run]]:
    """OP runs; those without QK-norm or soft-cap (bare); those without QK-norm but soft-capped."""
    op = [r for r in runs if r.settings.get("model.block") == "op"]
    bare = [r for r in op if r.settings.get("model.qk_norm") == "none" and not r.settings.get("model.attn_softcap")]
    capped = [r for r in op if r.settings.get("model.qk_norm") == "none" and r.settings.get("model.attn_softcap")]
    return op, bare, capped


def _qk_normed_twin(run: Run, op: list[Run]) -> Run | None:
    """The QK-normed OP run of the same seed and otherwise the same settings."""
    return next((q for q in op if q.settings.get("model.qk_norm") not in (None, "none")
                 and _comparable(run, q, ("model.qk_norm", "model.attn_softcap"))), None)


def claim_c3a(runs: list[Run]) -> Verdict:
    op, bare, _ = _op_without_regulation(runs)
    if not bare:
        return "untested", "no OP run without QK-norm and soft-cap"
    diverged = [r.diverged is not None for r in bare]
    parts = [f"OP without QK-norm or soft-cap: {sum(diverged)}/{len(bare)} runs diverged"]
    data = [{"seed": r.seed, "lr": r.settings.get(LR), "diverged": r.diverged is not None} for r in bare]

    def min_entropy(run: Run) -> float | None:
        values = run.final.get("attention_entropy_min") if run.monitored else None
        return min(values) if values else None

    for r in bare:
        ref = _qk_normed_twin(r, op)
        if not r.diverged and ref and min_entropy(r) is not None and min_entropy(ref) is not None:
            parts.append(f"seed {r.seed} lr {r.settings.get(LR):g} trained: val loss {r.val_loss():.3f} vs QK-norm "
                         f"{ref.val_loss():.3f}, lowest head entropy {min_entropy(r):.2f} vs {min_entropy(ref):.2f} nats")
    return _status(diverged), "; ".join(parts), data


def claim_c3b(runs: list[Run]) -> Verdict:
    op, _, capped = _op_without_regulation(runs)
    rows = [(r, _qk_normed_twin(r, op)) for r in capped]
    rows = [(r, ref) for r, ref in rows if ref is not None and _ok(ref)]
    if not rows:
        return "untested", "no soft-capped OP run with a QK-normed twin"
    agree, parts, data = [], [], []
    for r, ref in rows:
        ok = r.diverged is None and r.val_loss() > ref.val_loss()
        agree.append(ok)
        parts.append(f"seed {r.seed}: soft-capped " + ("diverged" if r.diverged else f"val loss {r.val_loss():.3f}")
                     + f" vs QK-norm {ref.val_loss():.3f}")
        data.append({"seed": r.seed, "lr": r.settings.get(LR), "softcap_val_loss": None if r.diverged else r.val_loss(),
                     "qk_norm_val_loss": ref.val_loss(), "agrees": ok})
    return _status(agree), "soft-capped OP trains to a worse val loss than QK-normed OP: " + "; ".join(parts), data


def claim_c4(runs: list[Run]) -> Verdict:
    pairs = _pairs(runs, "optim.lr", lambda v: True, lambda v: True)
    pairs = [(a, b) for a, b in pairs if a.settings["optim.lr"] > b.settings["optim.lr"]]
    return _compare(pairs, "larger lr vs smaller lr", matched=False)


def claim_c5(runs: list[Run]) -> Verdict:
    return _compare([(a, b) for a, b in _pairs(runs, "optim.eps", lambda v: True, lambda v: True)
                     if a.settings["optim.eps"] < b.settings["optim.eps"]], "smaller eps vs larger eps", matched=False)


def claim_c6(runs: list[Run]) -> Verdict:
    band, keys = in_band(runs), ("optim.name", LR)
    pairs = _pairs(band, keys, lambda v: v[0] == "adamw", lambda v: v[0] == "soap")
    pairs += _pairs(band, keys, lambda v: v[0] == "adafactor", lambda v: v[0] == "rotated-adafactor")
    return _compare(pairs, "diagonal vs rotated optimiser, every pair of lrs from the two arms' bands")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)
    return float(np.corrcoef(rank(x), rank(y))[0, 1])


def claim_c7a(runs: list[Run]) -> Verdict:
    points = [(c, k) for r in runs if _ok(r) and "input_correlation" in r.final
              for c, k in zip(r.final["input_correlation"], r.final["kurtosis"])]
    if len(points) < 4:
        return "untested", "too few (run, layer) points"
    corr, kurt = map(np.array, zip(*points))
    rho = spearman(corr, kurt)
    return (("held" if rho >= 0.5 else "not held"),
            f"Spearman rho(input correlation, kurtosis) over {len(points)} final (run, layer) points = {rho:.2f} (held: >= 0.5)",
            [{"points": len(points), "spearman_rho": rho}])


def claim_c7b(runs: list[Run]) -> Verdict:
    pairs = _pairs(runs, "model.final_norm", lambda v: v is True, lambda v: v is False)
    if not pairs:
        return "untested", "no pair of runs differing only in model.final_norm"
    return _compare(pairs, "with vs without final norm", matched=False)


def _residual_sqnr(run: Run) -> float | None:
    """Mean over layers of the W8A8 model's residual-stream SQNR (dB), from its quantisation result."""
    layers = (run.quant or {}).get("layers") or []
    return float(np.mean([row["sqnr_db"] for row in layers])) if layers else None


def _ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None:
        return None
    return x / y if y > 0 else (math.inf if x > 0 else None)


def c8_pairs(runs: list[Run], band: bool = True) -> list[tuple[Run, Run]]:
    """(Pre-LN + AdamW, OP + SOAP) pairs of one seed, otherwise the same settings: at every pair of lrs
    from the two arms' bands (``band``), the runs C8 judges and whose matched-loss weights ``ofe
    reproduce`` quantises; or at every lr both arms ran (``band`` False, the paper's own view)."""
    if band:
        return _pairs(in_band(runs), ("model.block", "optim.name", LR), lambda v: v[:2] == ("pre-ln", "adamw"),
                      lambda v: v[:2] == ("op", "soap"))
    return _pairs(runs, ("model.block", "optim.name"), lambda v: v == ("pre-ln", "adamw"), lambda v: v == ("op", "soap"))


def _c8_cost_ratio(a: float | None, b: float | None) -> float | None:
    """Pre-LN + AdamW's W8A8 cost over OP + SOAP's, the latter floored at :data:`C8_COST_RESOLUTION`."""
    return None if a is None or b is None else max(a, C8_COST_RESOLUTION) / max(b, C8_COST_RESOLUTION)


def _draws(run: Run) -> list[float]:
    """The W8A8 cost over the calibration draws ``ofe quantize`` measured (empty for older results)."""
    return [float(d["increase_pct"]) for d in (run.quant or {}).get("calibration_draws", [])]


def _c8_pair(a: Run, b: Run) -> tuple[bool, dict[str, Any], str]:
    """C8's rule on one pair: whether it holds, the numbers, one line of evidence."""
    w8a, w8b = a.quant_increase("W8A8"), b.quant_increase("W8A8")
    equal = _ratio(w8a, w8b)
    row: dict[str, Any] = {"seed": a.seed, "lr_preln_adamw": a.settings.get(LR), "lr_op_soap": b.settings.get(LR),
                           "steps": a.steps, "val_loss_preln_adamw": a.val_loss(), "val_loss_op_soap": b.val_loss(),
                           "w8a8_pct_preln_adamw": w8a, "w8a8_pct_op_soap": w8b, "ratio_equal_steps": equal,
                           "effect_ratio": _c8_cost_ratio(w8a, w8b),
                           "w8a4_pct_preln_adamw": a.quant_increase("W8A4"), "w8a4_pct_op_soap": b.quant_increase("W8A4"),
                           "w8a8_calibration_pct_preln_adamw": _draws(a), "w8a8_calibration_pct_op_soap": _draws(b),
                           "max_kurtosis_preln_adamw": float(np.max(a.final["kurtosis"])),
                           "max_kurtosis_op_soap": float(np.max(b.final["kurtosis"])),
                           "residual_sqnr_db_preln_adamw": _residual_sqnr(a), "residual_sqnr_db_op_soap": _residual_sqnr(b)}
    lrs = f"lrs {a.settings.get(LR):g} / {b.settings.get(LR):g}"
    line = (f"seed {a.seed} {lrs}: equal steps ({a.steps}) W8A8 {w8a:+.2f}% vs {w8b:+.2f}% "
            f"(val loss {a.val_loss():.3f} vs {b.val_loss():.3f})" if w8a is not None and w8b is not None
            else f"seed {a.seed} {lrs}: W8A8 not measured")
    if row["w8a8_calibration_pct_preln_adamw"]:
        lo, hi = min(row["w8a8_calibration_pct_preln_adamw"]), max(row["w8a8_calibration_pct_preln_adamw"])
        line += f" (Pre-LN + AdamW over {len(row['w8a8_calibration_pct_preln_adamw'])} calibration draws {lo:+.2f}% .. {hi:+.2f}%)"
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
    return ok, row, line


def claim_c8(runs: list[Run]) -> Verdict:
    """Every pair of lrs from the two arms' bands, per seed (the rule: CLAIMS["C8"]); the pairs at the
    lrs both arms ran are context (the paper's view), and the effect is the per-seed worst band pair's
    cost ratio, over seeds."""
    quantised = lambda pairs: [(a, b) for a, b in pairs if a.quant is not None and b.quant is not None]  # noqa: E731
    pairs = quantised(c8_pairs(runs))
    if not pairs:
        return "untested", "no quantised Pre-LN + AdamW and OP + SOAP runs with the same seed and other settings", []
    judged = [_c8_pair(a, b) for a, b in pairs]
    wins = [ok for ok, _, _ in judged]
    data = [row for _, row, _ in judged]
    by_ratio = sorted((r for r in data if r["effect_ratio"] is not None), key=lambda r: r["effect_ratio"])
    worst_per_seed = {}
    for row in by_ratio:
        worst_per_seed.setdefault(row["seed"], row["effect_ratio"])
    size = effect(list(worst_per_seed.values()))
    seeds = sorted({r["seed"] for r in data})
    text = (f"W8A8 perplexity increase, Pre-LN + AdamW vs OP + SOAP at every pair of lrs from the two arms' bands, "
            f"held when >= {C8_MIN_PCT:g}% and >= {C8_RATIO:g}x: {sum(wins)}/{len(wins)} pairs over seeds "
            f"{', '.join(map(str, seeds))}; {describe_effect(size, 'per-seed worst-pair cost ratio')}")
    if by_ratio:
        worst, best = by_ratio[0], by_ratio[-1]
        pick = lambda r: (f"seed {r['seed']} lrs {r['lr_preln_adamw']:g} / {r['lr_op_soap']:g}: "  # noqa: E731
                          f"{r['w8a8_pct_preln_adamw']:+.2f}% vs {r['w8a8_pct_op_soap']:+.2f}%")
        text += f"; worst pair {pick(worst)}; best pair {pick(best)}"
    common = quantised(c8_pairs(runs, band=False))
    if common:
        at_lr: dict[float, list[bool]] = {}
        judged_by_pair = {(id(a), id(b)): result for (a, b), result in zip(pairs, judged)}
        for a, b in common:
            known = judged_by_pair.get((id(a), id(b)))  # a pair inside both bands is already a judged row
            ok, row, _ = known or _c8_pair(a, b)
            at_lr.setdefault(float(a.settings[LR]), []).append(ok)
            if known is None:
                data.append({**row, "context": "common lr"})
        text += "; at the lrs both arms ran (the paper's view, context): " + ", ".join(
            f"lr {lr:g} {sum(v)}/{len(v)} seeds" for lr, v in sorted(at_lr.items()))
    text += ". " + "; ".join(line for _, _, line in judged)
    return _status(wins), text, data, size


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


def claim_c9a(runs: list[Run]) -> Verdict:
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
    parts.append("values: cumulative kurtosis change from each term, mean over layers")
    return _status(dominant), "; ".join(parts), data


def _shrinks_u4_2(name: str, key: str, order: Callable[[Any, Any], bool]) -> Callable[[list[Run]], Verdict]:
    """C9's shrinkage parts: in every Pre-LN pair isolating ``key`` (``order(without, with)``), the run
    with the change has the smaller u4,2."""
    def check(runs: list[Run]) -> Verdict:
        results, data = [], []
        for ra, rb in _pairs(runs, key, lambda v: True, lambda v: True):
            if ra.settings.get("model.block") != "pre-ln" or not order(ra.settings[key], rb.settings[key]):
                continue
            ta, tb = _u4_terms(ra), _u4_terms(rb)
            if ta and tb:
                results.append((tb["u4_2"] < ta["u4_2"], f"{tb['u4_2']:+.1f} vs {ta['u4_2']:+.1f}"))
                data.append({"comparison": name, "seed": ra.seed, "u4_2_without": ta["u4_2"], "u4_2_with": tb["u4_2"],
                             "agrees": tb["u4_2"] < ta["u4_2"]})
        if not results:
            return "untested", f"no Pre-LN pair with kurtosis_update records isolating {key}"
        return (_status([ok for ok, _ in results]), f"{name} shrinks u4,2 in {sum(ok for ok, _ in results)}/{len(results)} "
                f"pairs ({', '.join(t for _, t in results)}; cumulative, mean over layers)", data)
    return check


claim_c9b = _shrinks_u4_2("SOAP", "optim.name", lambda a, b: a == "adamw" and b == "soap")
claim_c9c = _shrinks_u4_2("a smaller lr", "optim.lr", lambda a, b: a > b)
claim_c9d = _shrinks_u4_2("a larger eps", "optim.eps", lambda a, b: a < b)


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


FLOOR_TEXT = f"{BAND_FLOOR:.0e}".replace("e-0", "e-")  # 2e-3: the floor as the rule's text states it
BAND = f"each arm's near-optimal lr band (its lrs whose mean final val loss is within max(2 SE, {FLOOR_TEXT} nats) of the best)"
PAIR_STATUS = "held in every pair, partly held in some, not held in none"

CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("C1", "OFs (kurtosis well above 1, growing) emerge in Pre-LN + AdamW training",
          "on the reference Pre-LN + AdamW arm, every run whose lr is in " + BAND + ": mean-over-layers kurtosis "
          "peaks at >= 3 and ends at >= 2x its step-0 value: held in every run, partly held in some, not held in none",
          4, claim_c1),
    Claim("C2", "normalised blocks show OFs; OP shows far less at matched loss",
          "each normalised block against OP (same optimiser, settings and seed) at every pair of lrs from " + BAND +
          ": the normalised block's final mean kurtosis is larger, and also at matched training loss where both "
          "reach it: " + PAIR_STATUS + "; effect: the excess-kurtosis ratio's geometric mean over pairs with a "
          "95% t interval", 4, claim_c2),
    Claim("C3a", "OP without entropy regulation diverges",
          "every OP run without QK-norm or soft-cap diverges: held when all do, partly held when some do, not held "
          "when none does", 1, claim_c3a),
    Claim("C3b", "a tanh soft-cap instead trains, but slower",
          "every soft-capped OP run without QK-norm ends at a worse val loss than its QK-normed twin (same seed and "
          "settings; a diverged soft-capped run counts against): " + PAIR_STATUS, 1, claim_c3b),
    Claim("C4", "smaller lr gives smaller OFs",
          "in every pair that differs only in the lr, the larger lr ends with the larger final mean kurtosis: held "
          "in every pair, partly held in some, not held in none", 1, claim_c4),
    Claim("C5", "larger Adam eps gives smaller OFs",
          "in every pair that differs only in Adam eps, the smaller eps ends with the larger final mean kurtosis: "
          "held in every pair, partly held in some, not held in none", 1, claim_c5),
    Claim("C6", "SOAP / rotated AdaFactor give far smaller OFs than AdamW / AdaFactor on the same block",
          "AdamW against SOAP and AdaFactor against rotated AdaFactor (same block, settings and seed) at every pair "
          "of lrs from " + BAND + ": the diagonal optimiser's final mean kurtosis is larger, and also at matched "
          "training loss: " + PAIR_STATUS + "; effect: the excess-kurtosis ratio's geometric mean over pairs with "
          "a 95% t interval", 4, claim_c6),
    Claim("C7a", "high kurtosis goes with high input correlation",
          "Spearman rho between final input correlation and kurtosis over (run, layer) points >= 0.5: held; "
          "otherwise not held", 1, claim_c7a),
    Claim("C7b", "the final norm makes kurtosis worse",
          "in every pair that differs only in the final norm, the run with it ends with the larger final mean "
          "kurtosis: " + PAIR_STATUS, 1, claim_c7b),
    Claim("C8", "W8A8 perplexity degrades much more for Pre-LN + AdamW than for OP + SOAP",
          f"per seed, at every pair of lrs from {BAND} (Pre-LN + AdamW, OP + SOAP): Pre-LN + AdamW's W8A8 "
          f"perplexity increase is >= {C8_MIN_PCT:g}% and >= {C8_RATIO:g}x OP + SOAP's, at equal steps (final "
          f"weights) and at matched validation loss where the better run's kept weights at the worse run's final "
          f"val loss were quantised: held at every pair, partly held at some, not held at none; the evidence names "
          f"the worst and the best pair and, as context, the verdict at each lr both arms ran; effect: per seed the "
          f"worst pair's cost ratio (OP + SOAP's cost floored at {C8_COST_RESOLUTION:g}%), geometric mean over "
          f"seeds with a 95% t interval", 5, claim_c8),
    Claim("C9a", "u4,2 dominates kurtosis growth in Pre-LN + AdamW",
          "in every Pre-LN + AdamW run, u4,2 is positive and at least as large in magnitude as every other u4 term "
          "(cumulative contribution to the kurtosis change, mean over layers): held in every run, partly held in "
          "some, not held in none", 1, claim_c9a),
    Claim("C9b", "SOAP shrinks u4,2", "in every Pre-LN pair that differs only in AdamW vs SOAP, SOAP's cumulative "
          "u4,2 is smaller: " + PAIR_STATUS, 1, claim_c9b),
    Claim("C9c", "a smaller lr shrinks u4,2", "in every Pre-LN pair that differs only in the lr, the smaller lr's "
          "cumulative u4,2 is smaller: " + PAIR_STATUS, 1, claim_c9c),
    Claim("C9d", "a larger Adam eps shrinks u4,2", "in every Pre-LN pair that differs only in Adam eps, the larger "
          "eps's cumulative u4,2 is smaller: " + PAIR_STATUS, 1, claim_c9d),
)}


def evaluate_claims(runs: list[Run]) -> list[ClaimResult]:
    results = []
    for claim in CLAIMS.values():
        status, evidence, *extra = claim.check(runs)
        data, size = (extra + [[], None])[:2]
        results.append(ClaimResult(claim.id, claim.statement, status, evidence, claim.rule, data, claim.version, size))
    return results


def format_claims(results: list[ClaimResult]) -> str:
    lines = [f"{'claim':<6} {'status':<12} statement"]
    for r in results:
        lines.append(f"{r.id:<6} {r.status:<12} {r.claim}")
    return "\n".join(lines)
