"""Training throughput of `ofe train`'s step vs Hugging Face GPT-2 (GPT2LMHeadModel), in one run.

Both train the same shape (width, depth, heads, sequence length, batch) with torch AdamW (weight
decay on matrices only), gradient clipping at 1.0, on the same standard-library batches. Steps are
interleaved one by one so machine noise hits both alike. The `ofe` side is the real training step
(`Trainer._train_step`: batch fetch, monitor gating, backward, clipping, update). Prints tokens/s and
the ratio ofe / peer with a paired bootstrap 95% interval. Target: >= 1.0 with the Pre-LN block.

    python benchmarks/train_throughput.py                     # small-cpu shape on CPU
    python benchmarks/train_throughput.py --match-gpt2        # ofe with GPT-2's biases and GELU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from _timing import interleaved, ratio_ci


def build_ofe(args, out_dir: str):
    from ofe.train import build_train_config
    from ofe.train.loop import build_trainer

    model = {"block": args.block}
    if args.match_gpt2:
        model.update(bias=True, activation="gelu")
    cfg = build_train_config({
        "out_dir": out_dir, "preset": args.preset, "steps": 10**6, "batch_size": args.batch_size, "progress": False,
        "monitor_interval": args.monitor_interval, "model": model, "device": args.device,
    })
    trainer = build_trainer(cfg, log=lambda *a, **k: None)
    counter = iter(range(1, 10**9))  # skip step 0 so the monitor's share is its steady-state one
    return trainer, (lambda: trainer._train_step(next(counter))), trainer.data.train


def build_peer(args, cfg, tokens):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ofe.data import train_batch

    torch.manual_seed(0)
    gcfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=cfg.mlp_width, activation_function="gelu",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(gcfg).to(args.device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    step = iter(range(1, 10**9))

    def train_step():
        batch = train_batch(tokens, args.batch_size, cfg.seq_len, 0, next(step)).to(args.device)
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-cpu", help="model shape (default: small-cpu)")
    p.add_argument("--block", default="pre-ln", help="ofe block (default: pre-ln)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per side (default: 60)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side (default: 3)")
    p.add_argument("--monitor-interval", type=int, default=10, help="ofe monitor interval, as `ofe train` (default: 10)")
    p.add_argument("--match-gpt2", action="store_true", help="give ofe GPT-2's biases and GELU (default: ofe's ReLU, no biases)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        trainer, ofe_step, tokens = build_ofe(args, f"{tmp}/run")
        cfg = trainer.cfg.model
        peer, peer_step = build_peer(args, cfg, tokens)
        n_ofe, n_peer = trainer.model.num_params(), sum(p.numel() for p in peer.parameters())
        for _ in range(args.warmup):
            ofe_step()
            peer_step()
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
        times = interleaved({"ofe": ofe_step, "peer": peer_step}, args.steps, sync=sync)
        trainer.monitor.close()

    tokens_per_step = args.batch_size * cfg.seq_len
    tps = {k: tokens_per_step / statistics.fmean(v) for k, v in times.items()}
    lo, hi = ratio_ci(times["peer"], times["ofe"])  # a speed ratio: peer time / ofe time
    print(f"shape {args.preset}: {cfg.n_layer} layers x {cfg.d_model} wide, {cfg.n_head} heads, seq {cfg.seq_len}, "
          f"batch {args.batch_size}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}")
    print(f"ofe {args.block}{' (GPT-2 biases + GELU)' if args.match_gpt2 else ' (ReLU, no biases)'}: {n_ofe / 1e6:.2f}M params, "
          f"{tps['ofe']:.0f} tokens/s")
    print(f"transformers GPT2LMHeadModel: {n_peer / 1e6:.2f}M params, {tps['peer']:.0f} tokens/s")
    print(f"ratio ofe / peer: {tps['ofe'] / tps['peer']:.3f}  (95% CI [{lo:.3f}, {hi:.3f}])")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tokens_per_s": tps, "ratio": tps["ofe"] / tps["peer"], "ratio_ci95": [lo, hi],
                       "params": {"ofe": n_ofe, "peer": n_peer}}, f, indent=1)


if __name__ == "__main__":
    main()
