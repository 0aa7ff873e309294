"""``ofe train --parallel fsdp``: FSDP2 on 2 CPU processes (gloo, torchrun), sharded DCP checkpoints,
kills with real signals during and after a sharded save, and resuming at world size 1 and 2."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ofe.cli import main
from processes import descendants, wait_exited
from ofe.run_dir import PREVIOUS_SHARDED, SHARDED, SHARDED_STAGING, RunDir

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU is tested on Linux")

TIMING = {"tokens_per_s", "threads"}
EXACT_ACROSS_RANKS = {"kurtosis", "mmr", "input_correlation", "max_abs", "position0_share", "attention_entropy",
                      "attention_entropy_min", "attention_sink"}


def args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["train", "--out_dir", str(out), "--preset", "tiny", "--steps", "6", "--batch_size", "8",
            "--eval_interval", "3", "--eval_batches", "1", "--monitor_interval", "2", "--ckpt_interval", "2",
            "--progress", "false", "--parallel", "fsdp", "--quant_probe", "3", "--keep_weights", "true",
            "--data.corpus", str(corpus), *extra]


def torchrun(argv: list[str], pause: str | None = None) -> subprocess.Popen:
    """``torchrun --nproc_per_node 2 -m ofe ...`` in its own process group; with ``pause``, returned
    once a process has stopped itself there (``$OFE_PAUSE_AT``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pause:
        env["OFE_PAUSE_AT"] = pause
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "ofe", *argv], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    if pause:
        for line in proc.stderr:
            if f"ofe: paused at {pause}" in line:
                return proc
        proc.wait(timeout=120)
        raise AssertionError(f"never paused at {pause} (exit {proc.returncode})")
    return proc


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to torchrun and every worker, as a crash of the whole job would; returns once all have
    exited (the workers are not torchrun's to reap once it is dead, so waiting on it is not enough)."""
    pids = [*descendants(proc.pid), proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    wait_exited(pids, 60, "killed workers")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in RunDir(run).read_metrics()]


@pytest.fixture(scope="module")
def corpus(small_corpus_module):
    return small_corpus_module


@pytest.fixture(scope="module")
def whole(tmp_path_factory, corpus):
    """An uninterrupted 2-process FSDP run."""
    out = tmp_path_factory.mktemp("whole") / "run"
    finish(torchrun(args(out, corpus)))
    return out


def test_two_sharded_processes_train_as_one(whole, corpus, tmp_path):
    shards = sorted(p.name for p in (whole / SHARDED).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]  # one file of shards per process
    assert not (whole / PREVIOUS_SHARDED).exists() and not (whole / SHARDED_STAGING).exists()
    assert RunDir(whole).load_checkpoint()["step"] == 6
    one = tmp_path / "one"
    torch.manual_seed(0)
    assert main(args(one, corpus)) == 0  # world size 1: nothing sharded, same DCP checkpoints
    a, b = weights(one), weights(whole)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    for r1, r2 in zip(metrics(one), metrics(whole), strict=True):
        assert r1["step"] == r2["step"]
        for key in ("train_loss", "val_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (r1["step"], key)
        for key in EXACT_ACROSS_RANKS & r1.keys():  # the monitor logs the global batch's metrics on 2 ranks too
            assert r2[key] == pytest.approx(r1[key], rel=1e-6, abs=1e-9), (r1["step"], key)
        if "w8a8_probe_pct" in r1:  # the probe of the whole model, gathered from the shards on rank 0
            assert r2["w8a8_probe_pct"] == pytest.approx(r1["w8a8_probe_pct"], abs=1e-3), r1["step"]
    assert sum("w8a8_probe_pct" in r for r in metrics(whole)) == 3  # steps 0, 3 and the final record
    kept = load_file(whole / "weights" / "step_000003.st")  # kept at the evaluation of step 3, whole
    assert kept.keys() == b.keys() and all(kept[k].shape == b[k].shape for k in kept)


def test_killed_after_a_sharded_save_resumes_at_world_size_1_and_2(whole, corpus, tmp_path):
    killed = tmp_path / "killed"
    kill(torchrun(args(killed, corpus), pause="after-checkpoint-4"))
    assert RunDir(killed).load_checkpoint()["step"] == 4
    again = tmp_path / "again"
    shutil.copytree(killed, again)
    # world size 2 -> 1: DCP re-shards the 2-process checkpoint into one process's whole tensors
    assert main(args(killed, corpus, "--resume", "true")) == 0
    a, b = weights(killed), weights(whole)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # world size 2 -> 2: the same run as the uninterrupted one, bitwise
    finish(torchrun(args(again, corpus, "--resume", "true")))
    a = weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(again) == metrics(whole)


@pytest.mark.parametrize("point", ["shards-written-4", "checkpoint-set-aside"])
def test_killed_during_a_sharded_save_never_loads_it(whole, corpus, tmp_path, point):
    """Killed with every shard written but the directory not yet in place, or with the old checkpoint
    set aside: the step-2 checkpoint is what resumes, and the run ends as the uninterrupted one."""
    out = tmp_path / "run"
    kill(torchrun(args(out, corpus), pause=point))
    state = RunDir(out).load_checkpoint()
    assert state["step"] == 2 and Path(state["shards"]).name in (SHARDED, PREVIOUS_SHARDED)
    finish(torchrun(args(out, corpus, "--resume", "true")))
    a, b = weights(out), weights(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(out) == metrics(whole)
    assert not (out / SHARDED_STAGING).exists() and not (out / PREVIOUS_SHARDED).exists()


def test_fsdp_refuses_optimisers_that_need_whole_matrices(tmp_path, capsys, corpus):
    assert main(args(tmp_path / "x", corpus, "--optim.name", "soap")) == 2
    err = capsys.readouterr().err.strip()
    assert "needs whole matrices" in err and "optim.name adamw" in err and len(err.splitlines()) == 1
