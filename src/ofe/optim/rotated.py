"""Optimisers that run a diagonal rule in Shampoo's eigenbasis: SOAP (Adam) and rotated AdaFactor.

For a matrix parameter with gradient ``G`` (``m x n``) the rotation keeps EMA Kronecker factors
``L = E[G G^T]`` and ``R = E[G^T G]`` (decay ``shampoo_beta``) and their eigenbases ``Q_L``, ``Q_R``.
Each step the gradient is rotated, ``G' = Q_L^T G Q_R``; the diagonal rule runs on ``G'`` with its
moments kept in that basis; the update is rotated back, ``U = Q_L U' Q_R^T``. The bases come from
``eigh`` at the first step (which only builds them, as in the reference algorithm) and are then
refreshed every ``precondition_frequency`` steps by one QR power-iteration step warm-started from the
old basis, with the rule's second-moment state re-ordered to follow the estimated eigenvalues and the
first moment rotated into the new basis. A side longer than ``max_precond_dim`` is not rotated; 1-D
parameters get the diagonal rule unrotated.

Diagonal rules are objects (:class:`AdamRule`: SOAP, Vyas et al. 2024; :class:`AdafactorRule`: factored
second moments on the rotated gradient, with update clipping, the paper's "rotated AdaFactor"); the
rotation never asks which rule it runs.

Implementation: state in float32 whatever the parameter dtype (float64 for float64 parameters);
element-wise work with ``torch._foreach`` ops, or (``fused``) as compiled one-pass kernels applied one
parameter at a time (:mod:`ofe.optim.fused`); with bf16 products (``matmul_dtype``) the products of
same-shaped parameters batched into one ``bmm`` each; the eigh/QR refresh batched over same-sized
factors; no host syncs in a step. A failed float32
``eigh`` is retried in float64 and counted in the param group's ``eigh_fallbacks``. Under
``torch.distributed`` the refreshed bases are broadcast from rank 0, so every rank keeps identical
parameters even where eigh/QR are not bitwise deterministic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ofe.optim import fused
from ofe.optim.adafactor import (
    beta2_at,
    clip_update,
    init_second_moment,
    reorder_second_moment,
    second_moment,
    state_dtype,
)



class AdamRule:
    """Adam's second moment, kept element-wise in the rotated basis."""

    def init_state(self, state: dict[str, Any], shape: torch.Size, device: torch.device, dtype: torch.dtype) -> None:
        state["v"] = torch.zeros(shape, device=device, dtype=dtype)

    def directions(self, states: list[dict[str, Any]], g_rot: list[Tensor], moments: list[Tensor],
                   group: dict[str, Any], t: int) -> list[Tensor]:
        """``m / (sqrt(v) + eps)`` in the rotated basis, after updating ``v``."""
        beta2 = group["betas"][1]
        second = [s["v"] for s in states]
        torch._foreach_mul_(second, beta2)
        torch._foreach_addcmul_(second, g_rot, g_rot, value=1.0 - beta2)
        denom = torch._foreach_sqrt(second)
        torch._foreach_add_(denom, group["eps"])
        return torch._foreach_div(moments, denom)

    def fused_direction(self, state: dict[str, Any], g_rot: Tensor, group: dict[str, Any], t: int,
                        scalars: dict[str, Tensor]) -> Tensor:
        """Both moments and ``m / (sqrt(v) + eps)`` in one pass (:mod:`ofe.optim.fused`), returned in
        ``g_rot``'s dtype (the products' dtype, ready to be rotated back)."""
        return fused.run("adam_moments_and_direction", state["m"], state["v"], g_rot, scalars["beta1"],
                         scalars["beta2"], scalars["eps"], out_dtype=g_rot.dtype)

    def second_moment_correction(self, beta2: float, t: int) -> float:
        """Factor of the step size that bias-corrects the second moment."""
        return math.sqrt(1.0 - beta2**t)

    def reorder(self, state: dict[str, Any], side: int, index: Tensor) -> None:
        """Follow a re-sorted basis along ``side``."""
        state["v"] = state["v"].index_select(side, index)


