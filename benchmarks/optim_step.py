"""Optimiser step time: ofe SOAP (float32 products, and bfloat16 products: ``optim.rotation.matmul_dtype``;
each eager and with compiled element-wise kernels: ``optim.rotation.fused``) vs pytorch-optimizer SOAP vs torch AdamW; and whole training steps SOAP vs AdamW, at
precondition_frequency 10, in one run. Prints ratios and the CPU model.

Each optimiser owns an identical model copy; the timed steps are interleaved one by one (rotating
the order) so machine noise hits all alike. The first SOAP step (which only builds the
eigenbases with eigh) is excluded; the timed steps include the QR refreshes at their natural
frequency (one step in ten), so the means are steady-state costs.

    python benchmarks/optim_step.py                                     # small-cpu
    python benchmarks/optim_step.py --preset codeparrot-130m --layers 2 --steps 10 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _timing import cpu_name, interleaved, ratio_ci, train_step_flops

from ofe.models import GPT, lm_loss, preset
from ofe.optim import SOAP, param_groups


def make_optimizers(model_factory, lr: float, freq: int):
    import pytorch_optimizer

    def groups(model):
        return [g for g in param_groups(model, 0.01) if g["params"]]

    built = {}
    for name, kwargs in (("ofe SOAP", {}), ("ofe SOAP fused", {"fused": True}),
                         ("ofe SOAP bf16 products", {"matmul_dtype": torch.bfloat16}),
                         ("ofe SOAP bf16 products fused", {"matmul_dtype": torch.bfloat16, "fused": True})):
        m = model_factory()
        built[name] = (m, SOAP(groups(m), lr=lr, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=freq,
                               **kwargs))
    m = model_factory()
    built["pytorch-optimizer SOAP"] = (m, pytorch_optimizer.SOAP(groups(m), lr=lr, betas=(0.95, 0.95), weight_decay=0.01,
                                                                precondition_frequency=freq))
    m = model_factory()
    built["AdamW"] = (m, torch.optim.AdamW(groups(m), lr=lr, betas=(0.95, 0.95)))
    return built


def soap_products_flops(model, opt) -> float:
    """FLOPs of SOAP's per-step products, from its state: for a parameter of N elements rotated on a
    side of dimension d, rotating the gradient in, the update out (4 N d) and the factor update of
    that side (2 N d): 6 N d per rotated side. The basis refresh (every precondition_frequency steps)
    is not counted."""
    total = 0.0
    for p in model.parameters():
        state = opt.state[p]
        sides = [state[key].shape[0] for key in ("GG0", "GG1") if key in state]
        total += 6 * p.numel() * sum(sides)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-cpu", help="model preset (default: small-cpu)")
    p.add_argument("--layers", type=int, default=0, help="override the preset's depth (0: keep), to fit a CPU budget")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per training step (default: 16)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per optimiser (default: 20)")
    p.add_argument("--freq", type=int, default=10, help="precondition_frequency (default: 10)")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    args = p.parse_args()

    overrides = {"n_layer": args.layers} if args.layers else {}
    cfg = preset(args.preset, **overrides)

    def model_factory():
        torch.manual_seed(0)
        return GPT(cfg)

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.seq_len + 1), generator=g)
    built = make_optimizers(model_factory, lr=3e-3, freq=args.freq)
    ref_model = next(iter(built.values()))[0]
    loss = lm_loss(ref_model(batch[:, :-1]), batch[:, 1:])
    loss.backward()
    grads = [p.grad.detach().clone() for p in ref_model.parameters()]

    def step_only(model, opt):
        def run():
            for p, gr in zip(model.parameters(), grads):
                p.grad = gr
            opt.step()
        return run

    steppers = {name: step_only(m, o) for name, (m, o) in built.items()}
    for run in steppers.values():  # SOAP's first step builds the bases (eigh), the second compiles the
        run()                      # fused kernels (once per process: warm-up); neither is timed
        run()
    step_times = interleaved(steppers, args.steps)

    def train_step(model, opt):
        def run():
            loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    soaps = [name for name in built if name.startswith("ofe SOAP")]
    trainers = {name: train_step(*built[name]) for name in (*soaps, "AdamW")}
    train_times = interleaved(trainers, args.steps)

    mean = {k: statistics.fmean(v) for k, v in step_times.items()}
    tmean = {k: statistics.fmean(v) for k, v in train_times.items()}
    peer, adamw = "pytorch-optimizer SOAP", "AdamW"
    # Resample whole refresh periods (one QR refresh each) when there are enough of them.
    block = args.freq if args.steps >= 2 * args.freq else 1
    ratios = {}
    for ours in soaps:
        ratios[f"{ours} / {peer} (optimizer step; target <= 0.5)"] = (
            mean[ours] / mean[peer], ratio_ci(step_times[ours], step_times[peer], block=block))
        ratios[f"{ours} / {adamw} (training step; target <= 1.3)"] = (
            tmean[ours] / tmean[adamw], ratio_ci(train_times[ours], train_times[adamw], block=block))
    n_params = sum(p.numel() for p in ref_model.parameters())
    print(f"CPU: {cpu_name()}; preset {args.preset}{f' with {args.layers} layers' if args.layers else ''}: "
          f"{n_params / 1e6:.1f}M params, batch {args.batch_size} x {cfg.seq_len}; precondition_frequency {args.freq}; "
          f"{args.steps} timed steps; torch {torch.__version__}, {torch.get_num_threads()} threads; intervals resample "
          f"blocks of {block} interleaved rounds")
    for name, value in mean.items():
        print(f"  optimizer step  {name:<30} {value * 1e3:9.1f} ms")
    for name, value in tmean.items():
        print(f"  training step   {name:<30} {value * 1e3:9.1f} ms")
    for name, (r, ci) in ratios.items():
        print(f"{name:<80} {r:.3f}  (95% CI [{ci[0]:.3f}, {ci[1]:.3f}])")
    soap_model, soap_opt = built["ofe SOAP"]
    extra, step = soap_products_flops(soap_model, soap_opt), train_step_flops(soap_model, args.batch_size)
    print(f"SOAP's per-step products: {extra / 1e9:.2f} GFLOP = {extra / step:.2f} of a training step's "
          f"{step / 1e9:.2f} GFLOP (refresh not counted): at equal FLOP rates SOAP / AdamW >= {1 + extra / step:.2f}")
    r1, ci1 = ratios[f"ofe SOAP / {peer} (optimizer step; target <= 0.5)"]
    r2, ci2 = ratios[f"ofe SOAP / {adamw} (training step; target <= 1.3)"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "optimizer_step_s": mean, "train_step_s": tmean, "soap_vs_peer": r1,
                       "soap_vs_peer_ci95": ci1, "train_soap_vs_adamw": r2, "train_soap_vs_adamw_ci95": ci2,
                       "soap_products_gflop": extra / 1e9, "train_step_gflop": step / 1e9,
                       "ratios": {k: {"ratio": r, "ci95": ci} for k, (r, ci) in ratios.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
