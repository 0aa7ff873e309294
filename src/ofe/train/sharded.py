"""FSDP2 for ``ofe train --parallel fsdp``: sharding the model per block, and its checkpoints through
``torch.distributed.checkpoint`` (DCP).

Each process holds 1/world of every parameter, gradient and AdamW state (``fully_shard`` on every
block, then on the whole model); a block's parameters are gathered for its forward and backward only.
A checkpoint is a DCP directory (one file per process plus DCP's metadata) that loads at any world
size: DCP re-shards on load. With one process nothing is sharded, but checkpoints are still DCP
directories, so a run moves freely between 1 and N processes. Where the directory lives, and how it
replaces the previous one atomically, is :class:`ofe.run_dir.RunDir`'s business.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ofe.models import GPT, GPTConfig
from ofe.train.distributed import DistEnv


def is_sharded(env: DistEnv, parallel: str) -> bool:
    """Whether this run's parameters are sharded: FSDP with more than one process."""
    return parallel == "fsdp" and env.world_size > 1


def shard(model: GPT, env: DistEnv, dtype: str) -> None:
    """``fully_shard`` every block, then the model (embeddings, final norm, head), in place. Parameters
    are stored in float32; with ``dtype`` bfloat16 they are gathered and computed in bf16 and gradients
    reduced in float32. Call before building the optimiser (the parameters become DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                  reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every process writes its shards of the weights and the optimiser state into ``directory``
    (collective)."""
    import torch.distributed.checkpoint as dcp  # here, as below: ~1 s that runs without FSDP do not pay
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_quietly():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))


def load(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load ``directory`` (written at any world size) into this process's shards (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to fill, optimiser state included
    state = {"model": model_state, "optimizer": optim_state}
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def gathered(model: GPT, config: GPTConfig, env: DistEnv, parallel: str) -> GPT | None:
    """The whole model, for what runs on the main process alone (final and kept weights, the
    quantisation probe): the model itself when it is not sharded; else every process takes part in
    gathering the weights (collective) and the main process gets an unsharded copy, the others None."""
    if not is_sharded(env, parallel):
        return model if env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    plain = GPT(config)
    plain.load_state_dict(weights)
    return plain.to(env.device).train(model.training)


def reduce_norm(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_``'s result as a plain tensor: under FSDP2 it is a DTensor (a partial norm
    per shard), whose full value needs a collective."""
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) and dist.is_initialized() else norm


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (all but the last micro-batch of a step): DDP's ``no_sync``, or
    FSDP2's ``set_requires_gradient_sync(False)``."""
    if hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield
