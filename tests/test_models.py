"""The block zoo: every block and option builds, is causal, and has the structure it claims."""

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from ofe.config import ConfigError
from ofe.models import BLOCK_TYPES, GPT, PRESETS, GPTConfig, expected_param_count, lm_loss, preset

OPTION_SETS = [
    {},
    {"qk_norm": "rms"},
    {"qk_norm": "layernorm", "bias": True},
    {"attn_softcap": 30.0},
    {"beta": 0.3, "beta_trainable": False},
    {"beta_trainable": True},
    {"mlp_alpha": True, "activation": "gelu"},
    {"final_norm": True, "first_norm": True},
    {"final_norm": False, "first_norm": False},
    {"gated_attention": True, "bias": True},
    {"gated_attention": True, "gate": "element", "bias": True},
    {"activation": "swiglu", "bias": True},
    {"embed_proj": True},
    {"layerscale": 0.1},
    {"tie_embeddings": False, "init_std": 0.05},
]


def tiny(**kw) -> GPTConfig:
    return preset("tiny", **kw)


@pytest.mark.parametrize("block,options", list(itertools.product(BLOCK_TYPES, OPTION_SETS)))
def test_every_block_and_option_builds_runs_and_trains(block, options):
    torch.manual_seed(0)
    cfg = tiny(block=block, **options)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    logits = model(idx)
    assert logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    loss = lm_loss(logits[:, :-1], idx[:, 1:])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.num_params() == expected_param_count(cfg)


@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("options", [{}, {"attn_softcap": 5.0, "gated_attention": True}])
def test_causality_future_tokens_never_change_past_logits(block, options):
    torch.manual_seed(1)
    cfg = tiny(block=block, **options)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t:] = (changed[:, t:] + 17) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


NORMS = (nn.LayerNorm, nn.RMSNorm)


@pytest.mark.parametrize("first_norm", [True, False])
def test_op_block_has_no_norm_but_qk_and_optional_first(first_norm):
    model = GPT(tiny(block="op", first_norm=first_norm, n_layer=3))
    names = [n for n, m in model.named_modules() if isinstance(m, NORMS)]
    qk = [n for n in names if n.endswith(("attn.q_norm", "attn.k_norm"))]
    others = [n for n in names if n not in qk]
    assert len(qk) == 6
    assert others == (["blocks.0.first_norm"] if first_norm else [])
    assert isinstance(model.final_norm, nn.Identity)


def test_op_defaults_follow_reference():
    c = tiny(block="op", n_layer=4).resolved()
    assert (c.qk_norm, c.beta, c.beta_trainable, c.final_norm, c.first_norm) == ("rms", 0.5, True, False, True)
    p = tiny(block="pre-ln").resolved()
    assert (p.qk_norm, p.beta, p.beta_trainable, p.final_norm, p.first_norm) == ("none", 1.0, False, True, False)
    assert tiny(block="post-ln").resolved().final_norm is False


def test_normalised_blocks_use_their_norm_type():
    counts = {}
    for block in ("pre-ln", "post-ln", "pre-rms", "pre-srms"):
        model = GPT(tiny(block=block, n_layer=3))
        mods = [m for m in model.modules() if isinstance(m, NORMS)]
        counts[block] = len(mods)
        if block == "pre-srms":
            assert all(isinstance(m, nn.RMSNorm) and m.weight is None for m in mods)
        if block == "pre-rms":
            assert all(isinstance(m, nn.RMSNorm) and m.weight is not None for m in mods)
    assert counts == {"pre-ln": 7, "post-ln": 6, "pre-rms": 7, "pre-srms": 7}


def _betas(model):
    return [(n, p) for n, p in model.named_parameters() if n.endswith(".beta")]


def test_beta_is_a_parameter_only_when_asked():
    assert _betas(GPT(tiny(block="pre-ln"))) == []
    assert _betas(GPT(tiny(block="pre-ln", beta=0.5))) == []
    assert _betas(GPT(tiny(block="op", beta_trainable=False))) == []
    betas = _betas(GPT(tiny(block="op", n_layer=4)))
    assert len(betas) == 8 and all(p.requires_grad and p.item() == pytest.approx(0.5) for _, p in betas)
    assert len(_betas(GPT(tiny(block="pre-ln", beta_trainable=True)))) == 4


