"""Which modules the monitor observes: an ``ofe`` GPT's taps, named modules, or a block stack."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Target:
    """One observed module: its output is the activation of ``site`` at ``layer``."""

    site: str
    layer: int
    module: nn.Module
    is_tap: bool  # an ofe Tap: enabled only while observing


def find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest stack of same-class modules: an ``nn.ModuleList``, or an ``nn.ModuleDict`` keyed
    ``"0", "1", ...`` (torchtitan's ``layers``; returned as a list of the same modules, so that
    ``f"{name}.{i}"`` still names block ``i``): the block stack of a transformer."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleDict) and list(module.keys()) == [str(i) for i in range(len(module))]:
            module = nn.ModuleList(module.values())
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"no stack of blocks (nn.ModuleList) found in {type(model).__name__}; pass modules= or pattern=")
    return best


def _named_targets(model: nn.Module, modules: Sequence[str] | None, pattern: str | None) -> list[Target]:
    named = dict(model.named_modules())
    if modules is not None:
        missing = [m for m in modules if m not in named]
        if missing:
            raise ValueError(f"no module named {missing[0]!r} in {type(model).__name__}")
        chosen = list(modules)
    else:
        chosen = [n for n in named if n and re.fullmatch(pattern, n)]  # type: ignore[arg-type]
        if not chosen:
            raise ValueError(f"pattern {pattern!r} matches no module of {type(model).__name__}")
    return [Target("output", layer, named[name], is_tap=False) for layer, name in enumerate(chosen)]


def _tap_targets(model: nn.Module, sites: Sequence[str]) -> list[Target]:
    available = model.taps()  # type: ignore[operator]
    bad = [s for s in sites if s not in available]
    if bad:
        raise ValueError(f"unknown site(s) {bad}; known: {', '.join(available)}")
    return [Target(site, layer, tap, is_tap=True) for site in sites for layer, tap in available[site].items()]


def find_targets(model: nn.Module, sites: Sequence[str], modules: Sequence[str] | None = None,
                 pattern: str | None = None) -> list[Target]:
    """The modules to observe: ``modules``/``pattern`` if given (site ``output``), else an ``ofe``
    model's taps at ``sites``, else each block of the block stack (site ``resid``)."""
    if modules is not None or pattern is not None:
        return _named_targets(model, modules, pattern)
    if hasattr(model, "taps"):
        return _tap_targets(model, sites)
    _, stack = find_block_stack(model)
    return [Target("resid", layer, block, is_tap=False) for layer, block in enumerate(stack)]


def layer_modules(model: nn.Module, site: str = "resid") -> list[nn.Module]:
    """The per-layer modules of one site, in layer order: an ``ofe`` GPT's taps, else the block stack."""
    return [t.module for t in sorted(find_targets(model, (site,)), key=lambda t: t.layer)]
