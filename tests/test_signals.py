"""Kills with real signals at named instants (``$OFE_PAUSE_AT``, see ``ofe.io.pause_point``): a
``SIGKILL`` or ``SIGINT`` anywhere leaves a run directory that ``--resume`` finishes with the same
weights and metrics as a run that was never interrupted."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ofe.cli import main
from ofe.run_dir import RunDir

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals at pause points are tested on Linux")

TIMING = {"tokens_per_s"}
THREADS = 1  # every part of a compared run computes on one thread: a 2-thread matmul may round differently
             # (seen on AMD EPYC), so a run resumed on another thread count is not bitwise the same run


@contextlib.contextmanager
def threads(n: int = THREADS):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_in_process(argv: list[str]) -> int:
    with threads():
        return main(argv)


def args(out: Path, corpus: Path) -> list[str]:
    return ["train", "--out_dir", str(out), "--preset", "tiny", "--steps", "6", "--batch_size", "4",
            "--eval_interval", "3", "--eval_batches", "1", "--monitor_interval", "2", "--ckpt_interval", "2",
            "--progress", "false", "--data.corpus", str(corpus)]


def start_paused(out: Path, corpus: Path, point: str) -> subprocess.Popen:
    """``ofe train`` in a subprocess, stopped (SIGSTOP) at ``point``."""
    env = {**os.environ, "OFE_PAUSE_AT": point, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.Popen([sys.executable, "-m", "ofe", *args(out, corpus)], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if line.strip() == f"ofe: paused at {point}":
            return proc
    proc.wait(timeout=60)
    raise AssertionError(f"never paused at {point} (exit {proc.returncode})")


@pytest.fixture(scope="module")
def whole(tmp_path_factory, small_corpus_module):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert train_in_process(args(out, small_corpus_module)) == 0
    return out




def assert_same_run(a: Path, b: Path) -> None:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(RunDir(a).read_metrics()) == strip(RunDir(b).read_metrics())


@pytest.mark.parametrize("point", ["step-1", "after-checkpoint-4", "checkpoint-set-aside", "before-weights"])
def test_sigkill_at_a_named_point_then_resume(tmp_path, whole, small_corpus_module, point):
    out = tmp_path / "run"
    proc = start_paused(out, small_corpus_module, point)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not RunDir(out).is_finished()
    assert train_in_process([*args(out, small_corpus_module), "--resume", "true"]) == 0
    assert_same_run(whole, out)


def test_sigint_stops_with_one_line_and_resume_finishes(tmp_path, whole, small_corpus_module):
    out = tmp_path / "run"
    proc = start_paused(out, small_corpus_module, "step-3")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read().strip().splitlines()
    assert err == ["ofe train: interrupted"]
    assert train_in_process([*args(out, small_corpus_module), "--resume", "true"]) == 0
    assert_same_run(whole, out)


@pytest.mark.parametrize("point,line", [("cli-imported", "ofe: interrupted"),  # while the libraries load
                                        ("quantize-evaluated", "ofe quantize: interrupted")])
def test_sigint_during_quantize_is_one_line_and_exit_130(tmp_path, whole, point, line):
    """Ctrl-C while the command line loads, and after ``ofe quantize`` evaluated but before it wrote: one
    line, exit 130, no quant.json, the run's lock released (a re-run quantises)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(whole, run)
    env = {**os.environ, "OFE_PAUSE_AT": point, "OMP_NUM_THREADS": str(THREADS)}
    argv = [sys.executable, "-m", "ofe", "quantize", str(run), "--eval_sequences", "4", "--sweep", "false"]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr.readline().strip() == f"ofe: paused at {point}"
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=60) == 130
    assert proc.stderr.read().strip().splitlines() == [line]
    assert not (run / "quant.json").exists()
    done = subprocess.run(argv, env={**env, "OFE_PAUSE_AT": ""}, capture_output=True, timeout=120)
    assert done.returncode == 0 and (run / "quant.json").is_file()
