"""Cost estimates before a run (ofe reproduce --dry_run) and the paper-scale presets on a CPU: the
optimiser state counted against real optimisers' state, parameter counts against the closed form,
two real optimiser steps at full size, a 1.2B model built on the meta device."""

import time

import pytest
import torch

from ofe.cli import main
from ofe.train.estimate import estimate, meta_model, optimizer_floats
from ofe.models import GPT, expected_param_count, lm_loss, preset
from ofe.optim import OptimConfig, build_optimizer
from ofe.run_config import TrainConfig


def _state_floats(state) -> int:
    """Every float of an optimiser's state_dict (scalars such as step counters left out)."""
    if torch.is_tensor(state):
        return state.numel() if state.numel() > 1 else 0
    if isinstance(state, dict):
        return sum(_state_floats(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_floats(v) for v in state)
    return 0


@pytest.mark.parametrize("name", ["adamw", "soap", "adafactor", "rotated-adafactor", "muon"])
def test_optimizer_state_is_counted_as_the_real_optimizer_keeps_it(name):
    cfg = TrainConfig(preset="tiny", optim=OptimConfig(name=name))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizer(cfg.optim, model)
    for _ in range(2):
        x = torch.randint(0, 256, (2, 33))
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    assert optimizer_floats(cfg, meta_model(cfg)) == _state_floats(opt.state_dict())


def test_estimates_of_the_paper_presets():
    big = TrainConfig(preset="languini-1.2b", steps=1000, batch_size=64)
    est = estimate(big)  # built on the meta device: no 5 GB allocation
    assert est["params"] == expected_param_count(preset("languini-1.2b")) == 1_242_662_912
    assert est["tokens"] == 1000 * 64 * 512
    n = est["params"] - 512 * 2048  # tied embeddings: all but the position embedding multiply
    assert est["train_flops"] == (6 * n + 12 * 24 * 2048 * 512) * est["tokens"]
    mem = est["memory_gib"]
    assert mem["weights"] == mem["gradients"] == pytest.approx(4 * est["params"] / 2**30)
    assert mem["optimizer"] == pytest.approx(2 * mem["weights"])  # AdamW: two moments
    soap = estimate(TrainConfig(preset="languini-1.2b", optim=OptimConfig(name="soap")))["memory_gib"]["optimizer"]
    assert soap > mem["optimizer"]  # plus the Kronecker factors and eigenbases


@pytest.mark.parametrize("name", ["codeparrot-130m", "opt-125m"])
def test_two_optimizer_steps_at_full_size_on_a_cpu(name):
    """The presets the paper's tables use, at their full size (110M / 125M parameters), step on a CPU:
    a small batch of short windows (positions up to the preset's length exist), AdamW as the authors ran it."""
    cfg = TrainConfig(preset=name)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(cfg.model)
    opt = build_optimizer(cfg.optim, model)
    before = model.blocks[0].mlp.fc.weight.detach().clone()
    for _ in range(2):
        x = torch.randint(0, cfg.model.vocab_size, (2, 65))
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, model.blocks[0].mlp.fc.weight)


def test_reproduce_dry_run_lists_the_runs_with_their_cost(capsys):
    assert main(["reproduce", "--preset", "codeparrot-130m", "--dry_run", "true", "--seeds", "0", "--other_seeds", ""]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "parameters" in line]
    assert [line.split(":")[0] for line in lines] == ["op_soap_lr0.001_seed0", "pre-ln_adamw_lr0.001_seed0"]  # slower first
    assert "110.2M parameters, 10,000 steps x 128 x 128" in lines[1] and "FLOPs; memory ~" in lines[1]
    assert "2 runs" in out
