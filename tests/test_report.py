"""`ofe report` and the claims engine on synthetic run directories with known numbers; `ofe reproduce` smoke run."""

import json
import math
import shutil

import pytest

from ofe.analysis import load_runs
from ofe.analysis.claims import evaluate_claims
from ofe.cli import main
from ofe.report import write_report


def make_run(root, name, block, opt, seed, kurt_end, loss_end, lr=1e-2, w8a8=None, w8a4=None, steps=100, layers=3,
             model=None, diverged=None, u4_1=0.0, u4_3=0.0, val_every=50, kept=None):
    """A run whose kurtosis rises linearly from 1.2 to ``kurt_end`` and loss falls to ``loss_end``;
    ``kept`` maps a step to the W8A8 increase of the weights kept there."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"out_dir": str(d), "seed": seed, "steps": steps, "monitor_interval": 10,
           "model": {"block": block, "n_layer": layers, "final_norm": block != "op", **(model or {})},
           "optim": {"name": opt, "lr": lr, "eps": 1e-8}}
    (d / "config.json").write_text(json.dumps(cfg))
    records, prev = [], None
    for step in range(steps + 1):
        frac = step / steps
        rec = {"step": step}
        if step < steps:
            rec["train_loss"] = 5.0 + (loss_end - 5.0) * frac
        if step % val_every == 0:
            rec["val_loss"] = 5.0 + (loss_end - 5.0) * frac
        if step % 10 == 0:
            k = [1.2 + (kurt_end - 1.2) * frac * (1 + 0.1 * layer) for layer in range(layers)]
            rec["kurtosis"] = k
            rec["input_correlation"] = [0.1 + 0.1 * (x - 1) for x in k]
            if prev is not None:  # m2 = 1, m4 = previous kurtosis; all change in u4_2
                rec["kurtosis_update"] = {"m2": [1.0] * layers, "m4": prev, "u2_1": [0.0] * layers, "u2_2": [0.0] * layers,
                                          "u4_1": [u4_1 * (a - b) for a, b in zip(k, prev)],
                                          "u4_2": [(1 - u4_1 - u4_3) * (a - b) for a, b in zip(k, prev)],
                                          "u4_3": [u4_3 * (a - b) for a, b in zip(k, prev)], "u4_4": [0.0] * layers, "kurtosis": k}
            prev = k
        records.append(rec)
    if diverged:
        records = records[:diverged]
        (d / "DIVERGED").write_text(f"loss became nan at step {diverged}\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if w8a8 is not None:
        fp = math.exp(loss_end)
        (d / "quant.json").write_text(json.dumps({"fp_ppl": fp, "w8a8_ppl": fp * (1 + w8a8 / 100), "formats": [
            {"format": "W8A8", "ppl": fp * (1 + w8a8 / 100), "increase_pct": w8a8},
            {"format": "W8A4", "ppl": fp * (1 + w8a4 / 100), "increase_pct": w8a4}]}))
    for step, pct in (kept or {}).items():
        (d / "weights").mkdir(exist_ok=True)
        (d / "weights" / f"step_{step:06d}.st").write_bytes(b"")
        (d / f"quant.step_{step:06d}.json").write_text(json.dumps({"step": step, "formats": [
            {"format": "W8A8", "increase_pct": pct}]}))
    return d


def paper_like(root, seeds=(0, 1)):
    for s in seeds:
        make_run(root, f"preln-adamw-{s}", "pre-ln", "adamw", s, 8.0 + s, 2.0, w8a8=5.0, w8a4=200.0)
        make_run(root, f"preln-soap-{s}", "pre-ln", "soap", s, 2.0, 1.5, w8a8=1.0, w8a4=60.0)
        make_run(root, f"op-adamw-{s}", "op", "adamw", s, 1.6, 1.8, w8a8=0.5, w8a4=40.0)
        make_run(root, f"op-soap-{s}", "op", "soap", s, 1.3, 1.4, w8a8=0.2, w8a4=20.0)
        make_run(root, f"preln-adamw-lowlr-{s}", "pre-ln", "adamw", s, 3.0, 2.5, lr=1e-3)


def by_id(claims):
    return {c.id: c for c in claims}


def test_c1_is_judged_at_pre_ln_adamws_tuned_lr(tmp_path):
    """An lr grid: C1 follows the lr with the best loss, not the first or the most common one."""
    for seed in (0, 1):
        make_run(tmp_path / "a", f"low-{seed}", "pre-ln", "adamw", seed, 1.2, 2.5, lr=1e-3)  # flat kurtosis, worse loss
        make_run(tmp_path / "a", f"mid-{seed}", "pre-ln", "adamw", seed, 1.2, 2.4, lr=3e-3)
        make_run(tmp_path / "a", f"high-{seed}", "pre-ln", "adamw", seed, 9.0, 2.0, lr=3e-2)  # OFs, best loss
    c1 = by_id(evaluate_claims(load_runs([tmp_path / "a"])))["C1"]
    assert c1.status == "held", c1.evidence
    judged = [r for r in c1.data if r["judged"]]
    assert sorted(r["seed"] for r in judged) == [0, 1] and all(r["final"] > 5 for r in judged)  # the lr-3e-2 runs
    for seed in (0, 1):  # now the flat lr has the best loss
        make_run(tmp_path / "b", f"low-{seed}", "pre-ln", "adamw", seed, 1.2, 1.5, lr=1e-3)
        make_run(tmp_path / "b", f"high-{seed}", "pre-ln", "adamw", seed, 9.0, 2.0, lr=3e-2)
    assert by_id(evaluate_claims(load_runs([tmp_path / "b"])))["C1"].status == "not held"


def test_claims_hold_on_paper_like_runs(tmp_path):
    paper_like(tmp_path / "runs")
    claims = by_id(evaluate_claims(load_runs([tmp_path / "runs"])))
    for cid in ("C1", "C2", "C4", "C6", "C8", "C9a", "C9b", "C9c"):
        assert claims[cid].status == "held", (cid, claims[cid].evidence)
    for cid in ("C3a", "C3b", "C5", "C7b", "C9d"):
        assert claims[cid].status == "untested", cid
    assert "4/4 pairs" in claims["C6"].evidence  # 2 blocks x 2 seeds
    assert "2/2 pairs" in claims["C4"].evidence
    # Pre-LN + AdamW seed 0: excess over 1 is 6.8 x mean(1, 1.1, 1.2) + 0.2 = 7.68 vs SOAP 0.88: ratio ~8.7
    assert "+5.00% vs +0.20%" in claims["C8"].evidence


def test_c9_is_not_held_when_an_opposite_term_is_larger(tmp_path):
    """u4,2 grows the kurtosis but u4,1 pulls the other way harder: "dominates" is by magnitude."""
    for s in (0, 1):  # u4_1 = -1.5 x change, u4_2 = 2.5 x change: u4,2 positive, but |u4,1| < |u4,2| -> dominant
        make_run(tmp_path / "a", f"preln-adamw-{s}", "pre-ln", "adamw", s, 8.0, 2.0, u4_1=-1.5)
        make_run(tmp_path / "a", f"preln-soap-{s}", "pre-ln", "soap", s, 2.0, 1.5)
    claims = by_id(evaluate_claims(load_runs([tmp_path / "a"])))
    c9 = claims["C9a"]
    assert c9.status == "held" and claims["C9b"].status == "held", c9.evidence
    for s in (0, 1):  # u4_1 = +3 x change, u4_2 = -2 x change: a negative u4,2 never dominates growth
        make_run(tmp_path / "b", f"preln-adamw-{s}", "pre-ln", "adamw", s, 8.0, 2.0, u4_1=3.0)
        make_run(tmp_path / "b", f"preln-soap-{s}", "pre-ln", "soap", s, 2.0, 1.5, u4_1=3.0)
    c9 = by_id(evaluate_claims(load_runs([tmp_path / "b"])))["C9a"]
    assert c9.status == "not held" and "dominates (positive, largest in magnitude) in 0/2" in c9.evidence, c9.evidence
    assert "largest other u4,1 +" in c9.evidence
    for s in (0, 1):  # the case: u4,2 positive (+0.5 x change) but u4,1 (-3 x change) larger in magnitude
        make_run(tmp_path / "c", f"preln-adamw-{s}", "pre-ln", "adamw", s, 8.0, 2.0, u4_1=-3.0, u4_3=3.5)
    c9 = by_id(evaluate_claims(load_runs([tmp_path / "c"])))["C9a"]
    assert c9.status == "not held" and "in 0/2" in c9.evidence and "largest other u4,3 +" in c9.evidence, c9.evidence


def test_claims_fail_when_the_data_says_the_opposite(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "preln-adamw", "pre-ln", "adamw", 0, 1.3, 2.0, w8a8=0.1, w8a4=10.0)  # no OFs
    make_run(root, "op-adamw", "op", "adamw", 0, 6.0, 2.0)
    make_run(root, "preln-soap", "pre-ln", "soap", 0, 5.0, 2.0)
    make_run(root, "op-soap", "op", "soap", 0, 6.0, 2.0, w8a8=3.0, w8a4=90.0)
    claims = by_id(evaluate_claims(load_runs([root])))
    for cid in ("C1", "C2", "C6", "C8"):
        assert claims[cid].status == "not held", (cid, claims[cid].evidence)


def test_matched_loss_uses_the_step_where_both_runs_reach_the_same_loss(tmp_path):
    a = make_run(tmp_path, "a", "pre-ln", "adamw", 0, 9.0, 1.0)  # reaches loss 3.0 at half-way
    runs = load_runs([a])
    # smoothed loss reaches 3.0 a few steps after step 50 (trailing mean lags); kurtosis there ~5.1-5.5 x layer factor
    k = runs[0].kurtosis_at_loss(3.0)
    assert 1.2 + 7.8 * 0.5 * 1.1 < k < 1.2 + 7.8 * 0.7 * 1.1
    assert runs[0].kurtosis_at_loss(0.5) is None


def test_report_writes_figures_table_and_summary(tmp_path, capsys):
    paper_like(tmp_path / "runs", seeds=(0,))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out_dir", str(out)]) == 0
    names = {p.name for p in (out / "figures").iterdir()}
    assert names == {"kurtosis_vs_step.png", "final_kurtosis_by_layer.png", "loss_curves.png", "kurtosis_vs_loss.png",
                     "input_correlation_vs_kurtosis.png", "kurtosis_update_terms.png", "quantisation.png", "cost_vs_lr.png"}  # lr: AdamW at two
    assert all((out / "figures" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    md = (out / "report.md").read_text()
    assert "| pre-ln + adamw | 0 | 0.01 | 100 |" in md and "| pre-ln + adamw lr=0.001 | 0 | 0.001 | 100 |" in md
    assert "| pre-ln + adamw | 2.5000 | **2.0000** | 0 | 0.5000 over lr 0.001 (one seed: no error bar) |" in md  # the lr table: the tuned lr in bold
    assert "- **C8** (rule v5, docs/claims-protocol.md): per seed, at every pair of lrs from each arm's near-optimal lr band" in md
    assert "figures/kurtosis_vs_step.png" in md
    summary = json.loads((out / "summary.json").read_text())
    row = next(r for r in summary["runs"] if r["run"] == "preln-adamw-0")
    assert row["val_ppl"] == pytest.approx(math.exp(2.0)) and row["max_kurtosis"] == pytest.approx(1.2 + 6.8 * 1.2)
    assert row["w8a8_increase_pct"] == 5.0
    printed = capsys.readouterr().out
    assert "C6     held" in printed
    # rewriting a report replaces it; a directory that is not a report is never touched
    assert main(["report", str(tmp_path / "runs"), "--out_dir", str(out)]) == 0
    assert main(["report", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "runs")]) == 2
    assert "not an ofe report" in capsys.readouterr().err


def test_rewriting_a_report_keeps_the_users_files_and_drops_only_stale_figures(tmp_path, capsys):
    paper_like(tmp_path / "runs", seeds=(0,))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out_dir", str(out)]) == 0
    (out / "notes.txt").write_text("my notes")  # the user's files beside the report
    (out / "figures" / "my_plot.png").write_bytes(b"mine")
    shutil.copytree(tmp_path / "runs" / "preln-adamw-0", out / "a-run")
    for run in (tmp_path / "runs").iterdir():  # no quantisation results now: that figure is stale
        (run / "quant.json").unlink(missing_ok=True)
    assert main(["report", str(tmp_path / "runs"), "--out_dir", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "figures" / "my_plot.png").read_bytes() == b"mine"
    assert (out / "a-run" / "config.json").is_file()
    assert not (out / "figures" / "quantisation.png").exists()
    assert "quantisation.png" not in json.loads((out / "summary.json").read_text())["figures"]
    assert oct((out / "figures").stat().st_mode & 0o777) != oct(0o700)  # the user's umask, not mkdtemp's


def test_report_rejects_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    (bad / "metrics.jsonl").write_text("")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("ofe report: error:") for line in err)


def test_reproduce_smoke_trains_quantises_and_reports(tmp_path, small_corpus, capsys):
    out = tmp_path / "study"
    args = ["reproduce", "--preset", "tiny", "--steps", "6", "--batch_size", "4", "--seeds", "0,1", "--other_seeds", "0",
            "--corpus", str(small_corpus), "--out_dir", str(out), "--progress", "false"]
    assert main(args) == 0
    runs = sorted(p.name for p in out.iterdir() if (p / "model.safetensors").is_file())
    assert runs == ["op_adamw_lr0.03_seed0", "op_soap_lr0.01_seed0", "op_soap_lr0.01_seed1",  # each arm at its tuned lr
                    "pre-ln_adamw_lr0.003_seed0", "pre-ln_adamw_lr0.003_seed1", "pre-ln_soap_lr0.01_seed0"]
    assert all((out / r / "quant.json").is_file() for r in runs)
    assert all((out / r / "weights").is_dir() for r in runs)  # kept weights for the matched-loss comparison
    printed = capsys.readouterr().out
    assert "C1 " in printed and "C8 " in printed and (out / "report" / "report.md").is_file()
    assert (out / "report" / "claims.json").is_file() and "time: training and quantisation" in printed
    # the matched-loss point of each seed's C8 pair: quantised when it is a kept step, named in claims.json
    c8 = next(c for c in json.loads((out / "report" / "claims.json").read_text())["claims"] if c["id"] == "C8")
    for row in c8["data"]:
        step = row.get("matched_better_step")
        if step is not None and step < 6:
            better = "op_soap_lr0.01" if row["matched_better"].startswith("op") else "pre-ln_adamw_lr0.003"
            assert (out / f"{better}_seed{row['seed']}" / f"quant.step_{step:06d}.json").is_file()
    assert main(args) == 0  # finished: skipped, the report is rewritten
    assert main(["reproduce", "--blocks", "pre-ln,nope"]) == 2


def test_c3_needs_bare_op_to_diverge_and_the_soft_cap_to_train_slower(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "qk", "op", "adamw", 0, 1.5, 1.5, model={"qk_norm": "rms"})
    make_run(root, "bare", "op", "adamw", 0, 1.5, 1.5, model={"qk_norm": "none"}, diverged=35)
    make_run(root, "cap", "op", "adamw", 0, 1.5, 1.9, model={"qk_norm": "none", "attn_softcap": 5.0})
    claims = by_id(evaluate_claims(load_runs([root])))
    assert claims["C3a"].status == "held" and "1/1 runs diverged" in claims["C3a"].evidence
    assert claims["C3b"].status == "held" and "val loss 1.900 vs QK-norm 1.500" in claims["C3b"].evidence
    (root / "bare" / "DIVERGED").unlink()  # the bare OP run trained after all
    assert by_id(evaluate_claims(load_runs([root])))["C3a"].status == "not held"
    make_run(root, "cap-fast", "op", "adamw", 1, 1.5, 1.2, model={"qk_norm": "none", "attn_softcap": 5.0})
    make_run(root, "qk-1", "op", "adamw", 1, 1.5, 1.5, model={"qk_norm": "rms"})
    c3b = by_id(evaluate_claims(load_runs([root])))["C3b"]  # seed 1's soft-capped run is the faster one
    assert c3b.status == "partly held" and [r["agrees"] for r in sorted(c3b.data, key=lambda r: r["seed"])] == [True, False]


def test_reproduce_gpu_preset_builds_the_codeparrot_study(tmp_path):
    from ofe.experiment import parse_spec
    from ofe.experiment.reproduce import ReproduceOptions, study_spec
    sweep = parse_spec(study_spec(ReproduceOptions(preset="codeparrot-130m", out_dir=str(tmp_path), seeds=(0,))))
    assert [r.name for r in sweep.runs] == ["pre-ln_soap_lr0.001_seed0", "op_soap_lr0.001_seed0",  # slower first
                                            "pre-ln_adamw_lr0.001_seed0", "op_adamw_lr0.001_seed0"]
    cfg = sweep.runs[0].config
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.dtype, cfg.compile) == (12, 768, "bfloat16", True)
    assert cfg.data.tokenizer == "bpe" and cfg.optim.lr == 1e-3 and cfg.steps == 10000 and sweep.quantize
    small = parse_spec(study_spec(ReproduceOptions(steps=50, lr=3e-3, out_dir=str(tmp_path))))
    c = small.runs[0].config
    assert (c.steps, c.optim.lr, c.optim.betas, c.eval_interval, c.monitor_interval) == (50, 3e-3, (0.9, 0.95), 5, 5)


def test_reproduce_runs_the_c8_pair_on_every_seed_and_each_arm_at_its_lr(tmp_path, monkeypatch):
    from ofe.experiment import parse_spec
    from ofe.experiment import reproduce as R
    study = {**R.STUDIES["small-cpu"], "lrs": {"pre-ln+adamw": 1e-3, "op+soap": 1e-2}}
    monkeypatch.setitem(R.STUDIES, "small-cpu", study)
    sweep = parse_spec(R.study_spec(R.ReproduceOptions(preset="small-cpu", out_dir=str(tmp_path))))
    lrs = {(r.config.model.block, r.config.optim.name, r.config.seed): r.config.optim.lr for r in sweep.runs}
    assert lrs == {("pre-ln", "adamw", 0): 1e-3, ("pre-ln", "adamw", 1): 1e-3, ("pre-ln", "adamw", 2): 1e-3,
                   ("pre-ln", "soap", 0): 3e-3, ("op", "adamw", 0): 3e-3,  # untuned arms: the study's lr
                   ("op", "soap", 0): 1e-2, ("op", "soap", 1): 1e-2, ("op", "soap", 2): 1e-2}
    c = sweep.runs[0].config
    assert (c.model.seq_len, c.batch_size, c.optim.decay, c.optim.weight_decay, c.keep_weights) == (128, 32, "constant", 0.0, True)
    tuning = parse_spec(R.tuning_spec(R.ReproduceOptions(preset="study-cpu", out_dir=str(tmp_path), blocks=("pre-ln",),
                                                        optimizers=("adamw",))))
    assert [r.name for r in tuning.runs] == ["pre-ln_adamw_lr0.001_seed0", "pre-ln_adamw_lr0.003_seed0",
                                             "pre-ln_adamw_lr0.01_seed0", "pre-ln_adamw_lr0.03_seed0"] and not tuning.quantize
    only_pair = R.ReproduceOptions(preset="small-cpu", out_dir=str(tmp_path), other_seeds=(), seeds=(0,))
    assert R.arms(only_pair) == [("pre-ln", "adamw"), ("op", "soap")]
    assert [r.name for r in parse_spec(R.tuning_spec(only_pair)).runs][-1] == "op_soap_lr0.003_seed0"



def test_the_small_cpu_study_runs_adamw_at_its_measured_lr(tmp_path):
    from ofe.experiment import parse_spec
    from ofe.experiment import reproduce as R
    committed = parse_spec(R.study_spec(R.ReproduceOptions(preset="small-cpu", out_dir=str(tmp_path))))
    assert {(r.config.model.block, r.config.optim.name): r.config.optim.lr for r in committed.runs} == {
        ("pre-ln", "adamw"): 1e-3, ("pre-ln", "soap"): 3e-3, ("op", "adamw"): 3e-3, ("op", "soap"): 3e-3}


def test_the_backcopy_study_trains_on_the_synthetic_task_with_bos_windows(tmp_path):
    from ofe.experiment import parse_spec
    from ofe.experiment import reproduce as R
    assert R.ReproduceOptions().preset == "backcopy-cpu"  # the main job
    sweep = parse_spec(R.study_spec(R.ReproduceOptions(out_dir=str(tmp_path))))
    c = sweep.runs[0].config
    assert (c.data.corpus, c.data.bos, c.model.n_layer, c.model.seq_len, c.steps, c.batch_size, c.dtype) == (
        "bigram-backcopy", True, 2, 64, 1500, 16, "bfloat16")
    assert (c.optim.decay, c.optim.warmup_frac, c.optim.min_lr_frac, c.optim.weight_decay) == ("linear", 0.05, 0.0, 0.0)
    # the C8 pair at three lrs spanning its band on every seed; the other arms at one lr on seed 0
    lrs = {}
    for r in sweep.runs:
        lrs.setdefault((r.config.model.block, r.config.optim.name), set()).add((r.config.optim.lr, r.config.seed))
    assert lrs == {("pre-ln", "adamw"): {(lr, s) for lr in (3e-3, 1e-2, 3e-2) for s in (0, 1, 2)},
                   ("op", "soap"): {(lr, s) for lr in (1e-3, 3e-3, 1e-2) for s in (0, 1, 2)},
                   ("pre-ln", "soap"): {(1e-2, 0)}, ("op", "adamw"): {(3e-3, 0)}}
    assert [r.config.seed for r in sweep.runs] == [0] * 8 + [1] * 6 + [2] * 6  # seed by seed: a cut study has whole pairs
    names = [r.config.optim.name for r in sweep.runs]  # each seed's slower (SOAP) runs first: the workers end together
    assert names[8:14] == names[14:] == ["soap"] * 3 + ["adamw"] * 3 and names[:4] == ["soap"] * 4
    # a preset without a study of its own trains on real text, not on the default's synthetic task
    assert R.study_of("small").get("train", {}).get("data") is None
    other = parse_spec(R.study_spec(R.ReproduceOptions(preset="backcopy-cpu", corpus="bigram-backcopy:triggers=8",
                                                      out_dir=str(tmp_path))))
    assert other.runs[0].config.data.corpus == "bigram-backcopy:triggers=8" and other.runs[0].config.data.bos


def test_blocks_are_compared_at_their_own_defaults(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "preln", "pre-ln", "adamw", 0, 8.0, 2.0)
    make_run(root, "preln-nofinal", "pre-ln", "adamw", 0, 1.1, 2.0, model={"final_norm": False})
    make_run(root, "op", "op", "adamw", 0, 1.3, 2.0)
    runs = load_runs([root])
    assert sorted(r.label for r in runs) == ["op + adamw", "pre-ln + adamw", "pre-ln + adamw final_norm=False"]
    claim = by_id(evaluate_claims(runs))["C2"]
    assert claim.status == "held" and "1/1 pairs" in claim.evidence  # the no-final-norm variant is not "Pre-LN"


def test_configurations_come_in_one_order_whatever_the_directory_order(tmp_path):
    paper_like(tmp_path / "runs", seeds=(0,))  # directories list as op-*, preln-*
    labels = list(dict.fromkeys(r.label for r in load_runs([tmp_path / "runs"])))
    blocks = [label.split(" ")[0] for label in labels]
    assert blocks == sorted(blocks, key=["pre-ln", "op"].index) and blocks[0] == "pre-ln"  # the zoo's block order
    assert labels.index("pre-ln + soap") > labels.index("pre-ln + adamw")  # then the registry's optimiser order
    shuffled = load_runs([tmp_path / "runs" / "op-soap-0", tmp_path / "runs" / "preln-adamw-0"])
    assert [r.label.split(" ")[0] for r in shuffled] == ["pre-ln", "op"]


def test_rejudge_rebuilds_the_report_from_its_evidence_alone(tmp_path, capsys, monkeypatch):
    """A report saves its runs' numbers; `ofe rejudge` re-derives claims.json from them without the runs,
    identically under the same rules, and with a changed rule gives that rule's verdict and version."""
    paper_like(tmp_path / "runs")
    make_run(tmp_path / "runs", "preln-adamw-kept", "pre-ln", "adamw", 3, 8.0, 2.0, w8a8=5.0, w8a4=200.0, kept={50: 1.5})
    out = tmp_path / "docs" / "study"
    assert main(["report", str(tmp_path / "runs"), "--out_dir", str(out), "--title", "my study"]) == 0
    before = (out / "claims.json").read_text()
    shutil.rmtree(tmp_path / "runs")  # the runs are gone
    assert main(["rejudge", str(tmp_path / "docs")]) == 0  # found below the folder given
    assert (out / "claims.json").read_text() == before
    assert (out / "report.md").read_text().startswith("# my study\n")
    assert "C8 held" in capsys.readouterr().out
    import ofe.analysis.claims as claims_module
    from dataclasses import replace
    stricter = replace(claims_module.CLAIMS["C8"], version=99, check=lambda runs: ("not held", "a stricter rule", []))
    monkeypatch.setitem(claims_module.CLAIMS, "C8", stricter)
    assert main(["rejudge", str(out)]) == 0
    c8 = next(c for c in json.loads((out / "claims.json").read_text())["claims"] if c["id"] == "C8")
    assert (c8["verdict"], c8["rule_version"]) == ("not held", 99)