def test_fixed_beta_scales_the_branches():
    torch.manual_seed(0)
    base = GPT(tiny(block="op", beta=1.0, beta_trainable=False, first_norm=False, n_layer=1)).eval()
    scaled = GPT(tiny(block="op", beta=0.25, beta_trainable=False, first_norm=False, n_layer=1)).eval()
    scaled.load_state_dict(base.state_dict())
    blk_b, blk_s = base.blocks[0], scaled.blocks[0]
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        a = blk_b.attn(x)
        expected = x + 0.25 * a
        expected = expected + 0.25 * blk_b.mlp(expected)
        assert torch.allclose(blk_s(x), expected, atol=1e-6)


@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_param_count_formula_for_every_preset(block):
    for name in PRESETS:
        cfg = preset(name, block=block)
        with torch.device("meta"):
            model = GPT(cfg)
        assert model.num_params() == expected_param_count(cfg), name


def test_codeparrot_preset_shape():
    c = preset("codeparrot-130m")
    assert (c.n_layer, c.d_model, c.n_head, c.seq_len, c.activation, c.tie_embeddings) == (12, 768, 12, 128, "relu", True)


def test_softcap_with_huge_cap_equals_sdpa_path():
    torch.manual_seed(0)
    plain = GPT(tiny(block="pre-ln")).eval()
    capped = GPT(tiny(block="pre-ln", attn_softcap=1e6)).eval()
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.allclose(plain(idx), capped(idx), atol=1e-5)


def test_softcap_bounds_logits_and_changes_output():
    torch.manual_seed(0)
    plain = GPT(tiny(block="op", init_std=1.0)).eval()
    capped = GPT(tiny(block="op", init_std=1.0, attn_softcap=1.0)).eval()
    capped.load_state_dict(plain.state_dict())
    q = torch.randn(1, 4, 8, 8) * 50
    probs = capped.blocks[0].attn._probs(q, q)
    # with |logits| <= 1 no causal row can be sharper than e^2 : 1
    row = probs[0, 0, -1]
    assert (row.max() / row.min()).item() <= torch.e**2 + 1e-4
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(plain(idx), capped(idx))


def test_qk_rmsnorm_makes_attention_invariant_to_query_key_scale():
    torch.manual_seed(0)
    model = GPT(tiny(block="op", qk_norm="rms")).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        before = attn(x)
        attn.qkv.weight[:64] *= 100.0  # scale the query and key projections
        after = attn(x)
    assert torch.allclose(before, after, atol=1e-4)


def test_gate_at_zero_halves_the_attention_output():
    torch.manual_seed(0)
    gated = GPT(tiny(block="pre-ln", gated_attention=True)).eval()
    plain = GPT(tiny(block="pre-ln")).eval()
    plain.load_state_dict(gated.state_dict(), strict=False)
    a_g, a_p = gated.blocks[0].attn, plain.blocks[0].attn
    nn.init.zeros_(a_g.gate.weight)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert torch.allclose(a_g(x), 0.5 * a_p(x), atol=1e-6)


def test_tied_and_untied_embeddings():
    tied = GPT(tiny())
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_mlp_alpha_is_trainable_scalar():
    model = GPT(tiny(mlp_alpha=True))
    alphas = [p for n, p in model.named_parameters() if n.endswith("mlp.alpha")]
    assert len(alphas) == 2 and all(a.shape == () and a.requires_grad for a in alphas)


def test_init_std():
    model = GPT(tiny(init_std=0.05, d_model=64, n_head=4))
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_taps_disabled_by_default_and_sequence_too_long():
    model = GPT(tiny())
    assert not any(t.enabled for site in model.taps().values() for t in site.values())
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs,key",
    [({"n_layer": 0}, "n_layer"), ({"d_model": 30, "n_head": 4}, "d_model"), ({"init_std": -1.0}, "init_std"),
     ({"attn_softcap": 0.0}, "attn_softcap"), ({"d_mlp": -4}, "d_mlp")],
)
def test_bad_model_configs_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        tiny(**kwargs)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        preset("nope")


