"""Fair comparisons (issue 12): each arm at its tuned lr, matched-loss checkpoints, and claims.json
that carries every verdict's rule and numbers. Synthetic run directories with known numbers."""

import json
import math

import numpy as np
import pytest

from ofe.analysis import load_runs
from ofe.analysis.claims import CLAIMS, evaluate_claims
from ofe.analysis.fair import arm_key, at_tuned_lr, matched_point, tuned_lrs
from ofe.cli import main
from ofe.train import build_train_config, train
from test_report import by_id, make_run


def test_tuned_lr_is_the_lowest_mean_val_loss_over_seeds_and_diverged_runs_lose(tmp_path):
    root = tmp_path / "runs"
    for seed, losses in ((0, {1e-3: 2.4, 3e-3: 2.0, 1e-2: 1.9}), (1, {1e-3: 2.4, 3e-3: 2.0, 1e-2: 2.3})):
        for lr, loss in losses.items():
            make_run(root, f"a-{lr:g}-{seed}", "pre-ln", "adamw", seed, 5.0, loss, lr=lr)
    make_run(root, "b-0.01-0", "op", "soap", 0, 1.2, 1.0, lr=1e-2, diverged=40)  # diverged: infinite loss
    make_run(root, "b-0.001-0", "op", "soap", 0, 1.2, 3.0, lr=1e-3)
    runs = load_runs([root])
    by_arm = tuned_lrs(runs)
    tuned = {f"{r.settings['model.block']} + {r.settings['optim.name']}": by_arm[arm_key(r)] for r in runs}
    # means: 1e-3 2.4, 3e-3 2.0, 1e-2 2.1 -> 3e-3, although 1e-2 is best on seed 0
    assert tuned["pre-ln + adamw"]["lr"] == 3e-3
    assert tuned["pre-ln + adamw"]["grid"][1e-2] == pytest.approx(2.1)
    assert tuned["op + soap"]["lr"] == 1e-3 and math.isinf(tuned["op + soap"]["grid"][1e-2])
    kept = at_tuned_lr(runs)
    assert sorted(r.path.name for r in kept) == ["a-0.003-0", "a-0.003-1", "b-0.001-0"]


