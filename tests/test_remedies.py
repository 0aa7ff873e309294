"""`ofe remedies`: the study spec, the tuned-lr choice, and a smoke run end to end on a tiny model."""

import json
import math

import pytest

from ofe.cli import main
from ofe.experiment.remedies import BASELINE, POSTHOC_REMEDIES, TRAIN_REMEDIES, RemediesOptions, markdown, study_spec


def test_the_study_spec_runs_every_remedy_at_every_lr_with_its_own_settings():
    spec = study_spec(RemediesOptions(remedies=("osp", "swiglu"), lrs=(1e-3, 3e-3), steps=50))
    names = [v["name"] for v in spec["variants"]]
    assert names == ["pre-ln+adamw_lr0.001", "pre-ln+adamw_lr0.003", "osp_lr0.001", "osp_lr0.003",
                     "swiglu_lr0.001", "swiglu_lr0.003"]  # the baseline is always there, first
    osp = spec["variants"][2]
    assert osp["optim.name"] == "muon" and osp["model.block"] == "pre-srms" and osp["model.embed_proj"] is True
    assert spec["base"]["steps"] == 50 and spec["quantize"] is False and spec["base"]["keep_weights"] is False
    # by default on the main job's study, where the tuned baseline has outlier features to remove
    assert spec["base"]["data"] == {"corpus": "bigram-backcopy", "bos": True} and spec["base"]["optim"]["decay"] == "linear"


@pytest.mark.parametrize("args,needle", [
    (["--remedies", "op,nope"], "unknown remedy 'nope'"),
    (["--posthoc", "magic"], "unknown remedy 'magic'"),
    (["--lrs", "0"], "'lrs' must be positive"),
    (["--lrs", "1e-3", "--fixed_lrs", "1e-2"], "not in the lr grid"),
])
def test_bad_remedy_options_are_one_line_errors(args, needle, capsys):
    assert main(["remedies", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_remedies_smoke_trains_tunes_quantises_and_writes_the_table(tmp_path, small_corpus, capsys):
    out = tmp_path / "remedies"
    args = ["remedies", "--preset", "tiny", "--steps", "6", "--batch_size", "4", "--lrs", "1e-3,3e-2",
            "--remedies", "op,osp", "--posthoc", "per-token,hadamard", "--corpus", str(small_corpus),
            "--out_dir", str(out), "--progress", "false", "--eval_sequences", "8", "--fixed_lrs", "3e-2"]
    assert main(args) == 0
    result = json.loads((out / "remedies.json").read_text())
    tuned, fixed = result["tables"]
    assert tuned["lr"] == "tuned" and fixed["lr"] == 3e-2
    assert all(r["lr"] == 3e-2 for r in fixed["rows"] if r["kind"] == "train-time")
    rows = {(r["kind"], r["remedy"]): r for r in tuned["rows"]}
    assert {k for k in rows if k[0] == "train-time"} == {("train-time", BASELINE), ("train-time", "op"), ("train-time", "osp")}
    assert {k for k in rows if k[0] == "post-hoc"} == {("post-hoc", "per-token"), ("post-hoc", "hadamard")}
    # each arm is reported at the lr of its lowest final validation loss
    for (kind, name), row in rows.items():
        if kind != "train-time":
            continue
        grid = {float(lr): loss for lr, loss in result["lr_grid"][name].items()}
        assert set(grid) == {1e-3, 3e-2} and row["lr"] == min(grid, key=lambda lr: (grid[lr], lr))
        assert math.isclose(row["val_loss"], grid[row["lr"]])
        assert math.isclose(row["val_ppl"], math.exp(row["val_loss"]))
        for fmt in ("W8A8", "W4A4", "W8A8 protocol", "W4A4 protocol"):
            assert math.isfinite(row[fmt]["increase_pct"])
    assert rows[("train-time", BASELINE)]["step_time_ratio"] == 1.0
    # post-hoc rows are the baseline's model, quantised differently
    base = rows[("train-time", BASELINE)]
    assert rows[("post-hoc", "hadamard")]["run"] == base["run"] and rows[("post-hoc", "hadamard")]["fp_ppl"] == base["fp_ppl"]
    combo = [r for r in tuned["rows"] if r["kind"] == "combination"]
    assert len(combo) == 1 and combo[0]["remedy"].split(" + ")[0] in ("op", "osp")
    assert (out / "remedies.png").stat().st_size > 10_000 and (out / "remedies_lr0.03.png").stat().st_size > 10_000
    table = (out / "remedies.md").read_text()
    assert table == markdown(result) and "| post-hoc | hadamard | (baseline) |" in table
    assert "remedies.md" in capsys.readouterr().out
    assert main(args) == 0  # finished runs are not retrained; the table is rewritten


def test_every_remedy_has_an_expectation_from_the_literature():
    assert all(why for _, why in TRAIN_REMEDIES.values()) and all(why for _, why in POSTHOC_REMEDIES.values())
