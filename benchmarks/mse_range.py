"""The MSE weight-range search (100 clipping candidates), in one run:

1. per weight tensor: ofe's search by sorting (``ofe.quant.quantizers._errors_by_sorting``: one sort
   and prefix sums, then a binary search per grid level and candidate) against quantising every
   candidate (``_errors_by_quantising``, still used for short rows), against the search as ofe had
   it before (:func:`quantize_weight_before`: quantise each candidate and keep the best tensor with
   ``torch.where``), and against PyTorch's own range search,
   ``torch.ao.quantization.HistogramObserver`` (an approximate L2 search on a 2048-bin histogram) as
   the peer; every ofe variant must give identical weights (asserted);
2. ``ofe audit`` of a randomly initialised 22M-parameter encoder with MiniLM-L6's shapes (BERT,
   6 layers, width 384; issue 15 timed the first audit of such a model at 47 s) as it is, against
   the audit as it was before (the search above, and the standard-library file list found by
   walking the whole tree, site-packages included, then filtering; both restored here).

Interleaved repeats; prints seconds and speed-ups with 95% intervals and the CPU model.

    python benchmarks/mse_range.py                 # both parts
    python benchmarks/mse_range.py --audit_repeats 0   # the tensors only
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile

import torch
from _timing import cpu_name, interleaved, ratio_ci

from ofe import audit as audit_module
from ofe.data import corpus
from ofe.quant import quantizers, simulate
from ofe.quant.quantizers import fast_fake_quant, int_grid, quantize_weight, symmetric_scale

SHAPES = {"gpt2 c_attn (768 x 2304)": (768, 2304), "gpt2 mlp (3072 x 768)": (3072, 768),
          "gpt2 attn proj (768 x 768)": (768, 768), "MiniLM mlp (1536 x 384)": (1536, 384)}


def quantize_weight_before(w, bits, per_channel=False, method="mse", grid=100, half_range=False):
    """``quantize_weight`` as ofe had it before the sorted search (commit 20502e4), for timing."""
    qmin, qmax = int_grid(bits, signed=True)
    w = w.float()
    dims = tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))
    max_abs = w.abs().amax(dim=dims, keepdim=True)
    best, best_err = None, None
    for i in range(1, grid + 1):
        candidate = fast_fake_quant(w, symmetric_scale(max_abs * (i / grid), bits, half_range), 0.0, qmin, qmax)
        err = (candidate - w).square().sum(dim=dims, keepdim=True)
        if best is None:
            best, best_err = candidate, err
        else:
            better = err < best_err
            best = torch.where(better, candidate, best)
            best_err = torch.where(better, err, best_err)
    return best


def stdlib_files_by_walking_everything(root=None):
    """The file list as ofe built it before: ``rglob`` through every package, then filter."""
    root = root or corpus.stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


@contextlib.contextmanager
def as_before():
    """The audit's two slow parts as they were: the previous search, the whole-tree walk."""
    saved = audit_module.stdlib_files, simulate.quantize_weight
    audit_module.stdlib_files, simulate.quantize_weight = stdlib_files_by_walking_everything, quantize_weight_before
    try:
        yield
    finally:
        audit_module.stdlib_files, simulate.quantize_weight = saved


@contextlib.contextmanager
def quantising_every_candidate():
    """Force the previous search (quantise each candidate) for every tensor."""
    saved = quantizers.SORT_SEARCH_MIN_RATIO
    quantizers.SORT_SEARCH_MIN_RATIO = float("inf")
    try:
        yield
    finally:
        quantizers.SORT_SEARCH_MIN_RATIO = saved


