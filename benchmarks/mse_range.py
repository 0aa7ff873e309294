"""The MSE weight-range search (100 clipping candidates per tensor): ``ofe``'s candidate-by-candidate
loop (``ofe.quant.quantizers.quantize_weight``) against a batched search over all candidates at once
(chunked to 2^24 values), on the weight shapes of a GPT-2-small block and of the 22M encoder of issue
15's audit, in one run. On an idle 2-core Xeon the batched search was *slower* (0.44-1.1x), so ofe
keeps the loop; this benchmark is how to re-check that on another machine.

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

CHUNK_ELEMENTS = 1 << 24  # candidate values held at once by the batched search (64 MiB of float32)

SHAPES = {"gpt2 c_attn (768 x 2304)": (768, 2304), "gpt2 mlp (3072 x 768)": (3072, 768),
          "gpt2 attn proj (768 x 768)": (768, 768), "MiniLM mlp (1536 x 384)": (1536, 384)}


def batched_search(w: torch.Tensor, bits: int = 8, grid: int = 100) -> torch.Tensor:
    """Every candidate range at once (chunked): squared error per candidate, the first minimum (as
    the loop's strict "<" keeps), then one quantisation. Per-tensor range."""
    qmin, qmax = int_grid(bits, signed=True)
    max_abs = w.abs().amax()
    fractions = torch.arange(1, grid + 1, dtype=torch.float32) / grid
    scales = symmetric_scale(max_abs * fractions, bits).view(-1, *[1] * w.dim())  # (G, 1, 1)
    chunk = max(1, CHUNK_ELEMENTS // max(1, w.numel()))
    errors = []
    for start in range(0, grid, chunk):
        candidates = fast_fake_quant(w.unsqueeze(0), scales[start : start + chunk], 0.0, qmin, qmax)
        errors.append((candidates - w).square_().sum(dim=tuple(range(1, w.dim() + 1))))
    best = int(torch.cat(errors).argmin())
    return fast_fake_quant(w, scales[best], 0.0, qmin, qmax)


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
    print(f"{'shape':<28} {'loop s':>8} {'batched s':>10} {'batched speed-up':>17} {'95% interval':>15}")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        w = torch.randn(shape) * 0.02
        assert torch.equal(batched_search(w), quantize_weight(w, 8, method="mse"))
        times = interleaved({"loop": lambda: quantize_weight(w, 8, method="mse"), "batched": lambda: batched_search(w)},
                            args.repeats)
        lo, hi = ratio_ci(times["loop"], times["batched"])
        a, b = statistics.mean(times["loop"]), statistics.mean(times["batched"])
        print(f"{name:<28} {a:>8.3f} {b:>10.3f} {a / b:>16.2f}x {f'[{lo:.2f}, {hi:.2f}]':>15}")


if __name__ == "__main__":
    main()
