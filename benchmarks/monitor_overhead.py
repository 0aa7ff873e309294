"""Training-step time with the OutlierMonitor off, every 10 steps, and every step, in one run.

The three modes train identical copies of the same model on the same batches, interleaved step by
step (rotating the order) so machine drift hits every mode alike. Prints the mean step time per
mode, the ratio to "off" with a bootstrap 95% interval (targets: <= 1.01 every 10 steps, <= 1.10
every step).

    python benchmarks/monitor_overhead.py            # small-cpu, all metrics, every layer, resid + attn_probs
    python benchmarks/monitor_overhead.py --exact    # no sampling of MMR tokens / attention sequences
    python benchmarks/monitor_overhead.py --json out.json  # also write the numbers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform

import torch

from _timing import interleaved, mode_ratios

from ofe.data import default_sample, random_windows
from ofe.models import GPT, lm_loss, preset
from ofe.monitor import OFE_SITES, OutlierMonitor


def make_trainer(cfg, every: int | None, sites, metrics, exact: bool, batches: list[torch.Tensor]):
    """A zero-argument training step over ``batches`` (cycled), monitored every ``every`` steps."""
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampling = {"mmr_max_rows": None, "probs_max_batch": None} if exact else {}
    monitor = OutlierMonitor(model, every=every, sites=sites, metrics=metrics, **sampling) if every else None
    step = 0

    def train_step() -> None:
        nonlocal step
        batch = batches[step % len(batches)]
        with monitor.observe(step) if monitor else contextlib.nullcontext():
            loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.collect()
        step += 1

    return train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-cpu", help="model preset (default: small-cpu)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per mode, a multiple of 10 (default: 200)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first (default: 3)")
    p.add_argument("--sites", default="resid,attn_probs", help=f"monitored sites among {','.join(OFE_SITES)} (default: resid,attn_probs)")
    p.add_argument("--metrics", default="all", help="monitored metrics, comma-separated or 'all' (default: all)")
    p.add_argument("--exact", action="store_true", help="no sampling: MMR over every token, attention probs of every sequence")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    args = p.parse_args()
    if args.steps % 10:
        p.error("--steps must be a multiple of 10 so 'every 10' sees the same share of monitored steps")

    cfg = preset(args.preset)
    metrics = "all" if args.metrics == "all" else tuple(args.metrics.split(","))
    sites = tuple(args.sites.split(","))
    tokens = default_sample(4 << 20)
    batches = [random_windows(tokens, args.batch_size, cfg.seq_len + 1, seed=i) for i in range(20)]
    modes = {"off": None, "every 10": 10, "every 1": 1}
    trainers = {name: make_trainer(cfg, every, sites, metrics, args.exact, batches) for name, every in modes.items()}
    for train_step in trainers.values():
        for _ in range(args.warmup):
            train_step()
    per_step = interleaved(trainers, args.steps)

    print(f"preset {args.preset}, batch {args.batch_size} x {cfg.seq_len}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"sites {','.join(sites)}; metrics {args.metrics}; {'exact' if args.exact else 'default sampling'}; "
          f"{args.steps} steps per mode, interleaved step by step")
    result = {"preset": args.preset, "batch_size": args.batch_size, "seq_len": cfg.seq_len, "sites": sites,
              "metrics": args.metrics, "exact": args.exact, "steps": args.steps, "modes": mode_ratios(per_step)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
