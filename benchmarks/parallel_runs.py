"""Two small runs one after the other on every core, against the same two runs side by side on
cores / 2 threads each: the throughput behind ``ofe reproduce --workers`` (issue 25, item 5).

The runs are the main job's: Pre-LN + AdamW and OP + SOAP on the Bigram-Backcopy shape
(``backcopy-cpu``, batch 16), the real ``ofe train`` step (``Trainer._train_step``, monitor every 75
steps as in the study), each arm twice (so that side by side pairs equal runs, as a long queue of runs
keeps both workers busy). Each arrangement is repeated ``--repeats`` times, alternating, so machine
drift hits both; prints the wall time of each and the speed-up of side by side, with a bootstrap 95%
interval over the repeats.

    python benchmarks/parallel_runs.py                   # 150 steps per run, 3 repeats
    python benchmarks/parallel_runs.py --steps 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from _timing import cpu_name

STUDY = {"preset": "backcopy-cpu", "batch_size": 16, "eval_interval": 10**9, "monitor_interval": 75,
         "ckpt_interval": 10**9, "dtype": "float32", "progress": False,
         "data": {"corpus": "bigram-backcopy", "bos": True},
         "optim": {"weight_decay": 0.0, "decay": "linear", "warmup_frac": 0.05}}
ARMS = (("pre-ln", "adamw", 1e-2), ("op", "soap", 3e-3))


def train_steps(arm: tuple[str, str, float], steps: int, threads: int) -> float:
    """Build one run of ``arm`` and time ``steps`` training steps on ``threads`` threads (seconds)."""
    from ofe.run_config import build_train_config
    from ofe.train.loop import build_trainer

    torch.set_num_threads(threads)
    block, optimizer, lr = arm
    with tempfile.TemporaryDirectory() as out:
        cfg = build_train_config({**STUDY, "out_dir": f"{out}/run", "steps": steps + 1,
                                  "model": {"activation": "gelu", "block": block},
                                  "optim": {**STUDY["optim"], "name": optimizer, "lr": lr}})
        trainer = build_trainer(cfg, log=lambda *a, **k: None)
        trainer._train_step(0)  # first step: allocations, SOAP's first eigendecomposition
        start = time.perf_counter()
        for step in range(1, steps + 1):
            trainer._train_step(step)
        return time.perf_counter() - start


def one_after_the_other(steps: int, cores: int) -> float:
    """Each arm twice, one run at a time on every core (seconds)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        start = time.perf_counter()
        for arm in ARMS:
            for _ in range(2):
                pool.apply(train_steps, (arm, steps, cores))
        return time.perf_counter() - start


def side_by_side(steps: int, cores: int) -> float:
    """Each arm twice, its two runs side by side on cores / 2 threads each (seconds). Pairing equal runs
    measures the throughput a long queue of runs sees, without the tail of one run left alone."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        start = time.perf_counter()
        for arm in ARMS:
            pending = [pool.apply_async(train_steps, (arm, steps, max(1, cores // 2))) for _ in range(2)]
            for p in pending:
                p.get()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    sequential, parallel = [], []
    for _ in range(args.repeats):
        sequential.append(one_after_the_other(args.steps, cores))
        parallel.append(side_by_side(args.steps, cores))
    ratios = np.array(sequential) / np.array(parallel)
    rng = np.random.default_rng(0)
    boot = [float(np.mean(rng.choice(ratios, ratios.size))) for _ in range(2000)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print(f"{cpu_name()}, {cores} cores, torch {torch.__version__}; two runs of {args.steps} steps of each of "
          f"{', '.join(f'{b} + {o}' for b, o, _ in ARMS)}, {args.repeats} repeats")
    print(f"one after the other on {cores} threads: {statistics.mean(sequential):.1f} s")
    print(f"side by side on {max(1, cores // 2)} thread(s) each: {statistics.mean(parallel):.1f} s")
    print(f"speed-up of side by side: {ratios.mean():.2f}x [{lo:.2f}, {hi:.2f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "cores": cores, "torch": torch.__version__, "platform": platform.platform(),
                       "steps": args.steps, "sequential_s": sequential, "parallel_s": parallel,
                       "speedup": float(ratios.mean()), "ci95": [float(lo), float(hi)]}, f, indent=1)


if __name__ == "__main__":
    main()