def test_tuning_margin_is_the_paired_difference_to_the_runner_up(tmp_path):
    """Three seeds, three lrs: the margin is the mean of the per-seed differences runner-up minus
    tuned, with its standard error (checked against numpy); a margin inside 2 SE is a tie."""
    losses = {1e-3: (2.10, 2.12, 2.11), 1e-2: (2.000, 2.004, 1.999), 3e-2: (2.003, 2.001, 2.006)}
    for lr, per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            make_run(tmp_path / "tie", f"a-{lr}-{seed}", "pre-ln", "adamw", seed, 5.0, loss, lr=lr)
    (t,) = tuned_lrs(load_runs([tmp_path / "tie"])).values()
    diffs = np.subtract(losses[3e-2], losses[1e-2])
    assert t["lr"] == 1e-2 and t["runner_up"] == 3e-2
    assert t["margin"] == pytest.approx(diffs.mean(), abs=1e-9)
    assert t["margin_se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3), abs=1e-9) and t["clear"] is False
    for seed, loss in enumerate((2.0, 2.01, 2.02)):  # lr 1e-3 now beats 3e-3 by 0.1 on every seed
        make_run(tmp_path / "clear", f"b-1e-3-{seed}", "op", "soap", seed, 1.2, loss, lr=1e-3)
        make_run(tmp_path / "clear", f"b-3e-3-{seed}", "op", "soap", seed, 1.2, loss + 0.1 + 0.001 * seed, lr=3e-3)
    (t,) = tuned_lrs(load_runs([tmp_path / "clear"])).values()
    assert t["lr"] == 1e-3 and t["margin"] == pytest.approx(0.101, abs=1e-6) and t["clear"] is True
    make_run(tmp_path / "one", "c-1", "op", "adamw", 0, 1.2, 2.0, lr=1e-3)  # one lr: no margin
    (t,) = tuned_lrs(load_runs([tmp_path / "one"])).values()
    assert t["runner_up"] is None and t["clear"] is None


def test_tuned_lr_averages_only_the_seeds_every_lr_was_run_with(tmp_path):
    """Seeds 1 and 2 were run later at lr 1e-3 only, and are worse than seed 0: averaged with them,
    1e-3 (mean 2.1) would lose to 3e-3 (2.05, seed 0 only) by seed luck. On seed 0, the seed both lrs
    share, 1e-3 wins (1.9 against 2.05)."""
    root = tmp_path / "runs"
    for seed, loss in ((0, 1.9), (1, 2.2), (2, 2.2)):
        make_run(root, f"a-0.001-{seed}", "pre-ln", "adamw", seed, 5.0, loss, lr=1e-3)
    make_run(root, "a-0.003-0", "pre-ln", "adamw", 0, 5.0, 2.05, lr=3e-3)
    make_run(root, "b-0.003-1", "op", "soap", 1, 1.2, 1.5, lr=3e-3)  # lrs with no seed in common: all seeds
    make_run(root, "b-0.01-2", "op", "soap", 2, 1.2, 1.4, lr=1e-2)
    runs = load_runs([root])
    tuned = {r.settings["model.block"]: tuned_lrs(runs)[arm_key(r)] for r in runs}
    assert tuned["pre-ln"]["lr"] == 1e-3 and tuned["pre-ln"]["seeds"] == [0]
    assert tuned["pre-ln"]["grid"] == {1e-3: pytest.approx(1.9), 3e-3: pytest.approx(2.05)}
    assert tuned["op"]["lr"] == 1e-2 and tuned["op"]["seeds"] == [1, 2]
    assert sorted(r.path.name for r in at_tuned_lr(runs)) == ["a-0.001-0", "a-0.001-1", "a-0.001-2", "b-0.01-2"]


def test_c8_compares_each_arm_at_its_tuned_lr(tmp_path):
    """At a shared lr (1e-2) AdamW is badly tuned and quantises well; at its tuned lr (1e-3) it has
    the outliers. The claim must use the tuned runs, not the same-lr pair."""
    root = tmp_path / "runs"
    make_run(root, "preln-adamw-hi", "pre-ln", "adamw", 0, 2.0, 3.0, lr=1e-2, w8a8=0.1, w8a4=5.0)
    make_run(root, "preln-adamw-lo", "pre-ln", "adamw", 0, 9.0, 2.0, lr=1e-3, w8a8=3.0, w8a4=300.0)
    make_run(root, "op-soap", "op", "soap", 0, 1.3, 1.9, lr=1e-2, w8a8=0.3, w8a4=20.0)
    c8 = by_id(evaluate_claims(load_runs([root])))["C8"]
    assert c8.status == "held", c8.evidence
    judged = [r for r in c8.data if "context" not in r]
    assert len(judged) == 1 and judged[0]["lr_preln_adamw"] == 1e-3 and judged[0]["ratio_equal_steps"] == pytest.approx(10)
    # the paper's view (the lr both arms ran) is shown as context and goes the other way
    [common] = [r for r in c8.data if r.get("context") == "common lr"]
    assert common["lr_preln_adamw"] == common["lr_op_soap"] == 1e-2 and not common["agrees"]
    assert "at the lrs both arms ran (the paper's view, context): lr 0.01 0/1 seeds" in c8.evidence


def _pair(root, op_kept, seed=0, preln_w8a8=3.0, op_w8a8=0.3):
    make_run(root, f"preln-adamw-{seed}", "pre-ln", "adamw", seed, 9.0, 2.0, w8a8=preln_w8a8, w8a4=300.0, val_every=10)
    # OP + SOAP's val loss 5 - 3.6 * step / 100: 2.12 at step 80, 1.76 at step 90 (first <= 2.0), 1.4 at 100
    return make_run(root, f"op-soap-{seed}", "op", "soap", seed, 1.3, 1.4, w8a8=op_w8a8, w8a4=20.0, val_every=10,
                    kept=op_kept)


def test_matched_point_is_the_better_runs_first_kept_step_at_the_worse_runs_final_loss(tmp_path):
    _pair(tmp_path / "r", {50: 0.2, 80: 0.25, 90: 0.3})
    runs = load_runs([tmp_path / "r"])
    preln, op = (next(r for r in runs if r.settings["model.block"] == b) for b in ("pre-ln", "op"))
    point = matched_point(preln, op)
    assert point.worse is preln and point.better is op and point.target == pytest.approx(2.0)
    assert point.better_step == 90 and point.better_loss == pytest.approx(1.76)
    assert matched_point(op, preln).better_step == 90  # order of the arguments does not matter
    _pair(tmp_path / "s", {50: 0.2})  # nothing kept at or below the target but the final weights
    runs = load_runs([tmp_path / "s"])
    op = next(r for r in runs if r.settings["model.block"] == "op")
    assert matched_point(runs[0], op).better_step == 100

def test_quantize_matched_to_picks_the_matched_step_and_refuses_the_worse_run(tmp_path, capsys):
    """``ofe quantize RUN --matched_to OTHER``: the step is the matched point's (the final weights when
    no earlier kept weights reach the loss); the worse run, a missing run, and giving both --step and
    --matched_to are one-line errors (exit 2)."""
    from ofe.quant.quantize import QuantError, matched_step

    _pair(tmp_path / "r", {50: 0.2, 80: 0.25, 90: 0.3})
    preln, op = tmp_path / "r" / "preln-adamw-0", tmp_path / "r" / "op-soap-0"
    assert matched_step(op, preln, log=lambda *_: None) == 90
    with pytest.raises(QuantError, match="is the worse run"):
        matched_step(preln, op)
    _pair(tmp_path / "s", {50: 0.2, 80: 0.25})  # kept up to step 80 only (val loss 2.12 > 2.0): the final weights
    assert matched_step(tmp_path / "s" / "op-soap-0", tmp_path / "s" / "preln-adamw-0") is None
    assert "the final weights; kept steps: [50, 80]" in capsys.readouterr().out
    for argv in (["quantize", str(preln), "--matched_to", str(op)],
                 ["quantize", str(op), "--matched_to", str(preln), "--step", "50"],
                 ["quantize", str(op), "--matched_to", str(tmp_path / "nowhere")]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err



def test_c8_needs_the_ratio_at_matched_loss_too(tmp_path):
    _pair(tmp_path / "held", {90: 0.5})  # equal steps 3.0 / 0.3 = 10x, matched 3.0 / 0.5 = 6x
    c8 = by_id(evaluate_claims(load_runs([tmp_path / "held"])))["C8"]
    assert c8.status == "held", c8.evidence
    row = c8.data[0]
    assert row["matched_better_step"] == 90 and row["ratio_matched"] == pytest.approx(6.0)
    assert "matched val loss 2.000" in c8.evidence and "at step 90" in c8.evidence
    _pair(tmp_path / "not", {90: 2.0})  # at matched loss OP + SOAP costs 2.0%: 1.5x < 2x
    c8 = by_id(evaluate_claims(load_runs([tmp_path / "not"])))["C8"]
    assert c8.status == "not held" and c8.data[0]["ratio_matched"] == pytest.approx(1.5), c8.evidence
    for seed, kept in ((0, {90: 0.5}), (1, {90: 2.0})):  # one seed each way: partly held
        _pair(tmp_path / "partly", kept, seed=seed)
    c8 = by_id(evaluate_claims(load_runs([tmp_path / "partly"])))["C8"]
    assert c8.status == "partly held" and [r["agrees"] for r in c8.data] == [True, False]


def test_c8_needs_a_real_degradation_not_a_ratio_of_noise(tmp_path):
    """+0.08% against +0.01% is an 8x ratio of two noise-level costs: not evidence that AdamW degrades."""
    _pair(tmp_path / "noise", {90: 0.01}, preln_w8a8=0.08, op_w8a8=0.01)
    c8 = by_id(evaluate_claims(load_runs([tmp_path / "noise"])))["C8"]
    assert c8.data[0]["ratio_equal_steps"] == pytest.approx(8.0) and c8.data[0]["ratio_matched"] == pytest.approx(8.0)
    assert c8.status == "not held" and not c8.data[0]["agrees"], c8.evidence
    _pair(tmp_path / "real", {90: 0.01}, preln_w8a8=0.4, op_w8a8=0.01)  # just over the 0.3% floor
    assert by_id(evaluate_claims(load_runs([tmp_path / "real"])))["C8"].status == "held"


def test_claims_json_carries_each_verdict_its_rule_and_its_numbers(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        _pair(root, {90: 0.5 + seed}, seed=seed)
    out = tmp_path / "report"
    assert main(["report", str(root), "--out_dir", str(out)]) == 0
    doc = json.loads((out / "claims.json").read_text())
    assert doc["schema"] == 3 and [c["id"] for c in doc["claims"]] == ["C1", "C2", "C3a", "C3b", "C4", "C5", "C6", "C7a", "C7b", "C8",
                                                                     "C9a", "C9b", "C9c", "C9d"]
    for c in doc["claims"]:
        assert set(c) == {"id", "statement", "verdict", "rule", "rule_version", "evidence", "effect", "data"}
        assert c["verdict"] in {"held", "not held", "partly held", "untested"} and c["rule"] == CLAIMS[c["id"]].rule
        assert c["rule_version"] == CLAIMS[c["id"]].version >= 1
    c8 = next(c for c in doc["claims"] if c["id"] == "C8")
    # the verdict follows from the saved numbers alone: AdamW's cost >= 0.3% and ratio >= 2, at equal steps
    # and at matched loss, every seed
    agrees = [r["w8a8_pct_preln_adamw"] >= 0.3 and r["w8a8_pct_preln_adamw_matched"] >= 0.3 and r["ratio_equal_steps"] >= 2
              and r["ratio_matched"] >= 2 for r in c8["data"]]
    assert c8["effect"]["n"] == 2 and c8["effect"]["against"] == 0 and len(c8["effect"]["ci95"]) == 2
    assert agrees == [r["agrees"] for r in c8["data"]] == [True, True] and c8["verdict"] == "held"
    assert {r["seed"]: r["w8a8_pct_op_soap_matched"] for r in c8["data"]} == {0: 0.5, 1: 1.5}
    assert {r["run"].rsplit("/", 1)[-1] for r in doc["runs"]} == {"preln-adamw-0", "preln-adamw-1", "op-soap-0", "op-soap-1"}
    assert [(t["arm"], t["lr"], t["seeds"], t["runner_up"]) for t in doc["lr_tuning"]] == [
        ("pre-ln + adamw", 1e-2, [0, 1], None), ("op + soap", 1e-2, [0, 1], None)]  # one lr each: no margin


def test_keep_weights_and_quantize_at_a_kept_step(tmp_path, small_corpus, capsys):
    run = tmp_path / "run"
    cfg = build_train_config({"out_dir": str(run), "preset": "tiny", "steps": 10, "batch_size": 8, "eval_interval": 4,
                              "eval_batches": 1, "keep_weights": True, "progress": False,
                              "data": {"corpus": str(small_corpus)}})
    train(cfg, log=lambda *a, **k: None)
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["step_000004.st", "step_000008.st"]
    args = ["quantize", str(run), "--quant.calib_batches", "1", "--eval_sequences", "8", "--sweep", "false"]
    assert main([*args, "--step", "4"]) == 0
    at4 = json.loads((run / "quant.step_000004.json").read_text())
    assert at4["step"] == 4 and not (run / "quant.json").exists()
    assert main(args) == 0
    final = json.loads((run / "quant.json").read_text())
    assert final["step"] == 10 and final["fp_ppl"] != at4["fp_ppl"]  # different weights
    # the kept step's float perplexity is the model's validation loss there (same windows: eval_batches x batch)
    val4 = next(json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["step"] == 4 and "val_loss" in json.loads(line))
    assert at4["fp_ppl"] == pytest.approx(math.exp(val4), rel=1e-4)
    capsys.readouterr()
    assert main([*args, "--step", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "kept no weights at step 5 (kept: 4, 8)" in err and len(err.splitlines()) == 1
    run_obj = load_runs([run])[0]
    assert run_obj.kept_steps == (4, 8) and run_obj.quant_increase("W8A8", 4) == at4["formats"][0]["increase_pct"]