class AdafactorRule:
    """AdaFactor's factored second moment on the rotated gradient, with update clipping."""

    def init_state(self, state: dict[str, Any], shape: torch.Size, device: torch.device, dtype: torch.dtype) -> None:
        init_second_moment(state, shape, device, dtype)

    def directions(self, states: list[dict[str, Any]], g_rot: list[Tensor], moments: list[Tensor],
                   group: dict[str, Any], t: int) -> list[Tensor]:
        beta2 = group["betas"][1]
        beta2_t = beta2_at(t, beta2, group["beta2_decay"])
        directions = []
        for s, g, m in zip(states, g_rot, moments):
            v_hat = second_moment(s, g, beta2_t, group["eps1"])
            if group["beta2_decay"] is None and group["bias_correction"]:
                v_hat.div_(1.0 - beta2**t)
            directions.append(clip_update(m / v_hat.sqrt().add_(group["eps"]), group["d"]))
        return directions

    def fused_direction(self, state: dict[str, Any], g_rot: Tensor, group: dict[str, Any], t: int,
                        scalars: dict[str, Tensor]) -> Tensor:
        """The first moment in a compiled pass; the factored second moment eagerly."""
        g = g_rot.to(state["m"].dtype)
        fused.run("ema", state["m"], g, 1.0 - scalars["beta1"])
        return self.directions([state], [g], [state["m"]], group, t)[0].to(g_rot.dtype)

    def second_moment_correction(self, beta2: float, t: int) -> float:
        return 1.0  # corrected inside directions(), or not at all with a decaying beta2

    def reorder(self, state: dict[str, Any], side: int, index: Tensor) -> None:
        reorder_second_moment(state, side, index)



def _rotated_sides(shape: torch.Size, max_dim: int) -> list[bool]:
    """Which sides (rows, columns) of a parameter get a basis; 1-D parameters get none."""
    if len(shape) != 2:
        return [False, False]
    return [shape[0] <= max_dim, shape[1] <= max_dim]


def rotate(x: Tensor, q: list[Tensor | None]) -> Tensor:
    """``Q_L^T x Q_R`` (a missing side is the identity)."""
    if q[0] is not None:
        x = q[0].mT @ x
    if q[1] is not None:
        x = x @ q[1]
    return x


def rotate_back(x: Tensor, q: list[Tensor | None]) -> Tensor:
    """``Q_L x Q_R^T``."""
    if q[0] is not None:
        x = q[0] @ x
    if q[1] is not None:
        x = x @ q[1].mT
    return x