def test_resolved_config_is_explicit_and_stable():
    c = tiny(block="op").resolved()
    assert c.resolved() == c
    assert all(getattr(c, f.name) is not None for f in dataclasses.fields(c) if f.name not in ("attn_softcap", "layerscale"))


def test_block_table_drives_choices_defaults_and_errors():
    from ofe.models import BLOCKS

    assert BLOCK_TYPES == tuple(BLOCKS)
    for name, spec in BLOCKS.items():
        cfg = GPTConfig(block=name, n_layer=4).resolved()
        assert cfg.final_norm == spec.final_norm and cfg.first_norm == spec.first_norm
        assert cfg.beta == (0.5 if spec.beta_inv_sqrt_depth else 1.0)
    from ofe import config as C

    with pytest.raises(ConfigError, match="'pre-foo' is not one of 'pre-ln' \\| 'post-ln'"):
        C.from_dict(GPTConfig, {"block": "pre-foo"})


def test_element_gate_is_a_per_channel_sigmoid_of_the_attention_input():
    """Qwen's G1 gate: y * sigmoid(x W_g), one gate per head channel, against a direct computation."""
    torch.manual_seed(0)
    gated = GPT(tiny(block="pre-ln", gated_attention=True, gate="element")).eval()
    plain = GPT(tiny(block="pre-ln")).eval()
    plain.load_state_dict(gated.state_dict(), strict=False)
    a_g, a_p = gated.blocks[0].attn, plain.blocks[0].attn
    assert a_g.gate.weight.shape == (32, 32)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    a_g.double(), a_p.double()
    captured = {}
    a_p.proj.register_forward_pre_hook(lambda _m, args: captured.__setitem__("ctx", args[0]))
    with torch.no_grad():
        a_p(x)
        want = a_p.proj(captured["ctx"] * torch.sigmoid(x @ a_g.gate.weight.T))
        assert torch.allclose(a_g(x), want, atol=1e-12)


def test_swiglu_mlp_matches_a_direct_computation_at_about_equal_parameters():
    torch.manual_seed(0)
    cfg = tiny(activation="swiglu")
    assert cfg.mlp_width == 88  # 8/3 * 32 = 85.3, rounded up to a multiple of 8
    mlp = GPT(cfg).blocks[0].mlp.double()
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    w_gate, w_up = mlp.fc.weight[:88], mlp.fc.weight[88:]
    want = (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.proj.weight.T
    with torch.no_grad():
        assert torch.allclose(mlp(x), want, atol=1e-12)
    big = preset("small-cpu")
    glu, gelu = expected_param_count(preset("small-cpu", activation="swiglu")), expected_param_count(big)
    assert abs(glu / gelu - 1) < 0.01


def test_embedding_projection_starts_as_the_identity():
    torch.manual_seed(0)
    with_proj = GPT(tiny(embed_proj=True)).eval()
    without = GPT(tiny()).eval()
    without.load_state_dict({k: v for k, v in with_proj.state_dict().items() if not k.startswith("embed_proj")})
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(with_proj(idx), without(idx))
    assert torch.equal(with_proj.embed_proj.weight, torch.eye(32))


def test_bf16_cpu_attention_matches_a_float64_reference_forward_and_backward():
    """The written-out CPU bf16 attention: causal (a later token never changes an earlier output),
    and output and gradients within bf16 rounding of float64 SDPA's (relative 1%)."""
    from ofe.models import gpt as G
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    low = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    got = G._causal_sdpa(*low)
    got_grads = torch.autograd.grad(got, low, grad_out.bfloat16())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert got.dtype == torch.bfloat16 and rel(got, want) < 1e-2
    assert all(rel(g, w) < 1e-2 for g, w in zip(got_grads, want_grads)), [rel(g, w) for g, w in zip(got_grads, want_grads)]
    changed = [x.detach().clone() for x in low]
    for x in changed:
        x[:, :, -1] += 5.0  # change the last token only
    assert torch.equal(G._causal_sdpa(*changed)[:, :, :-1], got.detach()[:, :, :-1])
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    assert torch.allclose(G._causal_sdpa(q32, k32, v32).double(), want.detach(), atol=1e-5)  # float32: SDPA