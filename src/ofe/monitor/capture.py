"""Capture activations for one forward pass: hooks attached on entry, removed on exit (even on error).

The one place that attaches a temporary hook, records what it sees and removes it; the monitor's
long-lived hooks (:class:`ofe.monitor.OutlierMonitor`) are a different job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn


def _first_tensor(value: Any) -> Tensor:
    """A module's output, or the hidden state of a Hugging Face block's ``(hidden_states, ...)`` tuple."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _detached_float(x: Tensor) -> Tensor:
    return x.detach().float()


@contextlib.contextmanager
def capture(modules: Sequence[nn.Module], inputs: bool = False,
            keep: Callable[[Tensor], Tensor] = _detached_float) -> Iterator[list[Tensor | None]]:
    """Yield a list with one slot per module, filled by ``keep(x)`` when the module runs inside the
    block: ``x`` is its output (a tuple's first element), or with ``inputs`` its first positional
    input (else its ``hidden_states`` keyword, as Hugging Face blocks take it). A module that runs
    twice keeps its last value; one that does not run leaves ``None``."""
    seen: list[Tensor | None] = [None] * len(modules)

    def on_output(slot: int):
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            seen[slot] = keep(_first_tensor(out))
        return hook

    def on_input(slot: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[slot] = keep(args[0] if args else kwargs["hidden_states"])
        return hook

    handles = [m.register_forward_pre_hook(on_input(i), with_kwargs=True) if inputs
               else m.register_forward_hook(on_output(i)) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
