"""Typed dataclass configs: strict loading from dicts and files, dotted overrides, argparse flags.

Every config in `ofe` is a (possibly nested) dataclass. This module turns untrusted input
(a TOML/JSON file, ``--key value`` pairs) into such a dataclass, rejecting unknown keys and
ill-typed values with a :class:`ConfigError` that names the offending key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from ofe.errors import OfeError

T = TypeVar("T")


class ConfigError(OfeError, ValueError):
    """A user-facing configuration problem; the message names the key."""


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """Return (True, inner) for ``X | None``; (False, tp) otherwise."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{_type_name(inner)} or none"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


SEED_LIMIT = 2**32  # every option named seed (or a list named seeds) is a seed: torch, numpy and Python all take these


DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")  # every option named "device"; availability: ofe.train.distributed


def _is_seed(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf == "seed" or leaf.startswith("seeds[")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    optional, inner = _is_optional(tp)
    if optional:
        return None if value is None else _coerce(value, inner, key)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a table of settings, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {_type_name(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if _is_seed(key) and not 0 <= value < SEED_LIMIT:
            raise ConfigError(f"config key '{key}': a seed must be in [0, 2**32), got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(value):  # no setting means anything with inf or nan
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        if key.rsplit(".", 1)[-1] == "device" and not DEVICE.fullmatch(value):
            raise ConfigError(f"config key '{key}': unknown device {value!r} (auto, cpu, cuda, cuda:N)")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for key '{key}'")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown or ill-typed keys raise :class:`ConfigError`."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default)}
    kwargs = {}
    for k, v in data.items():
        if k in defaults and isinstance(v, dict):  # a partial table overrides the field's default instance
            v = {**to_dict(defaults[k]), **v}
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a dataclass config (tuples become lists), JSON/TOML-serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"config file {path}: expected a .toml or .json file")
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"cannot parse config file {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table of keys, not {type(data).__name__}")
    return data


def _field_type(cls: type, dotted: str) -> Any:
    """Annotation of the (possibly nested) field ``dotted`` of ``cls``."""
    tp: Any = cls
    for part in dotted.split("."):
        _, tp = _is_optional(tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key '{dotted}'")
        hints = get_type_hints(tp)
        if part not in hints:
            raise ConfigError(f"unknown config key '{dotted}'")
        tp = hints[part]
    return tp


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line string for a field annotated ``tp``."""
    optional, inner = _is_optional(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    tp = inner
    if tp is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"config key '{key}': expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"config key '{key}': expected a number, got {text!r}") from None
    if get_origin(tp) is tuple:
        return [parse_value(t.strip(), get_args(tp)[0], key) for t in text.split(",") if t.strip()]
    if get_origin(tp) is Literal:
        for option in get_args(tp):
            if str(option) == text:
                return option
        raise ConfigError(f"config key '{key}': {text!r} is not one of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"config key '{key}' is a table; set its fields as '{key}.<field>'")
    return text


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted == 'a.b'``, creating tables as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a table")
        node = child
    node[leaf] = value


def apply_overrides(cls: type, data: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Return a copy of ``data`` with string ``overrides`` (dotted key -> text) parsed and set."""
    out = json.loads(json.dumps(data))
    for key, text in overrides.items():
        set_dotted(out, key, parse_value(text, _field_type(cls, key), key))
    return out


def iter_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted name, annotation, default, help) for every leaf field of ``cls``."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, prefix + f.name + ".")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        yield prefix + f.name, tp, default, f.metadata.get("help", "")


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--dotted.name VALUE`` flag per leaf field of ``cls``, with type and default in the help."""
    group = parser.add_argument_group(f"{cls.__name__} options (also settable in a config file)")
    for name, tp, default, help_text in iter_fields(cls, prefix):
        shown = "required" if default is dataclasses.MISSING else json.dumps(default)
        group.add_argument(
            f"--{name}",
            dest=f"cfg:{name}",
            metavar=_type_name(tp).upper().replace(" ", "_") if get_origin(tp) is not Literal else "{" + ",".join(map(str, get_args(tp))) + "}",
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {shown})".strip(),
        )


def overrides_from_namespace(ns: argparse.Namespace) -> dict[str, str]:
    """Collect the ``--dotted.name`` flags that were given on the command line."""
    return {k[4:]: v for k, v in vars(ns).items() if k.startswith("cfg:")}


def field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """``dataclasses.field`` with a ``help`` string shown by ``--help``."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
