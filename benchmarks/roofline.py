"""How far is `ofe train`'s step from what this processor can do? A CPU roofline, measured in one run.

1. The machine's sustained matrix-multiply throughput: a square GEMM (default 2048) in float32 and in
   bfloat16, GFLOP/s (2 n^3 per product).
2. The real training step (`Trainer._train_step`, the monitor off) in float32 and under bf16 autocast,
   its achieved FLOP/s, counted as 6 x parameters x tokens (forward + backward of every weight) plus
   the attention products 12 x layers x T^2 x d per sequence (QK^T and PV, forward and backward).
3. The ratios: achieved / GEMM peak of the same precision (a CPU "MFU"), and bf16 / fp32 step speed.

Steps are interleaved (fp32, bf16, fp32, ...) so machine noise hits both alike.

    python benchmarks/roofline.py                       # small-cpu, batch 32
    python benchmarks/roofline.py --preset study-cpu --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _timing import cpu_name, interleaved, ratio_ci, train_step_flops


def gemm_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def build_step(preset: str, batch_size: int, dtype: str, out_dir: str):
    from ofe.train import build_train_config
    from ofe.train.loop import build_trainer

    cfg = build_train_config({"out_dir": out_dir, "preset": preset, "steps": 10**6, "batch_size": batch_size,
                              "progress": False, "monitor_interval": 10**6, "dtype": dtype, "device": "cpu"})
    trainer = build_trainer(cfg, log=lambda *a, **k: None)
    counter = iter(range(1, 10**9))
    return trainer, (lambda: trainer._train_step(next(counter)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each precision (default: 20)")
    p.add_argument("--gemm", type=int, default=2048, help="GEMM size (default: 2048)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    peak = {name: gemm_gflops(args.gemm, dt, 10) for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    for name, value in peak.items():
        print(f"GEMM {args.gemm}^2 {name:<9} {value:9.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as d32, tempfile.TemporaryDirectory() as d16:
        t32, s32 = build_step(args.preset, args.batch_size, "float32", d32)
        t16, s16 = build_step(args.preset, args.batch_size, "bfloat16", d16)
        for _ in range(3):
            s32(), s16()
        times = interleaved({"float32": s32, "bfloat16": s16}, args.steps)
        flops = train_step_flops(t32.model, args.batch_size)
        print(f"train step ({args.preset}, batch {args.batch_size}, {flops / 1e9:.1f} GFLOP per step):")
        for name in ("float32", "bfloat16"):
            sec = statistics.mean(times[name])
            achieved = flops / sec / 1e9
            print(f"  {name:<9} {sec * 1e3:8.1f} ms/step  {achieved:8.1f} GFLOP/s  = {achieved / peak[name]:.2f} "
                  f"of the {name} GEMM rate")
        lo, hi = ratio_ci(times["float32"], times["bfloat16"])
        ratio = statistics.mean(times["float32"]) / statistics.mean(times["bfloat16"])
        print(f"  bf16 speed-up over float32: {ratio:.2f}x  (95% interval [{lo:.2f}, {hi:.2f}])")


if __name__ == "__main__":
    main()
