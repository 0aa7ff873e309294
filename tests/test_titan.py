"""ofe inside torchtitan (ofe.titan): the optimisers through torchtitan's OptimizersContainer and the
monitor on torchtitan's own Llama 3 model, built on the CPU (torchtitan's trainer itself needs a GPU:
scripts/titan_debug.py). Skipped where torchtitan is not installed (pip install 'ofe[titan]')."""

import copy

import pytest
import torch

pytest.importorskip("torchtitan")
pytest.importorskip("triton")

from ofe import titan  # noqa: E402
from ofe.optim.rotated import SOAP  # noqa: E402


def llama3_debug(layers: int = 2, converters=None):
    """torchtitan's llama3 debug model (width 256), ``layers`` blocks, SDPA attention (FlexAttention's
    block masks are built for GPUs); ``converters``: torchtitan model converters, applied to those blocks."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry

    spec = model_registry("debugmodel").model
    spec.layers = spec.layers[:layers]
    for converter in converters or []:
        spec = converter.build().convert(spec)
    for layer in spec.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    torch.manual_seed(0)
    model = spec.build()
    model.init_states()
    return model


def test_the_monitor_measures_torchtitans_blocks_as_a_float64_reference_does():
    """Kurtosis (Eq. 1 of He et al.: mean of s_i^4 over the mean of s_i^2 squared, s_i a neuron's RMS over
    the tokens) of each block's output, against hooks and float64 arithmetic."""
    model = llama3_debug()
    monitor = titan.attach_monitor([model], titan.OutlierSettings(every=1, metrics=["kurtosis", "max_abs"]))
    seen = []
    handles = [model.layers[k].register_forward_hook(lambda m, i, o: seen.append(o.detach().double())) for k in model.layers]
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))
    with monitor.observe(0):
        model(tokens)
    results = monitor.collect()
    for h in handles:
        h.remove()
    site = next(iter(results))
    for layer, x in enumerate(seen):
        s2 = x.reshape(-1, x.shape[-1]).square().mean(0)
        assert results[site]["kurtosis"][layer] == pytest.approx(float((s2 ** 2).mean() / s2.mean() ** 2), rel=1e-5)
        assert results[site]["max_abs"][layer] == pytest.approx(float(x.abs().max()), rel=1e-6)
    assert len(seen) == 2


def _step(container_or_optimizer, model, tokens):
    container_or_optimizer.zero_grad()
    model(tokens).float().logsumexp(-1).mean().backward()
    container_or_optimizer.step()


def test_soap_through_torchtitans_container_equals_ofes_soap():
    """Three steps of ``ofe.SOAP`` built by torchtitan's container (its param groups, its implementation
    flags removed) leave the weights ofe's SOAP over the same parameters leaves, bitwise."""
    model = llama3_debug()
    twin = copy.deepcopy(model)
    kwargs = {"betas": (0.9, 0.95), "weight_decay": 0.0, "precondition_frequency": 2}
    container = titan.ofe_optimizer("ofe.SOAP", lr=3e-3, **kwargs).build(model_parts=[model])
    assert [type(o) for o in container.optimizers] == [SOAP]
    direct = SOAP(twin.parameters(), lr=3e-3, **kwargs)
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        _step(container, model, tokens)
        _step(direct, twin, tokens)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.layers["0"].feed_forward.w1.weight, llama3_debug().layers["0"].feed_forward.w1.weight)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from torchtitan.components.optimizer import ParamGroupConfig

    model = llama3_debug()
    rest = r"tok_embeddings|lm_head|norm"
    config = titan.OfeOptimizers.Config(param_groups=[
        ParamGroupConfig(pattern=rest, optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3}),
        ParamGroupConfig(pattern=r".*", optimizer_name="ofe.Muon", optimizer_kwargs={"lr": 1e-3})])
    container = config.build(model_parts=[model])
    assert sorted(type(o).__name__ for o in container.optimizers) == ["AdamW", "Muon"]
    before = model.layers["1"].attention.wo.weight.clone()
    _step(container, model, torch.randint(0, 2048, (2, 16)))
    assert not torch.equal(before, model.layers["1"].attention.wo.weight)
    with pytest.raises(ValueError, match="ofe.Muon orthogonalises 2-D matrices only; .*norm.weight is not one"):
        titan.ofe_optimizer("ofe.Muon", lr=1e-3).build(model_parts=[llama3_debug()])


def test_the_trainer_config_is_torchtitans_with_the_monitor_settings():
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    base = llama3_debugmodel()
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__ if not f.startswith("_")}
    config = titan.OutlierTrainer.Config(**fields, outliers=titan.OutlierSettings(every=5))
    assert titan.OutlierTrainer.Config._owner is titan.OutlierTrainer
    assert config.outliers.every == 5 and config.training.steps == base.training.steps


def test_the_gpu_scripts_config_builds_on_the_cpu():
    """scripts/titan_debug.py's config (what it hands torchtitan's trainer) without a GPU: the optimiser
    groups, the parallelism and the monitor settings are what its flags say."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "titan_debug.py"
    spec = importlib.util.spec_from_file_location("titan_debug", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = script.debug_config("ofe.Muon", 1e-3, 7, 3, False, 2, "/tmp/x")
    assert isinstance(config, titan.OutlierTrainer.Config) and config.outliers.every == 3
    assert [g.optimizer_name for g in config.optimizer.param_groups] == ["AdamW", "ofe.Muon"]
    assert config.training.steps == 7 and config.parallelism.data_parallel_replicate_degree == 2
    assert config.parallelism.data_parallel_shard_degree == 1 and config.metrics.enable_tensorboard
    op = script.debug_config("ofe.SOAP", 3e-3, 7, 3, False, 1, "/tmp/x", op=True)
    assert all(isinstance(layer, titan.OPBlock.Config) for layer in op.model_spec.model.layers)


def test_the_op_converter_makes_outlier_protected_blocks():
    """OutlierProtectedBlocks through torchtitan's converter protocol: block 0 keeps its attention-input
    norm and nothing else, the others no norm; QK-RMSNorm; betas 1/sqrt(2) trainable; each block computes
    ``h = x + b_a Attn(N0(x)); h + b_m MLP(h)`` (checked against its own parts), and the model trains."""
    from torchtitan.models.common.nn_modules import RMSNorm

    model = llama3_debug(converters=[titan.OutlierProtectedBlocks.Config()])
    first, second = model.layers["0"], model.layers["1"]
    assert isinstance(first, titan.OPBlock) and isinstance(second, titan.OPBlock)
    assert {n for n, m in first.named_children() if isinstance(m, RMSNorm)} == {"attention_norm"}
    assert not any(isinstance(m, RMSNorm) for n, m in second.named_children())
    assert isinstance(second.attention.q_norm, RMSNorm) and second.attention.q_norm.weight.shape == (16,)
    assert second.attn_beta.item() == pytest.approx(2 ** -0.5) and second.attn_beta.requires_grad
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = x + second.attn_beta * second.attention(x, None, None)
        assert torch.allclose(second(x, None), h + second.mlp_beta * second.feed_forward(h), atol=1e-6)
        h0 = x + first.attn_beta * first.attention(first.attention_norm(x), None, None)
        assert torch.allclose(first(x, None), h0 + first.mlp_beta * first.feed_forward(h0), atol=1e-6)
    container = titan.ofe_optimizer("ofe.SOAP", lr=3e-3, weight_decay=0.0).build(model_parts=[model])
    tokens = torch.randint(0, 2048, (2, 17), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(5):
        container.zero_grad()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        container.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and second.attn_beta.item() != pytest.approx(2 ** -0.5, abs=1e-7)
