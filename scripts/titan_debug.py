"""ofe inside a torchtitan training job, on a GPU: torchtitan's Llama 3 debug model (6 blocks, width 256)
trained by torchtitan's own Trainer, with ofe's outlier monitor logging to its TensorBoard and, by choice,
ofe's SOAP / Muon through torchtitan's optimiser container (ofe.titan).

Needs a CUDA GPU (torchtitan's trainer), ``pip install 'ofe[titan]'`` and a checkout of torchtitan's
repository for its test assets (the tokenizer and the small c4_test dataset are not in the wheel)::

    git clone https://github.com/pytorch/torchtitan /tmp/torchtitan
    torchrun --standalone --nproc_per_node 1 scripts/titan_debug.py --titan_repo /tmp/torchtitan --optimizer ofe.SOAP --op
    torchrun --standalone --nproc_per_node 1 scripts/titan_debug.py --titan_repo /tmp/torchtitan --optimizer AdamW
    torchrun --standalone --nproc_per_node 2 scripts/titan_debug.py --titan_repo /tmp/torchtitan --optimizer AdamW --fsdp

The metrics land in ``<dump_folder>/tb`` as ``ofe/<site>/<metric>/layer<i>``. With ``--fsdp`` the parameters
are sharded (FSDP2), which only AdamW takes; SOAP and Muon run replicated (data_parallel_replicate).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch


def debug_config(optimizer: str, lr: float, steps: int, every: int, fsdp: bool, world: int, dump_folder: str,
                 op: bool = False):
    """torchtitan's llama3 debug config as an :class:`ofe.titan.OutlierTrainer` config, trained by
    ``optimizer``; ``op``: its blocks converted to Outlier Protected blocks."""
    from torchtitan.components.optimizer import ParamGroupConfig
    from torchtitan.models.llama3 import model_registry
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from ofe.titan import OfeOptimizers, OutlierProtectedBlocks, OutlierSettings, OutlierTrainer

    base = llama3_debugmodel()
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__ if not f.startswith("_")}
    if op:
        fields["model_spec"] = model_registry("debugmodel", converters=[OutlierProtectedBlocks.Config()])
    groups = [ParamGroupConfig(pattern=r".*", optimizer_name=optimizer, optimizer_kwargs={"lr": lr})]
    if optimizer == "ofe.Muon":  # embeddings, head and norms by AdamW
        groups.insert(0, ParamGroupConfig(pattern=r"tok_embeddings|lm_head|norm", optimizer_name="AdamW",
                                          optimizer_kwargs={"lr": lr}))
    parallelism = dataclasses.replace(base.parallelism, data_parallel_shard_degree=world if fsdp else 1,
                                      data_parallel_replicate_degree=1 if fsdp else world)
    config = OutlierTrainer.Config(**{**fields, "optimizer": OfeOptimizers.Config(param_groups=groups),
                                      "parallelism": parallelism, "dump_folder": dump_folder,
                                      "training": dataclasses.replace(base.training, steps=steps)},
                                   outliers=OutlierSettings(every=every))
    config.metrics.enable_tensorboard = True
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--titan_repo", required=True, help="a checkout of github.com/pytorch/torchtitan (test assets)")
    parser.add_argument("--optimizer", default="ofe.SOAP", choices=["AdamW", "ofe.SOAP", "ofe.Muon", "ofe.RotatedAdafactor"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--every", type=int, default=10, help="monitor every this many steps")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 over the processes (AdamW only)")
    parser.add_argument("--op", action="store_true", help="Outlier Protected blocks (ofe.titan.OutlierProtectedBlocks)")
    parser.add_argument("--dump_folder", default="runs/titan-debug")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("titan_debug.py: error: torchtitan's trainer needs a CUDA GPU (ofe.titan's parts are tested on "
                         "the CPU in tests/test_titan.py)")

    from torchtitan.tools.logging import init_logger

    init_logger()
    dump = Path(args.dump_folder).resolve()
    os.chdir(args.titan_repo)  # the debug config names its assets relative to the repository
    config = debug_config(args.optimizer, args.lr, args.steps, args.every, args.fsdp,
                          int(os.environ.get("WORLD_SIZE", "1")), str(dump), op=args.op)
    trainer = config.build()
    try:
        trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
