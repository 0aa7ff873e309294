"""Cost of the kurtosis-update decomposition in `ofe train`: training steps with the tracker updated
every `--every` steps (as at monitor steps) against the same steps without it, interleaved.

The peer is the trainer's own step without the tracker (`decomposition_sequences = 0`), so the ratio
is the share of training time the decomposition adds at that interval.

    python benchmarks/decomposition_overhead.py                       # small-cpu, batch 32, every 10
    python benchmarks/decomposition_overhead.py --preset study-cpu --every 20
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from _timing import interleaved, ratio_ci


def build(args, out_dir: str, sequences: int):
    from ofe.train import build_train_config
    from ofe.train.loop import build_trainer

    cfg = build_train_config({
        "out_dir": out_dir, "preset": args.preset, "steps": 10**6, "batch_size": args.batch_size, "progress": False,
        "monitor_interval": args.every, "decomposition_sequences": sequences, "device": args.device,
    })
    trainer = build_trainer(cfg, log=lambda *a, **k: None)
    step = iter(range(1, 10**9))

    def one_step() -> None:
        s = next(step)
        if trainer.tracker is not None and s % args.every == 0:
            trainer.tracker.update()
        trainer._train_step(s)

    return trainer, one_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-cpu", help="model preset (default: small-cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    p.add_argument("--every", type=int, default=10, help="decomposition interval in steps (default: 10)")
    p.add_argument("--sequences", type=int, default=8, help="fixed validation sequences (default: 8, the ofe train default)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per contender (default: 200)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        with_tracker, step_with = build(args, a, args.sequences)
        without, step_without = build(args, b, 0)
        interleaved({"with": step_with, "without": step_without}, args.every, sync)  # warm-up
        times = interleaved({"with": step_with, "without": step_without}, args.steps, sync)
        for t in (with_tracker, without):
            t.monitor.close()
    ratio = sum(times["with"]) / sum(times["without"])
    lo, hi = ratio_ci(times["with"], times["without"], block=args.every)
    result = {"preset": args.preset, "batch_size": args.batch_size, "every": args.every, "sequences": args.sequences,
              "steps": args.steps, "device": args.device, "s_per_step_without": sum(times["without"]) / args.steps,
              "s_per_step_with": sum(times["with"]) / args.steps, "ratio": ratio, "ratio_ci95": [lo, hi]}
    print(f"{args.preset}, batch {args.batch_size}, decomposition on {args.sequences} sequences every {args.every} steps")
    print(f"  without: {result['s_per_step_without'] * 1e3:.1f} ms/step   with: {result['s_per_step_with'] * 1e3:.1f} ms/step")
    print(f"  ratio with / without: {ratio:.3f}  (95% CI {lo:.3f}-{hi:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