def test_rejudge_refuses_a_folder_without_evidence_and_a_damaged_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["rejudge", str(tmp_path / "empty")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "evidence.json.gz").write_bytes(b"not gzip")
    assert main(["rejudge", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no evidence.json.gz" in err[0] and "not a readable evidence file" in err[1]


def test_a_report_killed_before_installing_leaves_a_draft_the_next_report_removes(tmp_path):
    """SIGKILL at the named instant after the report is drawn and before it is moved in: the output
    is untouched (no half report) and the draft folder, marked as ofe's, is removed by the next report
    on that output; a look-alike folder without the mark is the user's and stays."""
    import os
    import signal
    import subprocess
    import sys
    paper_like(tmp_path / "runs", seeds=(0,))
    out = tmp_path / "report"
    argv = [sys.executable, "-m", "ofe", "report", str(tmp_path / "runs"), "--out_dir", str(out)]
    proc = subprocess.Popen(argv, env={**os.environ, "OFE_PAUSE_AT": "report-drafted"}, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if line.strip() == "ofe: paused at report-drafted":
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    drafts = [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]
    assert len(drafts) == 1 and (drafts[0] / "report.md").is_file()
    assert not (out / "report.md").exists()  # nothing half-installed
    (tmp_path / ".report-mine").mkdir()  # the user's, not a draft
    assert main(["report", str(tmp_path / "runs"), "--out_dir", str(out)]) == 0
    assert (out / "report.md").is_file() and not drafts[0].exists() and (tmp_path / ".report-mine").is_dir()


@pytest.mark.parametrize("name,content,needle", [
    ("quant.json", {"formats": []}, "'fp_ppl' is missing"),
    ("quant.json", {"step": 20, "w8a8_ppl": 3.0, "formats": []}, "'fp_ppl' is missing"),  # as ofe quantize writes it
    ("quant.json", {"fp_ppl": 2.0, "w8a8_ppl": 3.0, "formats": [{"format": 1}]}, "a format entry"),
    ("quant.json", {"fp_ppl": 2.0, "w8a8_ppl": "x"}, "'w8a8_ppl' is missing or not a number"),
    ("quant.json", {"fp_ppl": 2.0, "w8a8_ppl": 3.0, "calibration_draws": [1]}, "calibration_draws"),
    ("metrics.jsonl", '{"step": 0, "kurtosis": "abc"}\n{"step": 1, "kurtosis": [1.0]}\n', "field 'kurtosis' has the wrong type"),
    ("metrics.jsonl", '{"step": "x"}\n{"step": 1, "kurtosis": [1.0]}\n', "'step' is 'x'"),
    ("metrics.jsonl", '{"step": 0, "val_loss": [1]}\n{"step": 1, "kurtosis": [1.0]}\n', "field 'val_loss'"),
    ("metrics.jsonl", '{"step": 0, "mmr": {"a": 1}}\n{"step": 1, "kurtosis": [1.0]}\n', "field 'mmr'"),
])
def test_files_read_back_are_checked_field_by_field(tmp_path, capsys, name, content, needle):
    """Valid JSON of the wrong shape in a run's files is one line naming the file and the field, not a
    traceback deep in the report (issue 29: every file read is validated)."""
    run = make_run(tmp_path / "runs", "r", "pre-ln", "adamw", 0, 8.0, 2.0, w8a8=5.0, w8a4=200.0, steps=20)
    (run / name).write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["report", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and name in err[0], err


def test_the_report_draws_the_probe_curves_and_names_each_onset(tmp_path):
    """Runs logged with `--quant_probe`: the report draws int8 cost over training and names the onset,
    the first probe at or above 0.3%, per run (and "never" for a run that stays below)."""
    root = tmp_path / "runs"
    for name, costs in (("spiky", [0.0, 0.1, 0.5, 2.0]), ("calm", [0.0, 0.05, 0.1, 0.2])):
        run = make_run(root, name, "pre-ln", "adamw" if name == "spiky" else "soap", 0, 8.0, 2.0, steps=30)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for r in records:
            if r["step"] % 10 == 0:
                r["w8a8_probe_pct"], r["w4a4_probe_pct"] = costs[r["step"] // 10], 10 * costs[r["step"] // 10]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report"
    assert main(["report", str(root), "--out_dir", str(out)]) == 0
    assert (out / "figures" / "quant_probe.png").read_bytes()[:4] == b"\x89PNG"
    assert "spiky step 20; calm never." in (out / "report.md").read_text()
