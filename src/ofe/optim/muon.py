"""Muon for the hidden matrices, AdamW for everything else (issue 13; Jordan et al. 2024, and the
optimiser of OSP, Park et al. 2025, arXiv 2506.19697).

Which parameters go where, and why:

- **Muon** (``torch.optim.Muon``: momentum, then Newton-Schulz orthogonalisation of the update) gets
  the 2-D weights *inside* the blocks: q/k/v, the attention output projection, the MLP's matrices
  (``param_groups``' ``matrix`` group). Orthogonalising is meaningful for a linear map between two
  hidden spaces; its update has no per-coordinate normalisation, which is what OSP credits for the
  absence of outlier channels.
- **AdamW** gets the embeddings (token, position; the LM head is tied to the token embedding)
  and every vector or scalar (norm gains, biases, residual gains): a lookup table's rows are not a
  linear map to orthogonalise, and 1-D parameters have no matrix structure. This is the split of
  the Muon reference and of OSP.

One lr drives both: Muon's step is scaled with ``adjust_lr_fn = "match_rms_adamw"`` (Moonshot's
0.2 * sqrt(max(A, B))) so that its update RMS matches AdamW's and the schedule's lr fits both;
``"original"`` (Keller Jordan's sqrt(max(1, A/B))) is the alternative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class MuonAdamW:
    """``torch.optim.Muon`` over the ``matrix`` groups, ``torch.optim.AdamW`` over the others.

    Behaves as one optimiser to the trainer: ``param_groups`` (Muon's first; setting a group's
    ``lr`` schedules both), ``step``, ``zero_grad``, ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: str = "match_rms_adamw") -> None:
        matrices = [g for g in groups if g.get("kind") == "matrix"]
        others = [g for g in groups if g.get("kind") != "matrix"]
        if not matrices:
            raise ValueError("muon: the model has no hidden matrices to orthogonalise")
        self.muon = torch.optim.Muon(matrices, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                     adjust_lr_fn=adjust_lr_fn)
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=betas, eps=eps) if others else None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"muon", "adamw"}:
            raise ValueError("not a muon optimiser state (expected keys 'muon' and 'adamw')")
        self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])
