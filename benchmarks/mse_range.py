"""The MSE weight-range search (100 clipping candidates per tensor): the vectorised search of
``ofe.quant.quantizers.quantize_weight`` against the candidate-by-candidate loop it replaced, on
the weight shapes of a GPT-2-small block (and the 22M encoder of issue 15's audit), in one run.

Interleaved repeats; prints seconds per tensor for each and the speed-up with a 95% interval, and
checks that both give identical weights.

    python benchmarks/mse_range.py
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from _timing import interleaved, ratio_ci

from ofe.quant.quantizers import fast_fake_quant, int_grid, quantize_weight, symmetric_scale

SHAPES = {"gpt2 c_attn (768 x 2304)": (768, 2304), "gpt2 mlp (3072 x 768)": (3072, 768),
          "gpt2 attn proj (768 x 768)": (768, 768), "MiniLM mlp (1536 x 384)": (1536, 384)}


def loop_search(w: torch.Tensor, bits: int = 8, grid: int = 100) -> torch.Tensor:
    """The previous implementation: one candidate at a time, keeping the best so far."""
    qmin, qmax = int_grid(bits, signed=True)
    max_abs = w.abs().amax()
    best, best_err = None, None
    for i in range(1, grid + 1):
        cand = fast_fake_quant(w, symmetric_scale(max_abs * (i / grid), bits), 0.0, qmin, qmax)
        err = (cand - w).square().sum()
        if best is None:
            best, best_err = cand, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    return best


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each side per shape (default: 5)")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'shape':<28} {'loop s':>8} {'vectorised s':>13} {'speed-up':>9} {'95% interval':>15}")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        w = torch.randn(shape) * 0.02
        assert torch.equal(loop_search(w), quantize_weight(w, 8, method="mse"))
        times = interleaved({"loop": lambda: loop_search(w), "vectorised": lambda: quantize_weight(w, 8, method="mse")},
                            args.repeats)
        lo, hi = ratio_ci(times["loop"], times["vectorised"])
        a, b = statistics.mean(times["loop"]), statistics.mean(times["vectorised"])
        print(f"{name:<28} {a:>8.3f} {b:>13.3f} {a / b:>8.2f}x {f'[{lo:.2f}, {hi:.2f}]':>15}")


if __name__ == "__main__":
    main()
