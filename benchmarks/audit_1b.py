"""``ofe audit`` at a realistic size: a randomly initialised Llama-shaped model of ~1.1B parameters in
bf16 safetensors (TinyLlama's shape: width 2048, 22 blocks, 32 heads with 4 key-value heads, MLP 5632,
vocabulary 32000).

Writes the checkpoint once (``--model-dir``; ~2.2 GB), then runs, each in a fresh process so its peak
resident memory (``ru_maxrss``) is its own:

- the peer: transformers alone loads the checkpoint as ``ofe audit`` does (``dtype="auto"``) and runs one
  forward pass over the same number of windows: the least any audit must pay;
- ``ofe audit`` with its defaults (16 windows of 128 tokens, W8A8 calibration on 4 x 8 windows).

Prints the weights' size, each process's peak memory and wall time, and the ratios audit / weights
and audit / peer. Target (issue 26): the audit's peak memory <= 1.5x the weights' size.

    python benchmarks/audit_1b.py --model-dir /tmp/llama-1.1b
    python benchmarks/audit_1b.py --model-dir /tmp/llama-1.1b --json docs/results/performance/audit_1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import cpu_name

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def write_checkpoint(directory: Path, seed: int = 0) -> None:
    """config.json and model.safetensors (bf16): normal(0, 0.02) matrices, unit norm gains."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    config = tf.LlamaConfig(**SHAPE, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in tf.LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)


PEER = """
import resource, sys, time, torch, transformers as tf
t = time.perf_counter()
model = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, dtype="auto").eval()
with torch.no_grad():
    model(input_ids=torch.randint(0, 32000, (int(sys.argv[2]), int(sys.argv[3])), generator=torch.Generator().manual_seed(0)))
print("RESULT", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, next(model.parameters()).dtype)
"""

AUDIT = """
import resource, sys, time, warnings
from ofe.cli import main
warnings.simplefilter("ignore")  # the byte fallback's "no usable tokenizer" warning
t = time.perf_counter()
code = main(["audit", sys.argv[1], "--out_dir", sys.argv[4], "--sequences", sys.argv[2], "--seq_len", sys.argv[3]])
print("RESULT", time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code)
"""


def run(script: str, *args: str) -> tuple[float, float, str]:
    """(seconds, peak resident GiB, last field) of ``script`` run in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    _, seconds, kib, last = line.split(maxsplit=3)
    return float(seconds), int(kib) / 2**20, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "ofe-llama-1.1b"))
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    if not (model_dir / "model.safetensors").is_file():
        t = time.perf_counter()
        write_checkpoint(model_dir)
        print(f"wrote {model_dir} in {time.perf_counter() - t:.0f} s")
    weights = (model_dir / "model.safetensors").stat().st_size / 2**30
    peer_s, peer_gib, peer_dtype = run(PEER, str(model_dir), str(args.sequences), str(args.seq_len))
    with tempfile.TemporaryDirectory() as out:
        audit_s, audit_gib, code = run(AUDIT, str(model_dir), str(args.sequences), str(args.seq_len), f"{out}/audit")
        result = json.loads(Path(out, "audit", "audit.json").read_text())
    assert code == "0", f"ofe audit exited {code}"
    import torch

    numbers = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "parameters": result["parameters"], "audit_dtype": result["dtype"], "peer_dtype": peer_dtype,
        "weights_gib": weights, "sequences": args.sequences, "seq_len": args.seq_len,
        "peer_seconds": peer_s, "peer_peak_gib": peer_gib, "audit_seconds": audit_s, "audit_peak_gib": audit_gib,
        "audit_peak_over_weights": audit_gib / weights, "peer_peak_over_weights": peer_gib / weights,
        "audit_over_peer_memory": audit_gib / peer_gib, "audit_over_peer_time": audit_s / peer_s,
        "w8a8_increase_pct": result["w8a8"].get("increase_pct"),
    }
    print(f"{numbers['cpu']}, {numbers['threads']} threads, torch {numbers['torch']}")
    print(f"checkpoint: {result['parameters'] / 1e9:.3f}B parameters, weights {weights:.2f} GiB ({result['dtype']})")
    print(f"transformers load + 1 forward ({args.sequences} x {args.seq_len}): {peer_s:6.1f} s, peak {peer_gib:.2f} GiB "
          f"({numbers['peer_peak_over_weights']:.2f}x the weights)")
    print(f"ofe audit                               : {audit_s:6.1f} s, peak {audit_gib:.2f} GiB "
          f"({numbers['audit_peak_over_weights']:.2f}x the weights; target <= 1.5x)")
    print(f"audit / peer: time {numbers['audit_over_peer_time']:.2f}x, memory {numbers['audit_over_peer_memory']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
