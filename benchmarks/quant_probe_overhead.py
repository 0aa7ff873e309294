"""Cost of the quantisation probe (``ofe train --quant_probe N``) against the training it watches.

Builds the real ``ofe train`` parts for ``small-cpu`` (4.8M parameters, the standard-library corpus,
batch ``--batch-size``), times training steps (``Trainer._train_step``) and probe measurements
(``QuantProbe.measure``: W8A8 and W4A4 on 16 held-out windows, 2 calibration batches) alternately, and
prints the overhead of a probe every ``--every`` steps: probe time / (every x step time), with a
bootstrap 95% interval. Target (issue 26): <= 2% at every 100 steps.

    python benchmarks/quant_probe_overhead.py
    python benchmarks/quant_probe_overhead.py --every 100 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from _timing import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (10 train steps, one probe)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    from ofe.run_config import build_train_config
    from ofe.train.loop import build_trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = build_train_config({"preset": args.preset, "out_dir": f"{out}/run", "steps": 10**6, "batch_size": args.batch_size,
                                  "quant_probe": args.every, "progress": False, "monitor_interval": 10**6})
        trainer = build_trainer(cfg, log=lambda *a, **k: None)
        trainer._train_step(1)
        trainer.probe.measure(trainer.model)  # warm-up of both
        steps, probes, step = [], [], 2
        for _ in range(args.rounds):
            for _ in range(10):
                t = time.perf_counter()
                trainer._train_step(step)
                steps.append(time.perf_counter() - t)
                step += 1
            t = time.perf_counter()
            trainer.probe.measure(trainer.model)
            probes.append(time.perf_counter() - t)
    steps_a, probes_a = np.array(steps), np.array(probes)
    overhead = probes_a.mean() / (args.every * steps_a.mean())
    rng = np.random.default_rng(0)
    boot = [rng.choice(probes_a, probes_a.size).mean() / (args.every * rng.choice(steps_a, steps_a.size).mean())
            for _ in range(2000)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.preset}, batch {args.batch_size}")
    print(f"train step {steps_a.mean() * 1e3:.1f} ms; probe (W8A8 + W4A4) {probes_a.mean() * 1e3:.0f} ms")
    print(f"overhead at a probe every {args.every} steps: {100 * overhead:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                       "preset": args.preset, "batch_size": args.batch_size, "every": args.every,
                       "step_s": steps, "probe_s": probes, "overhead": float(overhead), "ci95": [float(lo), float(hi)]},
                      f, indent=1)


if __name__ == "__main__":
    main()