def loop_search(w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    with quantising_every_candidate():
        return quantize_weight(w, bits, per_channel=per_channel, method="mse")


def torch_histogram_search(w: torch.Tensor) -> torch.Tensor:
    """PyTorch's L2 range search for a per-tensor symmetric int8 weight, then the fake quantisation."""
    obs = torch.ao.quantization.HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    obs(w)
    scale, zero_point = obs.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(w, float(scale), int(zero_point), -128, 127)


def row(name: str, times: dict[str, list[float]], base: str, other: str) -> str:
    lo, hi = ratio_ci(times[base], times[other])
    a, b = statistics.mean(times[base]), statistics.mean(times[other])
    return f"{name:<44} {a:>8.3f} {b:>8.3f} {a / b:>9.2f}x {f'[{lo:.2f}, {hi:.2f}]':>14}"


def tensors(repeats: int) -> None:
    print(f"\n1. one weight tensor, 100 candidates: seconds per tensor (speed-up = {'loop'} / sorting)")
    print(f"{'tensor, range':<44} {'loop':>8} {'sorting':>8} {'speed-up':>10} {'95% interval':>14}")
    peers, befores = [], []
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        w = torch.randn(shape) * 0.02
        for bits, per_channel in ((8, False), (4, True)):
            if quantizers.SORT_SEARCH_MIN_RATIO * (2**bits - 1) > (shape[1] if per_channel else w.numel()):
                continue  # ofe quantises every candidate here too: nothing to compare
            now = quantize_weight(w, bits, per_channel, "mse")
            assert torch.equal(loop_search(w, bits, per_channel), now)
            assert torch.equal(quantize_weight_before(w, bits, per_channel), now)
            fns = {"loop": lambda: loop_search(w, bits, per_channel),
                   "sorting": lambda: quantize_weight(w, bits, per_channel, "mse"),
                   "before": lambda: quantize_weight_before(w, bits, per_channel)}
            if bits == 8 and not per_channel:
                fns["torch HistogramObserver"] = lambda: torch_histogram_search(w)
            times = interleaved(fns, repeats)
            label = f"{name}, W{bits} per-{'channel' if per_channel else 'tensor'}"
            print(row(label, times, "loop", "sorting"))
            befores.append(row(label, times, "before", "sorting"))
            if "torch HistogramObserver" in times:
                peers.append(row(label, times, "torch HistogramObserver", "sorting"))
    print("\n   against ofe before (commit 20502e4): seconds per tensor (speed-up = before / now)")
    print(f"{'tensor, range':<44} {'before':>8} {'now':>8} {'speed-up':>10} {'95% interval':>14}")
    print("\n".join(befores))
    print("\n   peer: seconds per tensor (speed-up = torch HistogramObserver / ofe sorting)")
    print(f"{'tensor, range':<44} {'torch':>8} {'sorting':>8} {'speed-up':>10} {'95% interval':>14}")
    print("\n".join(peers))


def audit_time(repeats: int) -> None:
    from transformers import BertConfig, BertModel

    from ofe.audit import AuditOptions, audit

    assert stdlib_files_by_walking_everything() == corpus.stdlib_files()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    model = BertModel(config)
    n = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        quiet = lambda *_: None  # noqa: E731

        def before():
            with as_before():
                return audit(d, AuditOptions(), log=quiet)

        a, b = before(), audit(d, AuditOptions(), log=quiet)  # warm-up, and the same W8A8 result
        assert a["w8a8"] == b["w8a8"], (a["w8a8"], b["w8a8"])
        times = interleaved({"before": before, "now": lambda: audit(d, AuditOptions(), log=quiet)}, repeats)
    print(f"\n2. ofe audit of a random {n / 1e6:.1f}M-parameter BERT (MiniLM-L6 shapes), W8A8 with MSE weight "
          f"ranges: seconds per audit")
    print(f"{'':<44} {'before':>8} {'now':>8} {'speed-up':>10} {'95% interval':>14}")
    print(row("ofe audit", times, "before", "now"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each side per tensor (default: 5)")
    p.add_argument("--audit_repeats", type=int, default=3, help="timed audits of each side; 0: skip (default: 3)")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    tensors(args.repeats)
    if args.audit_repeats:
        audit_time(args.audit_repeats)


if __name__ == "__main__":
    main()
