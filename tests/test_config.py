"""Typed config loading: unknown and ill-typed keys are errors that name the key."""

import argparse
import json
from dataclasses import dataclass

import pytest

from ofe import config as C
from ofe.models import GPTConfig


@dataclass(frozen=True)
class Inner:
    width: int = C.field(8, "a width")
    rate: float = C.field(0.5, "a rate")


@dataclass(frozen=True)
class Outer:
    name: str = C.field("x", "a name")
    flag: bool = C.field(False, "a flag")
    inner: Inner = Inner()  # a frozen (hashable) dataclass is a valid default
    betas: tuple[float, ...] = C.field((0.9, 0.95), "betas")
    maybe: int | None = C.field(None, "optional int")


def test_from_dict_nested_and_coercions():
    cfg = C.from_dict(Outer, {"name": "y", "inner": {"width": 3, "rate": 1}, "betas": [0.1, 1], "maybe": 4})
    assert cfg == Outer(name="y", inner=Inner(3, 1.0), betas=(0.1, 1.0), maybe=4)
    assert isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize(
    "data,needle",
    [({"nme": "y"}, "unknown config key 'nme'"), ({"inner": {"wdth": 2}}, "unknown config key 'inner.wdth'"),
     ({"inner": {"width": "2"}}, "'inner.width': expected an integer"), ({"flag": 1}, "'flag': expected true or false"),
     ({"inner": {"width": True}}, "'inner.width': expected an integer"), ({"betas": 0.9}, "'betas': expected a list"),
     ({"inner": 3}, "'inner': expected a table")],
)
def test_bad_keys_and_types_name_the_key(data, needle):
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(")):
        C.from_dict(Outer, data)


def test_literal_and_post_init_errors_name_the_key():
    with pytest.raises(C.ConfigError, match="'block'"):
        C.from_dict(GPTConfig, {"block": "pre-foo"})
    with pytest.raises(C.ConfigError, match="n_head"):
        C.from_dict(GPTConfig, {"d_model": 10, "n_head": 3})


def test_overrides_parse_by_field_type():
    data = C.apply_overrides(Outer, {"name": "a"}, {"inner.width": "7", "flag": "true", "betas": "0.1,0.2", "maybe": "none"})
    assert C.from_dict(Outer, data) == Outer(name="a", flag=True, inner=Inner(width=7), betas=(0.1, 0.2), maybe=None)
    with pytest.raises(C.ConfigError, match="'inner.width': expected an integer, got 'x'"):
        C.apply_overrides(Outer, {}, {"inner.width": "x"})
    with pytest.raises(C.ConfigError, match="unknown config key 'inner.nope'"):
        C.apply_overrides(Outer, {}, {"inner.nope": "1"})


def test_load_file_toml_json_and_errors(tmp_path):
    (tmp_path / "a.toml").write_text('name = "t"\n[inner]\nwidth = 5\n')
    (tmp_path / "a.json").write_text(json.dumps({"name": "j"}))
    (tmp_path / "bad.toml").write_text("name = \n")
    (tmp_path / "a.yaml").write_text("name: y\n")
    assert C.from_dict(Outer, C.load_file(tmp_path / "a.toml")).inner.width == 5
    assert C.load_file(tmp_path / "a.json") == {"name": "j"}
    for name, needle in [("bad.toml", "cannot parse"), ("a.yaml", "expected a .toml or .json"), ("missing.toml", "not found")]:
        with pytest.raises(C.ConfigError, match=needle):
            C.load_file(tmp_path / name)


def test_argparse_flags_list_every_field_with_default():
    parser = argparse.ArgumentParser()
    C.add_arguments(parser, Outer)
    text = parser.format_help()
    for flag in ("--name", "--flag", "--inner.width", "--inner.rate", "--betas", "--maybe"):
        assert flag in text
    assert "(default: 8)" in text
    ns = parser.parse_args(["--inner.width", "3"])
    assert C.overrides_from_namespace(ns) == {"inner.width": "3"}


def test_to_dict_round_trip():
    cfg = Outer(betas=(0.1,))
    assert C.from_dict(Outer, C.to_dict(cfg)) == cfg


@dataclass(frozen=True)
class WithDefaultInstance:
    inner: Inner = Inner(width=3)


def test_partial_table_overrides_the_field_default_instance():
    cfg = C.from_dict(WithDefaultInstance, {"inner": {"rate": 2.0}})
    assert cfg.inner == Inner(width=3, rate=2.0)


def test_preset_is_checked_in_one_place_and_a_default_model_follows_its_preset():
    import ofe
    from ofe.models import PRESETS
    from ofe.train import TrainConfig, build_train_config

    assert TrainConfig(preset="tiny").model == GPTConfig(**PRESETS["tiny"])
    with pytest.raises(C.ConfigError, match="unknown model preset 'nope'"):
        TrainConfig(preset="nope", model=GPTConfig(n_layer=2))
    cfg = build_train_config({"preset": "tiny", "model": {"n_layer": 3}})
    assert (cfg.model.n_layer, cfg.model.d_model) == (3, 32)  # preset, then model.* on top
    from pathlib import Path

    src = Path(ofe.__file__).parent
    holders = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if "unknown model preset" in p.read_text())
    assert holders == ["models/config.py"]