class RotatedOptimizer(torch.optim.Optimizer):
    """A diagonal rule in Shampoo's eigenbasis. Use :class:`SOAP` or :class:`RotatedAdafactor`.

    Per-group options: ``lr``, ``betas``, ``eps``, ``weight_decay`` (decoupled, applied after the
    update as in the reference), ``shampoo_beta`` (None: ``betas[1]``), ``precondition_frequency``,
    ``max_precond_dim``, ``bias_correction``, ``matmul_dtype`` (the dtype of the per-step matrix
    products: rotating the gradient and the update, and the factors' increments ``G G^T``, ``G^T G``;
    float32 or bfloat16, the state and the eigh/QR refresh stay float32), ``fused`` (run the element-wise
    work as compiled one-pass kernels, :mod:`ofe.optim.fused`; same results up to rounding); rotated AdaFactor also
    ``beta2_decay``, ``eps1``, ``d``.
    """

    def __init__(self, params, rule: AdamRule | AdafactorRule, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.01, shampoo_beta: float | None = None,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000, bias_correction: bool = True,
                 beta2_decay: float | None = None, eps1: float = 1e-30, d: float = 1.0,
                 matmul_dtype: torch.dtype = torch.float32, fused: bool = False) -> None:
        if precondition_frequency < 1:
            raise ValueError(f"precondition_frequency must be >= 1, got {precondition_frequency}")
        if matmul_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"matmul_dtype must be torch.float32 or torch.bfloat16, got {matmul_dtype}")
        self.rule = rule
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, shampoo_beta=shampoo_beta,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        bias_correction=bias_correction, beta2_decay=beta2_decay, eps1=eps1, d=d,
                        matmul_dtype=matmul_dtype, fused=fused, step=0, eigh_fallbacks=0)
        super().__init__(params, defaults)
        # Low-precision copies of the bases for bf16 products, stacked over parameters of one shape and
        # laid out for batched products; made once per refresh, kept out of the state (and so of
        # checkpoints). Keyed by the members' state ids and the dtype; cleared at a refresh and on load.
        self._low_bases: dict[tuple, tuple[Tensor | None, Tensor | None, Tensor | None]] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping the saved float32 state (torch casts state to the parameter dtype)."""
        self._low_bases.clear()
        how = [group["fused"] for group in self.param_groups]  # how to run is this optimiser's, not the file's
        super().load_state_dict(state_dict)
        for group, fused_ in zip(self.param_groups, how):
            group["fused"] = fused_
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(index, {}).items():
                    if isinstance(value, Tensor):
                        self.state[p][key] = value.to(device=p.device, copy=True)

    # ---- state ---------------------------------------------------------------------------------
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        shape, dev, dtype = p.shape, p.device, state_dtype(p)
        state["m"] = torch.zeros(shape, device=dev, dtype=dtype)  # first moment, in the rotated basis
        self.rule.init_state(state, shape, dev, dtype)
        for side, rotated in enumerate(_rotated_sides(shape, group["max_precond_dim"])):
            if rotated:
                state[f"GG{side}"] = torch.zeros(shape[side], shape[side], device=dev, dtype=dtype)
        return state

    @staticmethod
    def _bases(state: dict[str, Any]) -> list[Tensor | None]:
        return [state.get("Q0"), state.get("Q1")]

    # ---- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] += 1
            grads = [p.grad.to(state_dtype(p)) for p in params]
            low = _low_precision(group, grads)
            low_grads = [g.to(low) for g in grads] if low is not None else None
            if group["step"] == 1:  # the first step only builds the preconditioner
                states = [self._init_state(p, group) for p in params]
                self._update_factors(states, low_grads or grads, group)
                self._eigh_bases(states, group)
                continue
            states = [self.state[p] for p in params]
            t = group["step"] - 1
            beta1, beta2 = group["betas"]
            step_size = group["lr"]
            if group["bias_correction"]:
                step_size /= 1.0 - beta1**t
                step_size *= self.rule.second_moment_correction(beta2, t)
            decay = 1.0 - group["lr"] * group["weight_decay"]
            if low_grads is not None:
                self._low_precision_step(params, states, grads, low_grads, group, t, step_size, decay)
            elif group["fused"]:
                self._fused_step(params, states, grads, group, t, step_size, decay)
            else:
                _apply_updates(params, self._directions(states, grads, group, t), step_size, decay, None)
                self._update_factors(states, grads, group)
            if t % group["precondition_frequency"] == 0:
                self._refresh_bases(states, group)
        return loss

    def _directions(self, states, grads, group, t: int) -> list[Tensor]:
        """Rotate the gradients, update the moments in the basis, return the rotated-back directions
        (float32 products)."""
        g_rot = [rotate(g, self._bases(s)) for g, s in zip(grads, states)]
        directions = self._eager_directions(states, g_rot, group, t)
        return [rotate_back(u, self._bases(s)) for u, s in zip(directions, states)]

    def _eager_directions(self, states, g_rot: list[Tensor], group, t: int) -> list[Tensor]:
        """Update the first moments (``foreach``) and return the rule's directions, in the basis."""
        moments = [s["m"] for s in states]
        torch._foreach_lerp_(moments, g_rot, 1.0 - group["betas"][0])
        return self.rule.directions(states, g_rot, moments, group, t)

    def _scalars(self, group: dict[str, Any], like: Tensor, step_size: float, decay: float) -> dict[str, Tensor]:
        return {name: fused.scalar(value, like) for name, value in
                (("beta1", group["betas"][0]), ("beta2", group["betas"][1]), ("eps", group["eps"]),
                 ("step", step_size), ("decay", decay), ("factor", _factor_weight(group)))}

    def _fused_step(self, params, states, grads, group, t: int, step_size: float, decay: float) -> None:
        """The float32-products step one parameter at a time, its element-wise work in compiled one-pass
        kernels (:mod:`ofe.optim.fused`): rotate, moments and direction, rotate back, update, factor
        EMAs. The arithmetic is the eager path's (same order of updates, same dtypes), up to rounding."""
        scalars = self._scalars(group, params[0], step_size, decay)
        for p, s, g in zip(params, states, grads):
            rotated = self._rotated(s)
            g_rot = rotate(g, self._bases(s)) if rotated else g
            u = self.rule.fused_direction(s, g_rot, group, t, scalars)
            if rotated:
                u = rotate_back(u, self._bases(s))
            fused.run("apply_update", p, u, scalars["step"], scalars["decay"])
            for side in (0, 1):
                if f"GG{side}" in s:
                    fused.run("ema", s[f"GG{side}"], _factor_increment(g, side), scalars["factor"])

    def _low_precision_step(self, params, states, grads, low_grads, group, t: int, step_size: float,
                            decay: float) -> None:
        """The step with products in the low precision, batched over parameters of one shape (one
        ``bmm`` per product for, e.g., every block's MLP input matrix: ~1.5-2.5x the throughput of
        separate products in bf16 on a CPU with AMX); the element-wise work eager (``foreach``) or
        fused. Same arithmetic as per-parameter products, up to the products' rounding."""
        buckets = self._product_buckets(states, low_grads)
        stacked = {key: torch.stack([low_grads[i] for i in idx]) for key, idx in buckets.items()}
        scalars = self._scalars(group, params[0], step_size, decay) if group["fused"] else None
        low = low_grads[0].dtype
        g_rot = self._batched_products(buckets, stacked, states, list(grads), low, back=False)
        if scalars is not None:
            directions = [self.rule.fused_direction(s, g, group, t, scalars) for s, g in zip(states, g_rot)]
        else:
            g32 = [g.to(s["m"].dtype) for g, s in zip(g_rot, states)]
            directions = [u.to(g.dtype) for u, g in zip(self._eager_directions(states, g32, group, t), g_rot)]
        updates = self._batched_products(buckets, None, states, directions, low, back=True)
        _apply_updates(params, updates, step_size, decay, scalars)
        self._batched_factor_update(buckets, stacked, states, group, scalars)

    def _batched_products(self, buckets, stacked, states, tensors: list[Tensor], dtype: torch.dtype,
                          back: bool) -> list[Tensor]:
        """``tensors`` with each bucket's members rotated in (``Q_L^T x Q_R``, from the ``stacked``
        low-precision gradients) or back (``Q_L u Q_R^T``, stacking the members' directions, already in
        ``dtype``) by one batched product per side in ``dtype``; the others as they are."""
        out = list(tensors)
        for key, idx in buckets.items():
            left_in, left_out, right = self._stacked_bases([states[i] for i in idx], dtype)
            left = left_out if back else left_in
            y = torch.stack([tensors[i] for i in idx]) if back else stacked[key]
            y = left @ y if left is not None else y
            y = (y @ right.mT if back else y @ right) if right is not None else y
            for j, i in enumerate(idx):
                out[i] = y[j]
        return out

    @staticmethod
    def _batched_factor_update(buckets, stacked, states, group, scalars) -> None:
        """EMA of ``G G^T`` and ``G^T G`` from each bucket's stacked low-precision gradients (one batched
        product per side; the EMA in the state's precision, fused when ``scalars`` are given)."""
        weight = _factor_weight(group)
        for key, idx in buckets.items():
            for side in (0, 1):
                if f"GG{side}" not in states[idx[0]]:
                    continue
                increments = _factor_increment(stacked[key], side)
                for j, i in enumerate(idx):
                    average = states[i][f"GG{side}"]
                    if scalars is not None:
                        fused.run("ema", average, increments[j], scalars["factor"])
                    else:
                        average.lerp_(increments[j].to(average.dtype), weight)

    @staticmethod
    def _product_buckets(states, low_grads) -> dict[tuple, list[int]]:
        """Indices of the parameters with a basis, by (shape, sides with a factor): each bucket's
        products run as one batched product."""
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (s, x) in enumerate(zip(states, low_grads)):
            if "GG0" in s or "GG1" in s:
                buckets[(tuple(x.shape), "GG0" in s, "GG1" in s)].append(i)
        return buckets

    def _stacked_bases(self, members: list[dict[str, Any]], dtype: torch.dtype):
        """``(Q_L^T, Q_L, Q_R)`` of the members, stacked, in ``dtype``, each contiguous (None: side not
        rotated): row-major left operands run ~1.5x faster than transposed ones in bf16. Cached until
        the next refresh."""
        key = (tuple(id(s) for s in members), dtype)
        if key not in self._low_bases:
            def stack(name: str, transpose: bool) -> Tensor | None:
                if name not in members[0]:
                    return None
                return torch.stack([(s[name].mT if transpose else s[name]).to(dtype) for s in members]).contiguous()

            self._low_bases[key] = (stack("Q0", True), stack("Q0", False), stack("Q1", False))
        return self._low_bases[key]

    def _rotated(self, state: dict[str, Any]) -> bool:
        return "Q0" in state or "Q1" in state

    @staticmethod
    def _update_factors(states, grads, group) -> None:
        """EMA of ``G G^T`` and ``G^T G`` (float32 products)."""
        weight = _factor_weight(group)
        for s, x in zip(states, grads):
            for side in (0, 1):
                if f"GG{side}" in s:
                    s[f"GG{side}"].lerp_(_factor_increment(x, side).to(s[f"GG{side}"].dtype), weight)

    # ---- bases -------------------------------------------------------------------------------------
    def _factors_by_size(self, states) -> dict[int, list[tuple[dict[str, Any], int]]]:
        buckets: dict[int, list[tuple[dict[str, Any], int]]] = defaultdict(list)
        for s in states:
            for side in (0, 1):
                if f"GG{side}" in s:
                    buckets[s[f"GG{side}"].shape[0]].append((s, side))
        return buckets

    def _eigh_bases(self, states, group) -> None:
        """Initial bases: eigenvectors of the factors, by descending eigenvalue, batched by size."""
        self._low_bases.clear()
        for size, members in self._factors_by_size(states).items():
            stacked = torch.stack([s[f"GG{side}"] for s, side in members])
            eye = torch.eye(size, device=stacked.device, dtype=stacked.dtype)
            try:
                _, q = torch.linalg.eigh(stacked + 1e-30 * eye)
            except torch.linalg.LinAlgError:
                group["eigh_fallbacks"] += 1
                _, q = torch.linalg.eigh(stacked.double() + 1e-30 * eye.double())
                q = q.to(stacked.dtype)
            q = _broadcast(q.flip(-1).contiguous())
            for (s, side), qi in zip(members, q):
                s[f"Q{side}"] = qi

    def _refresh_bases(self, states, group) -> None:
        """One QR power-iteration step from the old bases; re-order / re-rotate the moments to follow."""
        self._low_bases.clear()
        for size, members in self._factors_by_size(states).items():
            q_old = [s[f"Q{side}"] for s, side in members]
            # (GG Q)^T = Q^T GG (GG is symmetric): written row-major, it is GG Q in LAPACK's column-major
            # layout, and the eigenvalue estimates and the re-ordering read it along contiguous rows.
            power_t = torch.empty(len(members), size, size, device=q_old[0].device, dtype=q_old[0].dtype)
            for (s, side), q, out in zip(members, q_old, power_t):
                torch.matmul(q.mT, s[f"GG{side}"], out=out)
            est_eig = torch.stack([torch.linalg.vecdot(q.mT, p, dim=-1) for q, p in zip(q_old, power_t)])
            order = est_eig.argsort(dim=-1, descending=True)  # diag(Q^T GG Q), by descending estimate
            by_estimate = torch.empty_like(power_t)
            for p, idx, out in zip(power_t, order, by_estimate):
                torch.index_select(p, 0, idx, out=out)  # rows of (GG Q)^T: the columns of GG Q, re-ordered
            q_new = torch.linalg.householder_product(*torch.geqrf(by_estimate.mT))  # QR's Q, without forming R
            q_new, order = _broadcast(q_new), _broadcast(order)  # Q stays in LAPACK's column-major layout
            for (s, side), qo, qn, idx in zip(members, q_old, q_new, order):
                self.rule.reorder(s, side, idx)
                s["m"] = _change_basis(s["m"], side, qo, qn)
                s[f"Q{side}"] = qn


