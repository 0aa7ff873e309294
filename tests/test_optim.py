"""Weight-decay groups and the learning-rate schedule."""

import math

import pytest
import torch

from ofe.config import ConfigError
from ofe.models import GPT, preset
from ofe.optim import OptimConfig, build_optimizer, lr_at, param_groups


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT(preset("tiny", block="op", mlp_alpha=True, layerscale=0.1, bias=True, gated_attention=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_emb.weight" in decayed and "pos_emb.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert all(n.endswith("weight") for n in decayed)
    for kind in (".beta", "mlp.alpha", "layerscale", ".bias", "q_norm.weight", "first_norm.weight"):
        assert any(kind in n for n in plain), kind
        assert not any(kind in n for n in decayed), kind
    assert len(decayed) + len(plain) == len(list(model.parameters()))  # tied head counted once


def test_adamw_applies_decoupled_decay_per_group():
    model = GPT(preset("tiny"))
    opt = build_optimizer(OptimConfig(lr=0.1, weight_decay=0.5), model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["tok_emb.weight"], before["tok_emb.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(after["blocks.0.norm1.weight"], before["blocks.0.norm1.weight"])


def test_schedule_warmup_then_linear_or_cosine_decay():
    cfg = OptimConfig(lr=1.0, warmup_frac=0.1, decay="linear")
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and lrs[55] == pytest.approx(0.5) and lrs[99] == pytest.approx(1 / 90)
    cos = OptimConfig(lr=2.0, warmup_frac=0.0, decay="cosine", min_lr_frac=0.1)
    assert lr_at(cos, 0, 10) == pytest.approx(2.0)
    assert lr_at(cos, 5, 10) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(OptimConfig(decay="constant", warmup_frac=0.0), 50, 100) == 1e-3


@pytest.mark.parametrize("kw,key", [({"lr": 0.0}, "lr"), ({"betas": (0.9,)}, "betas"), ({"eps": -1.0}, "eps"),
                                     ({"warmup_frac": 1.0}, "warmup_frac")])
def test_bad_optim_config(kw, key):
    with pytest.raises(ConfigError, match=key):
        OptimConfig(**kw)
