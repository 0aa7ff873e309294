"""The monitor's cost across data-parallel ranks: training-step time with the monitor off, every 10
steps and every step, under DDP or FSDP2, with every rank's partial sums gathered on monitored steps
(one ``all_gather``: the global batch's metrics, as ``ofe train`` logs them).

Launch with torchrun; the three modes train identical copies of the model on the same batches,
interleaved step by step (rotating the order), and rank 0 prints the mean step time per mode and its
ratio to "off" with a bootstrap 95% interval (target, issue 27: <= 1.01 every 10 steps).

    torchrun --standalone --nproc_per_node=2 benchmarks/monitor_overhead_distributed.py --parallel ddp
    torchrun --standalone --nproc_per_node=2 benchmarks/monitor_overhead_distributed.py --parallel fsdp --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from _timing import cpu_name, interleaved, mode_ratios

from ofe.data import default_sample, random_windows
from ofe.models import GPT, lm_loss, preset
from ofe.monitor import OutlierMonitor
from ofe.monitor.measure import TRAIN_METRICS, gather_across_ranks
from ofe.train import distributed as D
from ofe.train import sharded as S


def make_trainer(cfg, every: int | None, parallel: str, env: D.DistEnv, batches: list[torch.Tensor]):
    """A zero-argument training step over this rank's slice of ``batches`` (cycled)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    monitor = None
    if every:
        monitor = OutlierMonitor(model, every=every, metrics=TRAIN_METRICS)
        monitor.shard(env.rank, env.world_size)
    if parallel == "fsdp":
        S.shard(model, env, "float32")
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = 0

    def train_step() -> None:
        nonlocal step
        batch = batches[step % len(batches)]
        local = batch.chunk(env.world_size)[env.rank]
        if monitor is None:
            loss = lm_loss(wrapped(local[:, :-1]), local[:, 1:])
            loss.backward()
        else:
            with monitor.observe(step):
                loss = lm_loss(wrapped(local[:, :-1]), local[:, 1:])
                loss.backward()
            monitor.collect(gather_across_ranks)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

    return train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--batch-size", type=int, default=16, help="global sequences per step (default: 16)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per mode, a multiple of 10 (default: 100)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="")
    args = p.parse_args()
    env = D.setup("cpu")
    cfg = preset(args.preset)
    tokens = default_sample(4 << 20)
    batches = [random_windows(tokens, args.batch_size, cfg.seq_len + 1, seed=i) for i in range(20)]
    modes = {"off": None, "every 10": 10, "every 1": 1}
    trainers = {name: make_trainer(cfg, every, args.parallel, env, batches) for name, every in modes.items()}
    for train_step in trainers.values():
        for _ in range(args.warmup):
            train_step()
    per_step = interleaved(trainers, args.steps)
    if env.is_main:
        print(f"{args.parallel}, {env.world_size} processes x {torch.get_num_threads()} threads, {cpu_name()}, "
              f"torch {torch.__version__}; preset {args.preset}, global batch {args.batch_size} x {cfg.seq_len}; "
              f"monitor: ofe train's metrics, gathered across ranks; {args.steps} steps per mode, interleaved")
        result = {"parallel": args.parallel, "world_size": env.world_size, "threads": torch.get_num_threads(),
                  "cpu": cpu_name(), "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
                  "modes": mode_ratios(per_step)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    D.teardown()


if __name__ == "__main__":
    main()
