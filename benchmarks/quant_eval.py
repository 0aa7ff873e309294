"""Time of W8A8 calibration + quantised evaluation vs float evaluation of the same batches, one run.

The model is a `small-cpu` GPT; calibration uses the protocol's 4 batches of 8 sequences from the
training split, evaluation the same validation windows for both. The quantised side includes
building the simulated model (deep copy, MSE weight-range search), calibration and evaluation.
Repeated `--repeats` times, alternating float and quantised, and the ratio of the mean times is
printed (target: <= 2).

    python benchmarks/quant_eval.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ofe.data import DataConfig, prepare, train_batch, val_windows
from ofe.models import GPT, preset
from ofe.quant import QuantConfig, SimulatedQuantModel, perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-cpu", help="model preset (default: small-cpu)")
    p.add_argument("--eval-sequences", type=int, default=128, help="validation windows evaluated (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each side (default: 3)")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    args = p.parse_args()

    torch.manual_seed(0)
    model = GPT(preset(args.preset)).eval()
    data = prepare(DataConfig(), log=lambda *a: None)
    T = model.cfg.seq_len
    windows = val_windows(data.val, args.eval_sequences, T)
    qcfg = QuantConfig()
    calib = [train_batch(data.train, qcfg.calib_batch_size, T, qcfg.seed, step=i)[:, :-1] for i in range(qcfg.calib_batches)]

    def float_eval() -> float:
        return perplexity(model, windows)

    phases: dict[str, list[float]] = {"build": [], "calibrate": [], "evaluate": []}

    def quant_eval() -> float:
        t0 = time.perf_counter()
        sim = SimulatedQuantModel(model, qcfg)
        t1 = time.perf_counter()
        sim.calibrate(calib)
        t2 = time.perf_counter()
        out = perplexity(sim, windows)
        t3 = time.perf_counter()
        for name, dt in (("build", t1 - t0), ("calibrate", t2 - t1), ("evaluate", t3 - t2)):
            phases[name].append(dt)
        return out

    times: dict[str, list[float]] = {"float": [], "W8A8": []}
    ppl = {}
    for _ in range(args.repeats):
        for name, fn in (("float", float_eval), ("W8A8", quant_eval)):
            t0 = time.perf_counter()
            ppl[name] = fn()
            times[name].append(time.perf_counter() - t0)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    phase_mean = {k: statistics.fmean(v) for k, v in phases.items()}
    ratio = mean["W8A8"] / mean["float"]
    print(f"preset {args.preset}, {args.eval_sequences} x {T} validation tokens, calibration "
          f"{qcfg.calib_batches} x {qcfg.calib_batch_size} x {T}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"float evaluation           {mean['float']:.2f} s   perplexity {ppl['float']:.3f}")
    print(f"W8A8 calibrate + evaluate  {mean['W8A8']:.2f} s   perplexity {ppl['W8A8']:.3f}")
    print(f"  of which: build (copy + weight quantisation) {phase_mean['build']:.2f} s, calibrate "
          f"{phase_mean['calibrate']:.2f} s, quantised evaluation {phase_mean['evaluate']:.2f} s")
    print(f"ratio: {ratio:.2f} (target <= 2); runs: {[round(t, 2) for t in times['W8A8']]} vs {[round(t, 2) for t in times['float']]}")
    print(f"quantised evaluation alone / float evaluation: {phase_mean['evaluate'] / mean['float']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": mean, "ratio": ratio, "ppl": ppl, "runs": times,
                       "phases_s": phase_mean, "evaluate_ratio": phase_mean["evaluate"] / mean["float"]}, f, indent=1)


if __name__ == "__main__":
    main()
