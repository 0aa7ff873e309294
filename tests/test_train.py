"""Training: loss falls, exact resume, DDP equals one process, NaN stops cleanly, bad input is one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ofe.cli import main
from ofe.run_dir import CheckpointError, RunDir
from ofe.train import TrainConfig, TrainError, build_train_config, train
from ofe.train import loop as loop_module

TIMING = {"tokens_per_s"}


def tiny_cfg(out, corpus, **kw) -> TrainConfig:
    data = {"out_dir": str(out), "preset": "tiny", "steps": 12, "batch_size": 8, "eval_interval": 4, "eval_batches": 1,
            "monitor_interval": 3, "ckpt_interval": 4, "progress": False, "data": {"corpus": str(corpus)},
            "optim": {"lr": 3e-3}}
    for key, value in kw.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return build_train_config(data)


def quiet(*_a, **_k):
    pass


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_loss_falls_and_outputs_follow_the_contract(tmp_path, small_corpus):
    out = tmp_path / "run"
    final = train(tiny_cfg(out, small_corpus, steps=40, **{"optim.lr": 1e-2}), log=quiet)
    records = RunDir(out).read_metrics()
    assert [r["step"] for r in records] == list(range(40)) + [40]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 1.0
    assert final["val_loss"] == records[-1]["val_loss"]
    monitored = [r for r in records if "kurtosis" in r]
    assert [r["step"] for r in monitored] == list(range(0, 40, 3)) + [40]
    for r in monitored:
        assert len(r["kurtosis"]) == 2 and len(r["attention_entropy"]) == 2 and len(r["input_correlation"]) == 2
        assert all(k >= 1.0 for k in r["kurtosis"])
    assert all(set(r) >= {"step", "train_loss", "lr", "tokens"} for r in records[:-1])
    assert records[5]["tokens"] == 5 * 8 * 32
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 256 and saved["model"]["qk_norm"] == "none"  # resolved
    assert (out / "tokenizer.json").exists() and load_file(out / "model.safetensors")
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    state = RunDir(out).load_checkpoint()
    assert state["step"] == 40
    identity = RunDir(out).read_identity()  # what the run trained on, so two users can compare
    described = identity["corpus_description"]
    assert f"fingerprint {identity['corpus']}" in described and "byte tokens" in described
    assert "120 files" not in described and str(small_corpus) in described


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "soap", "soap+bf16-products+fused", "rotated-adafactor", "muon"])
def test_kill_and_resume_gives_identical_weights_and_metrics(tmp_path, small_corpus, monkeypatch, optimizer):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    opts = {"model.block": "op", "optim.name": optimizer.split("+")[0]}
    if opts["optim.name"] in ("soap", "rotated-adafactor"):
        opts["optim.rotation.precondition_frequency"] = 3
    if "fused" in optimizer:  # the fast CPU options: batched bf16 products, compiled element-wise kernels
        opts.update({"optim.rotation.matmul_dtype": "bfloat16", "optim.rotation.fused": True})
    train(tiny_cfg(whole, small_corpus, **opts), log=quiet)

    original = loop_module.Trainer._train_step

    def dies_at_step_6(self, step):
        if step == 6:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint and two more logged steps
        return original(self, step)

    monkeypatch.setattr(loop_module.Trainer, "_train_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(broken, small_corpus, **opts), log=quiet)
    assert RunDir(broken).load_checkpoint()["step"] == 4
    assert max(r["step"] for r in RunDir(broken).read_metrics()) == 5
    monkeypatch.setattr(loop_module.Trainer, "_train_step", original)
    assert main(["train", "--out_dir", str(broken), "--resume", "true", "--progress", "false"]) == 0

    a, b = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "model.safetensors").read_bytes() == (broken / "model.safetensors").read_bytes()
    assert strip_timing(RunDir(whole).read_metrics()) == strip_timing(RunDir(broken).read_metrics())
    assert main(["train", "--out_dir", str(broken), "--resume", "true"]) == 0  # finished: nothing to do


def test_grad_accumulation_matches_one_big_batch(tmp_path, small_corpus):
    one = train(tiny_cfg(tmp_path / "a", small_corpus, steps=4, batch_size=8), log=quiet)
    two = train(tiny_cfg(tmp_path / "b", small_corpus, steps=4, batch_size=8, grad_accum=2), log=quiet)
    # the two micro-batches are different windows, so compare shape of behaviour, not bits: both train
    assert abs(one["val_loss"] - two["val_loss"]) < 0.5


def test_injected_nan_stops_cleanly_keeping_the_last_checkpoint(tmp_path, small_corpus, monkeypatch, capsys):
    real = loop_module.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] > 7 else loss  # train forwards 0..6 fine (plus one eval)

    monkeypatch.setattr(loop_module, "lm_loss", poisoned)
    out = tmp_path / "nan"
    cfg = tiny_cfg(out, small_corpus)
    args = ["train", "--out_dir", str(out), "--preset", "tiny", "--steps", "12", "--batch_size", "8", "--eval_interval", "100",
            "--eval_batches", "1", "--ckpt_interval", "4", "--progress", "false", "--data.corpus", str(cfg.data.corpus)]
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert "loss became nan" in err and len(err.splitlines()) == 1
    assert RunDir(out).load_checkpoint()["step"] == 4
    assert not (out / "model.safetensors").exists()
    assert max(r["step"] for r in RunDir(out).read_metrics()) == 5


EXACT_ACROSS_RANKS = {"kurtosis", "mmr", "input_correlation", "max_abs", "position0_share", "attention_entropy",
                      "attention_entropy_min", "attention_sink"}


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU is tested on Linux")
def test_two_process_ddp_matches_one_process(tmp_path, small_corpus):
    common = ["--preset", "tiny", "--steps", "6", "--batch_size", "8", "--eval_interval", "3", "--eval_batches", "1",
              "--monitor_interval", "2", "--ckpt_interval", "6", "--progress", "false", "--data.corpus", str(small_corpus)]
    assert main(["train", "--out_dir", str(tmp_path / "one"), *common]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ofe", "train",
           "--out_dir", str(tmp_path / "two"), *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = RunDir(tmp_path / "one").read_metrics(), RunDir(tmp_path / "two").read_metrics()
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r1, r2 in zip(one, two):
        for key in ("train_loss", "val_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (r1["step"], key)
        # the monitor gathers every rank's partial sums: the global batch's metrics, as one process logs them
        # (all but the two that are not decomposable, averaged over ranks: ofe.monitor.reduce)
        for key in EXACT_ACROSS_RANKS & r1.keys():
            assert r2[key] == pytest.approx(r1[key], rel=1e-6, abs=1e-9), (r1["step"], key)
        if "kurtosis" in r1:
            assert EXACT_ACROSS_RANKS & r1.keys() >= {"kurtosis", "mmr", "attention_entropy", "attention_sink"}
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---- bad input: one clear line, non-zero exit, nothing overwritten ------------------------------------
def run_cli(args, capsys):
    code = main(["train", "--progress", "false", *args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "args,needle",
    [(["--preset", "gpt-9"], "unknown model preset 'gpt-9'"), (["--stepz", "3"], None),
     (["--steps", "ten"], "'steps': expected an integer"), (["--steps", "0"], "'steps' must be positive"),
     (["--batch_size", "-8"], "'batch_size' must be positive"), (["--model.block", "pre-xx"], "'model.block'"),
     (["--optim.lr", "-1"], "optim.lr must be in (0, 10]"), (["--data.corpus", "/nonexistent/dir"], "corpus not found")],
)
def test_bad_config_is_one_line(tmp_path, capsys, args, needle):
    if needle is None:  # argparse rejects unknown flags itself, with exit code 2
        with pytest.raises(SystemExit) as e:
            main(["train", *args])
        assert e.value.code == 2
        return
    code, err = run_cli(["--out_dir", str(tmp_path / "x"), *args], capsys)
    assert code == 2 and needle in err and len(err.splitlines()) == 1


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = 3\n[optim]\nlearning_rate = 0.1\n')
    code, err = run_cli(["--config", str(cfg), "--out_dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "unknown config key 'optim.learning_rate'" in err


def test_sequence_longer_than_corpus_and_empty_corpus(tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.py").write_text("x = 1\n" * 10)
    code, err = run_cli(["--out_dir", str(tmp_path / "o1"), "--preset", "tiny", "--data.corpus", str(small),
                         "--data.cache_dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and "fewer than seq_len + 1" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bin.dat").write_bytes(b"\xff\xfe\xfd")
    code, err = run_cli(["--out_dir", str(tmp_path / "o2"), "--data.corpus", str(empty),
                         "--data.cache_dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and "no readable text" in err and "1 files skipped" in err


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(["--out_dir", str(blocker / "run")], capsys)
    assert code == 2 and "not writable" in err


def test_existing_run_is_never_overwritten_and_resume_checks_the_config(tmp_path, small_corpus, capsys):
    out = tmp_path / "run"
    train(tiny_cfg(out, small_corpus, steps=4), log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    base = ["--out_dir", str(out), "--preset", "tiny", "--data.corpus", str(small_corpus)]
    code, err = run_cli(base, capsys)
    assert code == 2 and "already holds a run" in err
    code, err = run_cli(["--out_dir", str(out), "--resume", "true", "--optim.lr", "0.5"], capsys)
    assert code == 2 and "differs from the saved run in optim.lr" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    code, err = run_cli(["--out_dir", str(tmp_path / "none"), "--resume", "true"], capsys)
    assert code == 2 and "holds no run" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_one_line(tmp_path, small_corpus, capsys, damage):
    out = tmp_path / "run"
    train(tiny_cfg(out, small_corpus, steps=8), log=quiet)
    ckpt = RunDir(out).checkpoint_path
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint at all")
    code, err = run_cli(["--out_dir", str(out), "--resume", "true", "--steps", "8"], capsys)
    assert code == 2 and "corrupt or truncated" in err and len(err.splitlines()) == 1
    with pytest.raises(CheckpointError):
        RunDir(out).load_checkpoint()


def test_train_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "ofe", "train", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--out_dir", "--preset", "--model.block", "--model.qk_norm", "--data.corpus", "--data.tokenizer",
                 "--optim.lr", "--optim.eps", "--steps", "--grad_accum", "--monitor_interval", "--resume", "--compile"):
        assert flag in out, flag


def test_out_dir_error_class():
    from ofe.errors import OfeError

    assert issubclass(TrainError, OfeError)


def test_shipped_config_files_are_valid():
    from pathlib import Path

    from ofe.config import load_file

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert files
    for path in files:
        cfg = build_train_config(load_file(path))
        assert cfg.steps > 0 and cfg.model.block in ("pre-ln", "op", "pre-srms"), path.name


def test_compile_and_bfloat16_paths_train_and_monitor(tmp_path, small_corpus):
    """`compile = true` keeps the monitor working; bf16 autocast trains to nearly the fp32 loss."""
    eager = train(tiny_cfg(tmp_path / "eager", small_corpus, steps=6), log=quiet)
    compiled = train(tiny_cfg(tmp_path / "compiled", small_corpus, steps=6, compile=True), log=quiet)
    bf16 = train(tiny_cfg(tmp_path / "bf16", small_corpus, steps=6, dtype="bfloat16"), log=quiet)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    assert bf16["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-2)
    for run in ("compiled", "bf16"):
        records = RunDir(tmp_path / run).read_metrics()
        assert [r["step"] for r in records if "kurtosis" in r] == [0, 3, 6]
        assert records[-1]["kurtosis"] == pytest.approx(eager["kurtosis"], rel=0.05)


def test_bf16_on_a_cpu_without_bf16_units_trains_in_float32_with_a_warning(tmp_path, small_corpus, monkeypatch):
    from ofe.train import build as build_module
    monkeypatch.setattr(build_module, "cpu_has_bf16", lambda: False)
    lines = []
    train(tiny_cfg(tmp_path / "run", small_corpus, steps=2, dtype="bfloat16"), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("no bfloat16 matrix units" in line for line in lines)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "float32"
    lines.clear()
    soap = {"optim.name": "soap", "optim.rotation.matmul_dtype": "bfloat16"}
    train(tiny_cfg(tmp_path / "soap", small_corpus, steps=2, **soap), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("matmul_dtype bfloat16 would be slower" in line for line in lines)
    assert json.loads((tmp_path / "soap" / "config.json").read_text())["optim"]["rotation"]["matmul_dtype"] == "float32"
    monkeypatch.setattr(build_module, "cpu_has_bf16", lambda: True)
    train(tiny_cfg(tmp_path / "bf16", small_corpus, steps=2, dtype="bfloat16", **soap), log=quiet)
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16" and saved["optim"]["rotation"]["matmul_dtype"] == "bfloat16"


def test_the_quantisation_probe_logs_the_cost_and_leaves_training_untouched(tmp_path, small_corpus):
    """`--quant_probe 4`: every 4 updates and at the end, the W8A8 and W4A4 perplexity cost of the simulated
    model on a fixed held-out batch is logged; the trained weights are bitwise those of a run without it;
    the final value is what the probe gives on the saved weights."""
    from ofe.models import GPT
    from ofe.quant.probe import QuantProbe

    train(tiny_cfg(tmp_path / "probed", small_corpus, quant_probe=4), log=quiet)
    train(tiny_cfg(tmp_path / "plain", small_corpus), log=quiet)
    a, b = load_file(tmp_path / "probed" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = RunDir(tmp_path / "probed").read_metrics()
    probed = [r for r in records if "w8a8_probe_pct" in r]
    assert [r["step"] for r in probed] == [0, 4, 8, 12]
    assert all("w4a4_probe_pct" in r and r["w4a4_probe_pct"] > r["w8a8_probe_pct"] for r in probed[1:])
    assert not any("w8a8_probe_pct" in r for r in RunDir(tmp_path / "plain").read_metrics())
    # the logged final value, recomputed from the saved weights with the probe's own data
    trainer = loop_module.build_trainer(tiny_cfg(tmp_path / "again", small_corpus, quant_probe=4), log=quiet)
    model = RunDir(tmp_path / "probed").load_weights(GPT(trainer.cfg.model))
    again = trainer.probe.measure(model)
    assert again["w8a8_probe_pct"] == pytest.approx(probed[-1]["w8a8_probe_pct"], abs=1e-6)
    assert isinstance(trainer.probe, QuantProbe)
