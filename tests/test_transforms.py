"""The post-hoc transform registry: order, settings, scope errors, a new entry, and remedies derived from it."""

import pytest
import torch
from torch import nn

from ofe import config as C
from ofe.config import ConfigError
from ofe.experiment.remedies import POSTHOC_REMEDIES
from ofe.models import GPT, preset
from ofe.quant import QuantConfig, QuantizeOptions, SimulatedQuantModel, perplexity
from ofe.quant import transforms as T


def _model(block="pre-rms"):
    torch.manual_seed(0)
    model = GPT(preset("tiny", block=block)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.tok_emb.weight[:, 7] *= 40.0  # an outlier channel in the residual stream
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 33), generator=g), [torch.randint(0, 256, (4, 32), generator=g) for _ in range(3)]


def _ppl(model, cfg, windows, calib):
    sim = SimulatedQuantModel(model, cfg)
    sim.calibrate(calib)
    return perplexity(sim, windows)


def test_per_token_as_a_transform_equals_its_settings_and_a_conflict_is_refused():
    model, (windows, calib) = _model(), _data()
    by_transform = QuantConfig(sites="linear-inputs", transforms=("per-token",))
    by_settings = QuantConfig(sites="linear-inputs", act_granularity="token", weight_granularity="channel")
    assert by_transform.act_granularity == "token" and by_transform.label == by_settings.label == "W8A8-token"
    assert _ppl(model, by_transform, windows, calib) == _ppl(model, by_settings, windows, calib)



def test_a_transform_setting_that_contradicts_a_given_one_is_refused(monkeypatch):
    monkeypatch.setitem(T.TRANSFORMS, "slow-ranges", T.Transform("", "", settings={"momentum": 0.5}))
    assert QuantConfig(transforms=("slow-ranges",)).momentum == 0.5
    with pytest.raises(ConfigError, match="slow-ranges sets quant.momentum = 0.5, but 0.8 was given"):
        QuantConfig(transforms=("slow-ranges",), momentum=0.8)


def test_unknown_or_repeated_transforms_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match="unknown transform 'gptq' \\(known: smoothquant, hadamard, per-token"):
        QuantConfig(sites="linear-inputs", transforms=("gptq",))
    with pytest.raises(ConfigError, match="lists a transform twice"):
        QuantConfig(sites="linear-inputs", transforms=("hadamard", "hadamard"))
    with pytest.raises(ConfigError, match="hadamard needs quant.sites = linear-inputs"):
        QuantConfig(transforms=("hadamard",))
    parsed = C.from_dict(QuantizeOptions, C.apply_overrides(QuantizeOptions, {}, {
        "quant.sites": "linear-inputs", "quant.transforms": "hadamard,per-token"}))
    assert parsed.quant.transforms == ("hadamard", "per-token") and parsed.quant.label == "W8A8-token-rot"


def test_transforms_apply_in_the_order_given_and_keep_the_function_in_float():
    """Rotation, then SmoothQuant measured on the rotated inputs: the float model's function when nothing is
    quantised, a label in that order, and a different result from SmoothQuant alone. The rotation rewrites
    a plain model, so it cannot follow SmoothQuant (whose input hooks it would not fold through)."""
    model, (windows, calib) = _model(), _data()
    x = windows[:, :-1]
    both = ("hadamard", "smoothquant")
    sim = SimulatedQuantModel(model, QuantConfig(sites="linear-inputs", weight_bits=0, act_bits=0, transforms=both))
    sim.calibrate(calib)
    with torch.no_grad():
        assert torch.allclose(sim(x), model(x), atol=1e-4, rtol=1e-4)
    assert QuantConfig(sites="linear-inputs", transforms=both).label == "W8A8-rot-smooth0.5"
    assert set(sim.smoothed) == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    w8 = {t: _ppl(model, QuantConfig(sites="linear-inputs", transforms=t), windows, calib)
          for t in (both, ("smoothquant",), ("hadamard",))}
    assert len(set(w8.values())) == 3, w8
    with pytest.raises(ConfigError, match="hadamard must come before smoothquant"):
        QuantConfig(sites="linear-inputs", transforms=("smoothquant", "hadamard"))
    assert QuantConfig(sites="linear-inputs", transforms=("per-token", "hadamard")).label == "W8A8-token-rot"


def test_a_transform_out_of_scope_fails_at_construction_with_one_line():
    with pytest.raises(T.TransformError, match="not 'op'"):
        SimulatedQuantModel(_model("op"), QuantConfig(sites="linear-inputs", transforms=("hadamard",)))


def test_a_new_transform_is_one_entry(monkeypatch):
    """The recipe of docs/extending.md: a function and an entry. Here: scale each linear's weight by 2
    and its input by 1/2 (the same function), reading the calibration data it is given."""
    seen = {}

    def halve_inputs(model: nn.Module, calib, ctx: T.TransformContext) -> nn.Module:
        seen["batches"] = len(calib)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in ctx.keep_float:
                with torch.no_grad():
                    module.weight.mul_(2.0)
                module.register_forward_pre_hook(lambda _m, a: (a[0] / 2.0, *a[1:]))
                seen.setdefault("layers", []).append(name)
        return model

    monkeypatch.setitem(T.TRANSFORMS, "halve", T.Transform("halve linear inputs", "nothing", halve_inputs,
                                                           needs_calibration=True, linear_inputs=True,
                                                           label=lambda cfg: "-halve"))
    model, (windows, calib) = _model(), _data()
    cfg = QuantConfig(sites="linear-inputs", weight_bits=0, act_bits=0, transforms=("halve",))
    sim = SimulatedQuantModel(model, cfg)
    with pytest.raises(RuntimeError, match="calibrate"):
        sim(windows[:, :-1])  # it needs calibration data first
    sim.calibrate(calib)
    assert seen["batches"] == 3 and "lm_head" not in seen["layers"] and len(seen["layers"]) == 8
    with torch.no_grad():
        assert torch.allclose(sim(windows[:, :-1]), model(windows[:, :-1]), atol=1e-5)
    assert QuantConfig(sites="linear-inputs", transforms=("halve",)).label == "W8A8-halve"


def test_remedies_post_hoc_list_comes_from_the_registry():
    assert [n for n in POSTHOC_REMEDIES if n in T.TRANSFORMS] == list(T.TRANSFORMS)
    for name, (transforms, expected) in POSTHOC_REMEDIES.items():
        assert expected and all(t in T.TRANSFORMS for t in transforms), name
