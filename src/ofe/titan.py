"""ofe inside a torchtitan job (torchtitan 0.3; ``pip install 'ofe[titan]'``), through torchtitan's own
extension points:

* **Optimisers**: :class:`OfeOptimizers`, a subclass of torchtitan's ``OptimizersContainer`` whose factory
  table adds ofe's optimisers by name to torchtitan's (``Adam``, ``AdamW``, ``DistMuon``): ``ofe.SOAP``,
  ``ofe.RotatedAdafactor``, ``ofe.Adafactor`` and ``ofe.Muon`` (``torch.optim.Muon`` with ofe's defaults,
  for 2-D hidden matrices; give embeddings, the head and norms an ``AdamW`` group, as torchtitan's
  ``param_groups`` patterns allow). Put it in a config as ``optimizer=ofe_optimizer("ofe.SOAP", lr=3e-3)``.
  SOAP and the rotated optimisers need whole matrices: they refuse FSDP2-sharded (DTensor) parameters in
  one line (run them with ``parallelism.data_parallel_shard_degree 1``, replicated).
* **The OP block**: :class:`OutlierProtectedBlocks`, a torchtitan ``ModelConfigConverter`` that turns a
  Llama 3 config's blocks into He et al.'s Outlier Protected block (:class:`OPBlock`): no norm in the
  block (block 0 keeps its attention-input norm), ``x += beta_a Attn(x); x += beta_m MLP(x)`` with trainable
  betas initialised at ``1/sqrt(n_layers)``, QK-RMSNorm for entropy regulation. Pass it where torchtitan
  takes converters: ``model_registry("debugmodel", converters=[OutlierProtectedBlocks.Config()])``.
* **The monitor**: :class:`OutlierTrainer`, a subclass of torchtitan's ``Trainer`` whose ``train_step`` is
  observed by an :class:`ofe.monitor.OutlierMonitor` on the model's block stack every
  ``outliers.every`` steps; the metrics (``ofe/<site>/<metric>/layer<i>`` and ``.../max``, as the Hugging
  Face callback names them) go to torchtitan's metric loggers (TensorBoard, W&B). Under data parallelism
  each rank's partial sums are gathered, so the logged values are the global batch's
  (:mod:`ofe.monitor.reduce`).

torchtitan runs on GPUs only (its device is CUDA when there is no other accelerator); the optimisers and
the monitor are tested here on torchtitan's own Llama 3 model built on the CPU
(``tests/test_titan.py``); ``scripts/titan_debug.py`` is the GPU job (docs/scale.md says what has run).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ofe.callbacks import scalars
from ofe.monitor import OutlierMonitor
from ofe.monitor.measure import gather_across_ranks, gather_local

try:
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
    from torchtitan.models.llama3.model import Llama3TransformerBlock
    from torchtitan.protocols.model import ModelConfigConverter
    from torchtitan.trainer import Trainer
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError("ofe.titan needs torchtitan: pip install 'ofe[titan]' (torchtitan 0.3, which needs triton)") from e

IMPLEMENTATION_KEYS = ("fused", "foreach")  # torchtitan's per-group implementation flags, meant for torch.optim


def _own_groups(groups: list[dict[str, Any]], name: str, whole_matrices: bool) -> list[dict[str, Any]]:
    """torchtitan's param groups without its implementation flags (ofe's rotated optimisers have their own
    ``fused``); a string ``matmul_dtype`` becomes a dtype. Refuses sharded (DTensor) parameters where the
    optimiser needs whole matrices."""
    from torch.distributed.tensor import DTensor

    out = []
    for group in groups:
        group = {k: v for k, v in group.items() if k not in IMPLEMENTATION_KEYS}
        if isinstance(group.get("matmul_dtype"), str):
            group["matmul_dtype"] = getattr(torch, group["matmul_dtype"])
        if whole_matrices and any(isinstance(p, DTensor) for p in group["params"]):
            raise ValueError(f"{name} needs whole matrices, but torchtitan sharded the parameters (FSDP2 / TP): set "
                             "parallelism.data_parallel_shard_degree 1 and tensor_parallel_degree 1, or use AdamW")
        out.append(group)
    return out


def _soap(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    from ofe.optim.rotated import SOAP

    return SOAP(_own_groups(groups, "ofe.SOAP", True), **kwargs)


def _rotated_adafactor(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    from ofe.optim.rotated import RotatedAdafactor

    return RotatedAdafactor(_own_groups(groups, "ofe.RotatedAdafactor", True), **kwargs)


def _adafactor(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    from ofe.optim.adafactor import Adafactor

    return Adafactor(_own_groups(groups, "ofe.Adafactor", True), **kwargs)


def _muon(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    groups = _own_groups(groups, "ofe.Muon", True)
    names = [n for g in groups for p, n in zip(g["params"], g.get("param_names", [""] * len(g["params"])))
             if p.dim() != 2]
    if names:
        raise ValueError(f"ofe.Muon orthogonalises 2-D matrices only; {names[0]} is not one: match it (and the "
                         "embeddings and head) with an AdamW param group placed before the Muon one")
    return torch.optim.Muon(groups, **{"adjust_lr_fn": "match_rms_adamw", **kwargs})


class OPBlock(Llama3TransformerBlock):
    """The Outlier Protected block in torchtitan's Llama 3 (ofe's ``op`` block, :mod:`ofe.models.blocks`):
    ``h = x + beta_a * Attn(N0(x)); out = h + beta_m * MLP(h)``, ``N0`` the attention-input norm of block 0
    only (identity elsewhere), the betas trainable scalars (shape ``(1,)``, so FSDP2 can shard them)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Llama3TransformerBlock.Config):
        beta: float = 1.0
        first: bool = False  # block 0: keeps a norm on its attention input (the OP block's first norm)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        if not config.first:
            del self.attention_norm
        del self.ffn_norm
        self.beta_init = config.beta
        self.attn_beta = nn.Parameter(torch.empty(1))
        self.mlp_beta = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchtitan's ``init_states`` calls this for the block's own parameters (the betas)."""
        with torch.no_grad():
            self.attn_beta.fill_(self.beta_init)
            self.mlp_beta.fill_(self.beta_init)

    def forward(self, x: torch.Tensor, attention_masks: Any, positions: torch.Tensor | None = None) -> torch.Tensor:
        attn_in = self.attention_norm(x) if hasattr(self, "attention_norm") else x
        h = x + self.attn_beta * self.attention(attn_in, attention_masks, positions)
        return h + self.mlp_beta * self.feed_forward(h)


class OutlierProtectedBlocks(ModelConfigConverter):
    """torchtitan model converter: every Llama 3 block becomes an :class:`OPBlock` (with QK-RMSNorm)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        qk_norm: bool = True  # entropy regulation; without it the OP block's attention can collapse (C3a)

    def __init__(self, config: Config) -> None:
        self.config = config

    def convert(self, model_config: Any) -> Any:
        layers = model_config.layers
        blocks = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, Llama3TransformerBlock.Config):
                raise ValueError(f"OutlierProtectedBlocks converts Llama 3 blocks; layer {i} is {type(layer).__name__}")
            fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if f.init}
            block = OPBlock.Config(**fields, beta=1 / math.sqrt(len(layers)), first=i == 0)
            if self.config.qk_norm:
                head_dim = block.attention.qkv_linear.head_dim
                norm = dataclasses.replace(block.attention_norm, normalized_shape=head_dim)
                block.attention = dataclasses.replace(block.attention, qk_norm=norm)
            blocks.append(block)
        model_config.layers = blocks
        return model_config


FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "ofe.SOAP": _soap, "ofe.RotatedAdafactor": _rotated_adafactor, "ofe.Adafactor": _adafactor, "ofe.Muon": _muon,
}


class OfeOptimizers(OptimizersContainer):
    """torchtitan's optimiser container, with ofe's optimisers by name (``FACTORIES``) beside its own."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        implementation: str = "for-loop"  # ofe's optimisers run their own kernels; AdamW groups: torch's default

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
        if name in FACTORIES:
            return FACTORIES[name]
        return OptimizersContainer._resolve_optimizer_factory(name)


def ofe_optimizer(name: str, lr: float, pattern: str = r".*", **kwargs: Any) -> OfeOptimizers.Config:
    """One param group over every parameter matching ``pattern``, trained by ``name`` (a key of
    :data:`FACTORIES`, or torchtitan's ``AdamW``...) at ``lr`` with ``kwargs``."""
    return OfeOptimizers.Config(param_groups=[ParamGroupConfig(pattern=pattern, optimizer_name=name,
                                                               optimizer_kwargs={"lr": lr, **kwargs})])


@dataclass(kw_only=True, slots=True)
class OutlierSettings:
    """What :class:`OutlierTrainer` measures: every ``every`` steps, ``metrics`` (ofe.monitor's names)."""

    every: int = 10
    metrics: list[str] = field(default_factory=lambda: ["kurtosis", "max_median_ratio", "rms"])


def attach_monitor(model_parts: list[nn.Module], settings: OutlierSettings) -> OutlierMonitor:
    """The monitor on the block stack of the last model part (the whole model without pipelining)."""
    return OutlierMonitor(model_parts[-1], every=settings.every, metrics=list(settings.metrics))


def data_parallel_gather(parallel_dims: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A gather over the data-parallel ranks (each saw its own slice of the global batch), or None (each
    rank logs its own) where ranks hold other shards of the same activations or other blocks (tensor,
    context, pipeline or expert parallel: not combined here)."""
    if any(getattr(parallel_dims, f"{kind}_enabled", False) for kind in ("tp", "cp", "pp", "ep")):
        return None
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return None
    return gather_across_ranks


class OutlierTrainer(Trainer):
    """torchtitan's trainer with ofe's outlier monitor on its training steps."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        outliers: OutlierSettings = field(default_factory=OutlierSettings)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.outlier_monitor = attach_monitor(self.model_parts, config.outliers)
        self.outlier_gather = data_parallel_gather(self.parallel_dims)

    def train_step(self, data_iterator):
        with self.outlier_monitor.observe(self.step):
            super().train_step(data_iterator)
        results = self.outlier_monitor.collect(self.outlier_gather or gather_local)
        if results:
            self.metrics_processor.logger.log(scalars(results), self.step)
