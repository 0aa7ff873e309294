"""Does `ofe train --compile true` pay on CPU? Eager against torch.compile'd train steps, one run.

For each precision asked (float32, bfloat16 autocast): the compile warm-up (the first steps of the
compiled trainer, against the same number of eager steps), then the steady step time of both,
interleaved so machine noise hits both alike, the speed-up with a 95% bootstrap interval, and the
break-even point: how many steps a run needs before the compile time is paid back.

    python benchmarks/compile_cpu.py                                  # small-cpu, batch 32, both precisions
    python benchmarks/compile_cpu.py --preset study-cpu --dtypes float32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _timing import cpu_name, interleaved, ratio_ci


def build_step(preset: str, batch_size: int, dtype: str, compile_: bool, out_dir: str):
    from ofe.train import build_train_config
    from ofe.train.loop import build_trainer

    cfg = build_train_config({"out_dir": out_dir, "preset": preset, "steps": 10**6, "batch_size": batch_size,
                              "progress": False, "monitor_interval": 10**6, "dtype": dtype, "device": "cpu",
                              "compile": compile_})
    trainer = build_trainer(cfg, log=lambda *a, **k: None)
    counter = iter(range(1, 10**9))
    return lambda: trainer._train_step(next(counter))


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--warmup", type=int, default=3, help="steps counted as the compile warm-up (default: 3)")
    p.add_argument("--steps", type=int, default=20, help="timed steady steps of each (default: 20)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.preset}, batch {args.batch_size}")
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as de, tempfile.TemporaryDirectory() as dc:
            eager = build_step(args.preset, args.batch_size, dtype, False, de)
            compiled = build_step(args.preset, args.batch_size, dtype, True, dc)
            first_eager = timed(eager, args.warmup)
            first_compiled = timed(compiled, args.warmup)
            times = interleaved({"eager": eager, "compiled": compiled}, args.steps)
        t_e, t_c = statistics.mean(times["eager"]), statistics.mean(times["compiled"])
        lo, hi = ratio_ci(times["eager"], times["compiled"])
        extra = first_compiled - first_eager
        gain = t_e - t_c
        payback = f"{extra / gain:.0f} steps" if gain > 0 else "never (compiled is not faster)"
        print(f"{dtype}: first {args.warmup} steps eager {first_eager:.1f} s, compiled {first_compiled:.1f} s; "
              f"steady {t_e * 1e3:.1f} vs {t_c * 1e3:.1f} ms/step: compiled speed-up {t_e / t_c:.2f}x "
              f"(95% interval [{lo:.2f}, {hi:.2f}]); compile time paid back after {payback}")


if __name__ == "__main__":
    main()
