"""`ofe sweep`: the grid, strict specs, skipping finished runs and resuming an interrupted one."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from ofe.cli import main
from processes import descendants, wait_exited
from ofe.config import ConfigError
from ofe.experiment import parse_spec, run_sweep
from ofe.train import loop as loop_module
from ofe.run_dir import RunDir
from ofe.train import train


def spec(root, corpus, **extra):
    s = {"out_dir": str(root),
         "base": {"preset": "tiny", "steps": 8, "batch_size": 4, "eval_interval": 4, "eval_batches": 1,
                  "monitor_interval": 2, "ckpt_interval": 4, "data": {"corpus": str(corpus)}, "optim": {"lr": 3e-3}},
         "grid": {"model.block": ["pre-ln", "op"], "seed": [0, 1]}}
    s.update(extra)
    return s


def test_grid_is_the_product_with_readable_names(tmp_path, small_corpus):
    sweep = parse_spec(spec(tmp_path, small_corpus, variants=[{"name": "slow", "optim.lr": 1e-4}, {"name": "fast"}]))
    names = [r.name for r in sweep.runs]
    assert names == ["slow_pre-ln_seed0", "slow_pre-ln_seed1", "slow_op_seed0", "slow_op_seed1",
                     "fast_pre-ln_seed0", "fast_pre-ln_seed1", "fast_op_seed0", "fast_op_seed1"]
    first = sweep.runs[0].config
    assert first.optim.lr == 1e-4 and first.model.block == "pre-ln" and first.seed == 0
    assert sweep.runs[-1].config.optim.lr == 3e-3 and sweep.runs[-1].config.model.block == "op"
    assert first.out_dir == str(tmp_path / "slow_pre-ln_seed0")


@pytest.mark.parametrize("change, needle", [
    ({"grid": {"optim.lrr": [1e-3]}}, "lrr"),
    ({"grid": {"steps": ["many"]}}, "steps"),
    ({"grid": {"seed": []}}, "seed"),
    ({"bogus": 1}, "bogus"),
    ({"variants": [{"optim.lr": 1.0}]}, "name"),
])
def test_bad_specs_fail_before_training_naming_the_key(tmp_path, small_corpus, change, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_spec(spec(tmp_path / "sweep", small_corpus, **change))
    assert not (tmp_path / "sweep").exists()


def test_sweep_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path, small_corpus, monkeypatch):
    s = spec(tmp_path / "sweep", small_corpus, grid={"model.block": ["pre-ln", "op"]})
    original = loop_module.Trainer._train_step

    def dies_in_op_at_step_6(self, step):
        if step == 6 and self.cfg.model.block == "op":
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(loop_module.Trainer, "_train_step", dies_in_op_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(parse_spec(s), progress=False, log=lambda m: None)
    first, second = tmp_path / "sweep" / "pre-ln", tmp_path / "sweep" / "op"
    assert (first / "model.safetensors").is_file() and not (second / "model.safetensors").exists()
    done_bytes = (first / "model.safetensors").read_bytes()
    monkeypatch.setattr(loop_module.Trainer, "_train_step", original)

    calls = []
    real_train = train

    def counting_train(cfg, log=print):
        calls.append((cfg.out_dir, cfg.resume))
        return real_train(cfg, log=log)

    monkeypatch.setattr("ofe.experiment.sweep.train", counting_train)
    assert main(["sweep", str(_write(tmp_path, s)), "--progress", "false"]) == 0
    assert calls == [(str(second), True)]  # the finished run is skipped, the other resumed
    assert (first / "model.safetensors").read_bytes() == done_bytes

    whole = tmp_path / "whole"  # the same run, never interrupted
    settings = json.loads((second / "sweep_run.json").read_text())
    from ofe.train import build_train_config
    real_train(build_train_config({**settings, "out_dir": str(whole), "progress": False}), log=lambda *a: None)
    a, b = load_file(whole / "model.safetensors"), load_file(second / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
    assert strip(RunDir(whole).read_metrics()) == strip(RunDir(second).read_metrics())

    calls.clear()  # everything finished: nothing runs again
    assert main(["sweep", str(_write(tmp_path, s)), "--progress", "false"]) == 0
    assert calls == []


def test_a_changed_spec_does_not_reuse_old_run_directories(tmp_path, small_corpus, capsys):
    s = spec(tmp_path / "sweep", small_corpus, grid={"model.block": ["op"]})
    s["base"]["steps"] = 2
    assert main(["sweep", str(_write(tmp_path, s)), "--progress", "false"]) == 0
    s["base"]["device"] = "cpu"  # how it runs, not what it computes: still the same runs
    assert main(["sweep", str(_write(tmp_path, s)), "--progress", "false"]) == 0
    s["base"]["optim"]["lr"] = 1e-2
    assert main(["sweep", str(_write(tmp_path, s)), "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different spec" in err[0]


def test_sweep_quantises_and_dry_run_lists_states(tmp_path, small_corpus, capsys):
    s = spec(tmp_path / "sweep", small_corpus, grid={"model.block": ["op"]}, quantize=True)
    s["base"]["steps"] = 2
    path = _write(tmp_path, s)
    assert main(["sweep", str(path), "--dry_run", "true"]) == 0
    assert "new" in capsys.readouterr().out
    assert main(["sweep", str(path), "--progress", "false"]) == 0
    quant = json.loads((tmp_path / "sweep" / "op" / "quant.json").read_text())
    assert quant["w8a8_ppl"] > 1.0
    capsys.readouterr()
    assert main(["sweep", str(path), "--dry_run", "true"]) == 0
    assert capsys.readouterr().out.split()[0] == "done"


def _write(tmp_path, s):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(s))
    return path


def test_a_second_sweep_on_the_same_directory_is_refused(tmp_path, small_corpus, capsys):
    import fcntl
    s = spec(tmp_path / "sweep", small_corpus, grid={"model.block": ["op"]})
    (tmp_path / "sweep").mkdir()
    with open(tmp_path / "sweep" / ".sweep.lock", "w") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["sweep", str(_write(tmp_path, s)), "--progress", "false"]) == 2
        assert "another ofe sweep (pid" in capsys.readouterr().err
        fcntl.flock(held, fcntl.LOCK_UN)
    assert not (tmp_path / "sweep" / "op").exists()


@pytest.mark.parametrize("command", ["reproduce", "remedies"])
def test_a_second_study_on_the_same_directory_is_refused(tmp_path, small_corpus, capsys, command):
    """ofe reproduce and ofe remedies hold the folder for their whole work (sweep, quantisation, outputs)."""
    import fcntl
    out = tmp_path / "study"
    out.mkdir()
    with open(out / ".study.lock", "w") as held:  # as a running study holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main([command, "--out_dir", str(out), "--preset", "tiny", "--steps", "2", "--corpus", str(small_corpus),
                     "--progress", "false"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"another ofe {command} (pid" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == [".study.lock"]


@pytest.mark.parametrize("variants,grid", [([{"name": "../escape"}], None), ([{"name": ".hidden"}], None),
                                           (None, {"data.glob": ["..", "*.py"]})])
def test_names_that_would_escape_the_sweep_folder_are_refused(tmp_path, small_corpus, capsys, variants, grid):
    s = spec(tmp_path / "sweep", small_corpus)
    if variants:
        s["variants"] = variants
    if grid:
        s["grid"] = grid
    assert main(["sweep", str(_write(tmp_path, s)), "--progress", "false"]) == 2
    assert "cannot name a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "spec.json"]  # nothing created


def test_parallel_workers_train_the_same_runs_as_one_at_a_time(tmp_path, small_corpus, capsys):
    """`--workers 2`: two runs at a time in their own processes on cpu_count / 2 threads each; every run's
    weights and quantisation equal a one-at-a-time sweep's on as many threads (same seeds, same data)."""
    s = spec(tmp_path / "par", small_corpus, quantize=True)
    s["base"]["steps"] = 4
    assert main(["sweep", str(_write(tmp_path, s)), "--progress", "false", "--workers", "2"]) == 0
    assert "2 at a time" in capsys.readouterr().out
    threads, before = max(1, (os.cpu_count() or 1) // 2), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one = dict(s, out_dir=str(tmp_path / "one"))
        run_sweep(parse_spec(one), progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    for name in ("pre-ln_seed0", "pre-ln_seed1", "op_seed0", "op_seed1"):
        a, b = load_file(tmp_path / "par" / name / "model.safetensors"), load_file(tmp_path / "one" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        qa, qb = (json.loads((tmp_path / d / name / "quant.json").read_text()) for d in ("par", "one"))
        assert qa["w8a8_ppl"] == qb["w8a8_ppl"]
        final = [json.loads(line) for line in (tmp_path / "par" / name / "metrics.jsonl").read_text().splitlines()][-1]
        assert final["threads"] == threads  # each worker ran on cpu_count / 2 threads, recorded with the run
    with pytest.raises(ConfigError, match="workers"):
        run_sweep(parse_spec(one), workers=0)


def test_a_damaged_sweep_settings_file_is_one_line(tmp_path, small_corpus, capsys):
    s = spec(tmp_path / "sweep", small_corpus, grid={"model.block": ["op"]})
    s["base"]["steps"] = 2
    path = _write(tmp_path, s)
    assert main(["sweep", str(path), "--progress", "false"]) == 0
    (tmp_path / "sweep" / "op" / "sweep_run.json").write_text("[]")
    capsys.readouterr()
    assert main(["sweep", str(path), "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep_run.json holds a list" in err[0], err


def _sweep_with_both_workers_paused(tmp_path, corpus):
    """``ofe sweep --workers 2`` over two runs in a subprocess (its own session), returned once both
    workers have stopped themselves at step 3; also its spec and spec file."""
    import subprocess
    s = spec(tmp_path / "sweep", corpus, grid={"model.block": ["pre-ln", "op"]})
    path = _write(tmp_path, s)
    argv = [sys.executable, "-m", "ofe", "sweep", str(path), "--progress", "false", "--workers", "2"]
    proc = subprocess.Popen(argv, env={**os.environ, "OFE_PAUSE_AT": "step-3"}, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    paused = 0
    for line in proc.stderr:
        paused += line.strip() == "ofe: paused at step-3"
        if paused == 2:  # both runs stopped themselves at the same instant
            return s, path, proc
    proc.wait(timeout=60)
    raise AssertionError(f"the workers never paused at step 3 (exit {proc.returncode})")


def test_ctrl_c_during_a_parallel_sweep_is_one_line_and_a_rerun_finishes(tmp_path, small_corpus):
    """A terminal's Ctrl-C (SIGINT to the process group) while both workers are at a named instant:
    `ofe sweep` ends with one "interrupted" line and exit code 130; re-running it finishes every run,
    each with the weights of an uninterrupted sweep."""
    import signal
    s, path, proc = _sweep_with_both_workers_paused(tmp_path, small_corpus)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGCONT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    ours = [line for line in rest.splitlines() if line.startswith("ofe sweep")]
    assert ours == ["ofe sweep: interrupted"] and "Traceback" not in rest, rest
    assert main(["sweep", str(path), "--progress", "false", "--workers", "2"]) == 0
    reference = dict(s, out_dir=str(tmp_path / "reference"))
    threads, before = max(1, (os.cpu_count() or 1) // 2), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_sweep(parse_spec(reference), progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    for name in ("pre-ln", "op"):
        a = load_file(tmp_path / "sweep" / name / "model.safetensors")
        b = load_file(tmp_path / "reference" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.skipif(sys.platform != "linux", reason="the workers die with the sweep through Linux's PR_SET_PDEATHSIG")
@pytest.mark.parametrize("sig, code, line", [("SIGTERM", 143, "ofe sweep: terminated (SIGTERM); re-run the command to resume"),
                                             ("SIGKILL", -9, None)])
def test_a_signal_to_the_sweep_alone_leaves_no_worker_running(tmp_path, small_corpus, sig, code, line):
    """A scheduler's SIGTERM (or a SIGKILL) to the `ofe sweep` process only, not its process group,
    while both workers are stopped inside their runs: the workers die with it (they used to train on as
    orphans, holding their runs' locks); SIGTERM also gives one line and exit code 143; a re-run finishes."""
    import signal
    import subprocess
    _, path, proc = _sweep_with_both_workers_paused(tmp_path, small_corpus)
    workers = descendants(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(getattr(signal, sig))
    try:
        _, rest = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep waiting on its stopped workers, or orphaned workers
        proc.communicate()
        raise AssertionError(f"`ofe sweep` or a worker (holding its stderr) still running 60 s after {sig}") from None
    assert proc.returncode == code, rest
    ours = [text for text in rest.splitlines() if text.startswith("ofe sweep")]
    assert ours == ([line] if line else []) and "Traceback" not in rest, rest
    wait_exited(workers, 30, "a worker of the dead sweep")
    assert main(["sweep", str(path), "--progress", "false", "--workers", "2"]) == 0
    assert all(RunDir(tmp_path / "sweep" / name).is_finished() for name in ("pre-ln", "op"))
