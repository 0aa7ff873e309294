"""The run directory: state, validated reads, torn logs, the lock (real processes), runs from ofe 0.1,
and the kill windows around the first checkpoint and the final weights."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ofe.analysis import load_runs
from ofe.cli import main
from ofe.run_dir import CheckpointError, RunDir, RunDirError, RunState, find_runs
from ofe.run_config import TrainConfig
from ofe.train import build_train_config, train
from ofe.train import loop as loop_module

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1"
TIMING = {"tokens_per_s"}


def quiet(*_a, **_k):
    pass


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def tiny(out, corpus, **kw):
    data = {"out_dir": str(out), "preset": "tiny", "steps": 6, "batch_size": 4, "eval_interval": 3, "eval_batches": 1,
            "monitor_interval": 2, "ckpt_interval": 100, "progress": False, "data": {"corpus": str(corpus)}, **kw}
    return build_train_config(data)


def interrupted_at(monkeypatch, run_cfg, step: int) -> None:
    """Train ``run_cfg`` with a Ctrl-C at the start of ``step``'s update (as a kill there would)."""
    original = loop_module.Trainer._train_step

    def killed(self, s):
        if s == step:
            raise KeyboardInterrupt
        return original(self, s)

    monkeypatch.setattr(loop_module.Trainer, "_train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train(run_cfg, log=quiet)
    monkeypatch.setattr(loop_module.Trainer, "_train_step", original)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_state_follows_what_the_directory_holds(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.state() is RunState.NEW  # does not exist
    run.create()
    assert run.state() is RunState.NEW
    run.write_config(TrainConfig(preset="tiny", seed=3))
    assert run.state() is RunState.RESUMABLE and run.config().seed == 3
    run.weights_path.write_bytes(b"")
    assert run.state() is RunState.FINISHED
    run.write_diverged("loss became nan at step 3")
    assert run.state() is RunState.DIVERGED and run.read_diverged() == "loss became nan at step 3"
    run.config_path.write_text("{not json")
    assert run.state() is RunState.BROKEN
    other = RunDir(tmp_path / "other")
    other.create()
    other.checkpoint_path.write_bytes(b"x")  # run files without a config or ofe's marker: not ours
    assert other.state() is RunState.FOREIGN and other.foreign_files() == ["checkpoint.pt"]
    other.mark()  # ofe's own run that lost its config: broken
    assert other.state() is RunState.BROKEN and other.foreign_files() == []
    assert not list(run.path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_missing_or_malformed_files_are_errors_naming_the_file(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match="not an ofe run directory"):
        run.config()
    run.config_path.write_text("[1, 2]")
    with pytest.raises(RunDirError, match=str(run.config_path)):
        run.config()
    run.config_path.write_text('{"seed": 0, "stpes": 3}')
    with pytest.raises(RunDirError, match="config.json is not a valid run config: unknown config key 'stpes'"):
        run.config()
    run.quant_path().write_text("{")
    with pytest.raises(RunDirError, match="quant.json is not valid JSON"):
        run.read_quant()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run.load_checkpoint()
    torch.save({"step": 1}, run.checkpoint_path)
    with pytest.raises(CheckpointError, match="not an ofe checkpoint"):
        run.load_checkpoint()
    with pytest.raises(RunDirError, match="has not finished"):
        run.load_weights(torch.nn.Linear(2, 2))


def test_torn_last_metrics_line_is_dropped_and_a_torn_middle_line_is_an_error(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in run.read_metrics()] == [0, 1]
    with pytest.warns(UserWarning):
        run.truncate_metrics(1)
    assert run.read_metrics() == [{"step": 0, "loss": 1.0}]
    run.metrics_path.write_text('{"step": 0}\ngarbage\n{"step": 2}\n')
    with pytest.raises(RunDirError, match="line 2 is malformed"):
        run.read_metrics()


def test_find_runs(tmp_path):
    for name in ("b", "a"):
        RunDir(tmp_path / name).create()
        RunDir(tmp_path / name).write_config(TrainConfig(preset="tiny"))
    (tmp_path / "not-a-run").mkdir()
    assert [r.path.name for r in find_runs(tmp_path)] == ["a", "b"]
    assert find_runs(tmp_path / "a") == [RunDir(tmp_path / "a")]
    with pytest.raises(RunDirError, match="holds no run"):
        find_runs(tmp_path / "not-a-run")
    with pytest.raises(RunDirError, match="does not exist"):
        find_runs(tmp_path / "missing")


HOLD_LOCK = """
import sys
from ofe.run_dir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_run_in_use_is_refused_naming_the_pid(tmp_path, small_corpus, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["train", "--out_dir", str(out), "--preset", "tiny", "--steps", "2", "--batch_size", "4",
                "--progress", "false", "--data.corpus", str(small_corpus)]
        assert main(args) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert RunDir(out).state() is RunState.NEW  # nothing was written
    finally:
        holder.communicate("\n", timeout=30)
    assert main(args) == 0  # released when its holder exits


def _close(resumed, reference, rel: float = 1e-3) -> bool:
    """Every value of ``reference`` (nested dicts/lists) in ``resumed``, floats to ``rel``, the rest equal."""
    if isinstance(reference, dict):
        return all(k in resumed and _close(resumed[k], v, rel) for k, v in reference.items())
    if isinstance(reference, list):
        return len(resumed) == len(reference) and all(_close(a, b, rel) for a, b in zip(resumed, reference))
    if isinstance(reference, float):
        return math.isclose(resumed, reference, rel_tol=rel, abs_tol=1e-9)
    return resumed == reference


def close_weights(a: Path, b: Path, rel: float = 1e-3) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all((x[k] - y[k]).norm() <= rel * y[k].norm() for k in x)


def test_a_run_from_ofe_0_1_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    """tests/fixtures/run_v0_1 was written by ofe 0.1.0 (flat optimiser options, its own checkpoint
    layout; see make.py there): a SOAP run stopped after its step-3 checkpoint, and the final weights
    and metrics of the same run uninterrupted.

    Resumed today, steps 4-6 run today's SOAP, whose refresh orders its products differently from
    0.1.0's (faster; the same arithmetic up to float32 rounding): weights and every logged value
    agree with 0.1.0's uninterrupted run to 1e-3 relative (measured: 4e-5 for weights, 2e-4 for the
    most sensitive logged value), not bitwise. Bitwise resumption with one version is tested below."""
    work = tmp_path / "old"
    shutil.copytree(FIXTURE, work)
    monkeypatch.chdir(work)
    assert RunDir("interrupted").state() is RunState.RESUMABLE
    assert main(["train", "--out_dir", "interrupted", "--resume", "true", "--progress", "false"]) == 0
    assert close_weights(Path("interrupted/model.safetensors"), Path("reference/model.safetensors"))
    reference, resumed = RunDir("reference").read_metrics(), RunDir("interrupted").read_metrics()
    assert len(reference) == len(resumed)  # every value 0.1 logged is logged again (today's logs hold more keys)
    assert all(_close(a, r) for r, a in zip(strip_timing(reference), strip_timing(resumed)))
    # a moved run resumes too (the output directory is where it is now, not where it was made), to
    # the very weights of the first resumption
    shutil.copytree(FIXTURE / "interrupted", work / "moved")
    assert main(["train", "--out_dir", "moved", "--resume", "true", "--progress", "false"]) == 0
    assert same_weights(Path("moved/model.safetensors"), Path("interrupted/model.safetensors"))
    # and the old run loads for analysis with its options in today's groups
    runs = load_runs(["interrupted"])
    assert runs[0].settings["optim.rotation.precondition_frequency"] == 2
    assert main(["quantize", "interrupted", "--sweep", "false"]) == 0


def test_killed_before_the_first_checkpoint_resumes_from_step_0(tmp_path, small_corpus, monkeypatch):
    train(tiny(tmp_path / "whole", small_corpus), log=quiet)
    broken = tmp_path / "broken"
    interrupted_at(monkeypatch, tiny(broken, small_corpus), 3)
    assert RunDir(broken).state() is RunState.RESUMABLE and not RunDir(broken).has_checkpoint()
    train(tiny(broken, small_corpus, resume=True), log=quiet)
    assert same_weights(tmp_path / "whole" / "model.safetensors", broken / "model.safetensors")
    assert strip_timing(RunDir(broken).read_metrics()) == strip_timing(RunDir(tmp_path / "whole").read_metrics())


def test_killed_before_the_final_weights_resume_completes_them(tmp_path, small_corpus, monkeypatch):
    train(tiny(tmp_path / "whole", small_corpus), log=quiet)

    def killed(self, model):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_weights", killed)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(broken, small_corpus), log=quiet)
    assert RunDir(broken).load_checkpoint()["step"] == 6 and RunDir(broken).state() is RunState.RESUMABLE
    monkeypatch.undo()
    train(tiny(broken, small_corpus, resume=True), log=quiet)
    assert RunDir(broken).state() is RunState.FINISHED
    assert same_weights(tmp_path / "whole" / "model.safetensors", broken / "model.safetensors")
    assert strip_timing(RunDir(broken).read_metrics()) == strip_timing(RunDir(tmp_path / "whole").read_metrics())


def test_empty_out_dir_is_refused(capsys):
    assert main(["train", "--out_dir", "", "--steps", "1"]) == 2
    assert "out_dir" in capsys.readouterr().err


def test_divergence_keeps_the_last_checkpoint_whose_loss_was_finite(tmp_path, small_corpus, monkeypatch, capsys):
    """The step-4 checkpoint holds the weights that give a NaN at step 4: it is dropped, step 2's is kept."""
    real = loop_module.lm_loss
    state = {"train_forwards": 0}

    def poisoned(logits, targets):
        loss = real(logits, targets)
        if torch.is_grad_enabled():
            state["train_forwards"] += 1
            if state["train_forwards"] == 5:  # the forward of step 4
                return loss * float("nan")
        return loss

    monkeypatch.setattr(loop_module, "lm_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(loop_module.NonFiniteLoss, match="newest checkpoint \\(step 4\\) gave it and was dropped; "
                                                        "the one of step 2"):
        train(tiny(out, small_corpus, ckpt_interval=2), log=quiet)
    assert RunDir(out).load_checkpoint()["step"] == 2
    assert not (out / "checkpoint.prev.pt").exists()


def test_a_finite_loss_retires_the_previous_checkpoint(tmp_path, small_corpus):
    out = tmp_path / "run"
    train(tiny(out, small_corpus, ckpt_interval=2), log=quiet)
    assert RunDir(out).load_checkpoint()["step"] == 6 and not (out / "checkpoint.prev.pt").exists()


def test_a_kill_between_setting_aside_and_renaming_loads_the_previous_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    state = {"step": 2, "model": {}, "optimizer": {}, "rng": {}, "config": "{}"}
    run.save_checkpoint(state)
    run.save_checkpoint({**state, "step": 4})
    assert (tmp_path / "checkpoint.prev.pt").exists() and run.load_checkpoint()["step"] == 4
    run.checkpoint_path.unlink()  # as if killed after the old one was set aside
    assert run.has_checkpoint() and run.load_checkpoint()["step"] == 2


def test_a_changed_corpus_is_refused_on_resume_and_a_copied_run_counts_once(tmp_path, small_corpus, monkeypatch,
                                                                              capsys):
    out = tmp_path / "run"
    interrupted_at(monkeypatch, tiny(out, small_corpus, ckpt_interval=2), 4)
    (small_corpus / "m000.py").write_text("# edited after the run started\n" * 50)
    assert main(["train", "--out_dir", str(out), "--resume", "true"]) == 2
    err = capsys.readouterr().err
    assert "changed since the run started" in err and len(err.strip().splitlines()) == 1
    sweep = tmp_path / "sweep"
    train(tiny(sweep / "a", small_corpus), log=quiet)
    shutil.copytree(sweep / "a", sweep / "b")
    with pytest.warns(UserWarning, match="is a copy of"):
        runs = load_runs([sweep])
    assert [r.path.name for r in runs] == ["a"]


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_checkpoint_survives(tmp_path, small_corpus, monkeypatch,
                                                                                   capsys):
    import errno

    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_until_full)
    args = ["train", "--out_dir", str(out), "--preset", "tiny", "--steps", "6", "--batch_size", "4", "--ckpt_interval",
            "2", "--eval_batches", "1", "--progress", "false", "--data.corpus", str(small_corpus)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint.pt" in err and "no space left on device" in err, err
    assert RunDir(out).load_checkpoint()["step"] == 2  # the earlier checkpoint is intact
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    assert main([*args, "--resume", "true"]) == 0


def test_resume_after_a_torn_metrics_line_says_so_and_matches(tmp_path, small_corpus, monkeypatch):
    train(tiny(tmp_path / "whole", small_corpus, ckpt_interval=2), log=quiet)
    broken = tmp_path / "broken"
    interrupted_at(monkeypatch, tiny(broken, small_corpus, ckpt_interval=2), 5)
    with (broken / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lr": 0.00')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        train(tiny(broken, small_corpus, ckpt_interval=2, resume=True), log=quiet)
    assert same_weights(tmp_path / "whole" / "model.safetensors", broken / "model.safetensors")
    assert strip_timing(RunDir(broken).read_metrics()) == strip_timing(RunDir(tmp_path / "whole").read_metrics())


def test_quantize_reads_and_writes_the_directory_it_is_given(tmp_path, small_corpus):
    train(tiny(tmp_path / "original", small_corpus), log=quiet)
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    (tmp_path / "original" / "model.safetensors").unlink()  # the copy must not read the original's weights
    assert main(["quantize", str(tmp_path / "copy"), "--sweep", "false", "--eval_sequences", "4"]) == 0
    quant = RunDir(tmp_path / "copy").read_quant()
    assert quant["run"] == str(tmp_path / "copy")
    for row in quant["layers"]:  # where the largest activations sit, beside kurtosis and SQNR
        assert row["abs_max_median"] >= row["max_abs"] / (row["max_abs"] + 1e-9) and 0 <= row["position0_share"] <= 1
    assert RunDir(tmp_path / "original").read_quant() is None


@pytest.mark.parametrize("damage, needle", [
    (lambda t: torch.zeros(3), "size mismatch for blocks.0.attn.qkv.weight: copying a param with shape torch.Size([3])"),
    (lambda t: torch.full_like(t, float("nan")), "holds non-finite values in blocks.0.attn.qkv.weight"),
])
def test_damaged_final_weights_are_one_line_naming_the_tensor(tmp_path, small_corpus, capsys, damage, needle):
    from safetensors.torch import save_file

    train(tiny(tmp_path / "run", small_corpus), log=quiet)
    path = tmp_path / "run" / "model.safetensors"
    weights = load_file(path)
    weights["blocks.0.attn.qkv.weight"] = damage(weights["blocks.0.attn.qkv.weight"])
    save_file(weights, path)
    assert main(["quantize", str(tmp_path / "run"), "--sweep", "false", "--eval_sequences", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert RunDir(tmp_path / "run").read_quant() is None  # nothing written


def test_training_logs_where_the_largest_activations_sit(tmp_path, small_corpus):
    train(tiny(tmp_path / "run", small_corpus, data={"corpus": str(small_corpus), "bos": True}), log=quiet)
    last = RunDir(tmp_path / "run").read_metrics()[-1]
    assert len(last["abs_max_median"]) == len(last["position0_share"]) == len(last["attention_sink"]) == 2
    assert all(r > 1 for r in last["abs_max_median"]) and all(0 <= s <= 1 for s in last["position0_share"])
    assert all(0 < s <= 1 for s in last["attention_sink"])


def test_a_diverging_run_records_its_state_and_resume_refuses_it(tmp_path, capsys):
    """A real divergence (OP without entropy regulation at lr 10, no clipping): ``ofe train`` itself
    writes the diverged state, ``--resume`` is refused in one line, and the report counts it as diverged."""
    out = tmp_path / "run"
    args = ["train", "--out_dir", str(out), "--preset", "tiny", "--steps", "20", "--batch_size", "4", "--eval_batches",
            "1", "--progress", "false", "--optim.lr", "10", "--optim.grad_clip", "0", "--optim.warmup_frac", "0",
            "--model.block", "op", "--model.qk_norm", "none", "--data.corpus", "bigram-backcopy"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "loss became nan" in err and "marked diverged" in err
    run = RunDir(out)
    assert run.state() is RunState.DIVERGED and run.read_diverged().startswith("loss became nan")
    assert main(["train", "--out_dir", str(out), "--resume", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err and "diverged (loss became nan" in err
    assert run.state() is RunState.DIVERGED  # the refusal wrote nothing
    [loaded] = load_runs([out])
    assert loaded.diverged.startswith("loss became nan")


def _sharded_save(run: RunDir, step: int, complete: bool = True) -> None:
    """What the processes and rank 0 do for a sharded checkpoint, with a stand-in shard file."""
    staging = run.begin_sharded_checkpoint()
    (staging / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        (staging / ".metadata").write_bytes(b"dcp")  # DCP writes it last, once every shard is in
    run.finish_sharded_checkpoint({"step": step, "rng": {}, "config": "{}"})


def test_sharded_checkpoints_replace_roll_back_and_never_load_a_torn_one(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    assert not run.has_checkpoint()
    _sharded_save(run, 2)
    _sharded_save(run, 4)
    state = run.load_checkpoint()
    assert state["step"] == 4 and Path(state["shards"]).name == "checkpoint.dcp"
    assert (run.path / "checkpoint.prev.dcp" / "state.pt").is_file()  # kept until step 4's weights are verified
    assert run.revert_checkpoint()  # step 4's weights gave a non-finite loss: step 2 is put back
    assert run.load_checkpoint()["step"] == 2 and not (run.path / "checkpoint.prev.dcp").exists()
    _sharded_save(run, 4)
    run.confirm_checkpoint()
    assert not (run.path / "checkpoint.prev.dcp").exists()
    with pytest.raises(CheckpointError, match="incomplete"):  # shards without DCP's metadata are not renamed in
        _sharded_save(run, 6, complete=False)
    assert run.load_checkpoint()["step"] == 4
    (run.path / "checkpoint.dcp" / "state.pt").unlink()  # a damaged directory under the loaded name
    assert not run.has_checkpoint()
    with run.lock():  # the next run's lock removes the staging leftovers
        assert not (run.path / ".checkpoint.dcp.staging").exists()