def _change_basis(m: Tensor, side: int, q_old: Tensor, q_new: Tensor) -> Tensor:
    """Re-express ``m`` (coordinates in ``q_old`` along ``side``) in ``q_new``: ``Q_new^T Q_old m`` for
    side 0, ``m Q_old^T Q_new`` for side 1, in whichever order of products costs fewer FLOPs (through
    the parameter's space when its other side is shorter than ``d``, else through ``Q_new^T Q_old``)."""
    d, other = m.shape[side], m.shape[1 - side]
    if other < d:
        return q_new.mT @ (q_old @ m) if side == 0 else (m @ q_old.mT) @ q_new
    change = q_new.mT @ q_old
    return change @ m if side == 0 else m @ change.mT


def _factor_weight(group: dict[str, Any]) -> float:
    """Weight of a new increment in the Kronecker factors' EMA: ``1 - shampoo_beta`` (default ``betas[1]``)."""
    beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
    return 1.0 - beta


def _factor_increment(x: Tensor, side: int) -> Tensor:
    """``x x^T`` (side 0, rows) or ``x^T x`` (side 1, columns), batched over leading dimensions."""
    return x @ x.mT if side == 0 else x.mT @ x


def _apply_updates(params: list[Tensor], updates: list[Tensor], step_size: float, decay: float,
                   scalars: dict[str, Tensor] | None) -> None:
    """``p <- (p - step_size u) decay`` (decoupled weight decay after the update, as in the reference):
    with ``foreach`` ops, or per parameter in the fused kernel when its ``scalars`` are given."""
    if scalars is not None:
        for p, u in zip(params, updates):
            fused.run("apply_update", p, u, scalars["step"], scalars["decay"])
        return
    torch._foreach_add_(params, [u.to(p.dtype) for p, u in zip(params, updates)], alpha=-step_size)
    if decay != 1.0:
        torch._foreach_mul_(params, decay)


def _low_precision(group: dict[str, Any], grads: list[Tensor]) -> torch.dtype | None:
    """The group's product dtype when it is below the state's (float32 state, bfloat16 products)."""
    dtype = group.get("matmul_dtype", torch.float32)
    return dtype if dtype != torch.float32 and grads and grads[0].dtype == torch.float32 else None


def _broadcast(t: Tensor) -> Tensor:
    """Make every rank use rank 0's tensor (eigh/QR need not be bitwise deterministic across ranks)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.contiguous()
        dist.broadcast(t, src=0)
    return t


class SOAP(RotatedOptimizer):
    """Adam in Shampoo's eigenbasis (Vyas et al. 2024). Defaults follow the reference."""

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, rule=AdamRule(), **kwargs)


class RotatedAdafactor(RotatedOptimizer):
    """AdaFactor's factored second moments in Shampoo's eigenbasis, with update clipping."""

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, rule=AdafactorRule(), **kwargs)
