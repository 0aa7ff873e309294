"""The package's structure: no import cycle between ofe's parts, training never imports analysis,
one module knows the run directory's file names, every user-facing error derives from OfeError."""

import ast
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import pytest

import ofe
from ofe.errors import OfeError

SRC = Path(ofe.__file__).parent


def _part(module: str) -> str:
    """``ofe.train.loop`` -> ``train``; ``ofe.run_dir`` -> ``run_dir``."""
    return module.split(".")[1]


def _imports(path: Path, module: str) -> set[str]:
    """Every ``ofe.*`` module that ``path`` imports, at any depth of the file (lazy imports too)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ofe.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("ofe."):
                found.add(name)
            elif name == "ofe":
                found |= {f"ofe.{a.name}" for a in node.names}
    return found


def part_graph() -> dict[str, set[str]]:
    """Which of ofe's parts (sub-packages and top-level modules) import which others."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module == "ofe" or module == "ofe.__main__":
            continue
        src = _part(module)
        graph.setdefault(src, set())
        graph[src] |= {_part(m) for m in _imports(path, module) if _part(m) != src}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_ofe_parts():
    graph = part_graph()
    assert {"train", "analysis", "monitor", "run_dir", "optim", "models"} <= set(graph)
    assert find_cycle(graph) is None, find_cycle(graph)


# Which of ofe's parts each part may import: the layers of docs/architecture.md. Reading a run back
# (quant, analysis, report) goes through run_dir and run_config, never through train.
FOUNDATION = {"errors", "io", "config", "resources"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "resources": set(),  # what the machine can hold
    "io": {"errors"},
    "config": {"errors"},
    "metrics": {"errors", "config"},  # pure tensor functions: nothing of models or training
    "models": FOUNDATION,
    "data": FOUNDATION,
    "optim": FOUNDATION,
    "run_config": FOUNDATION | {"models", "data", "optim"},  # settings only
    "run_dir": FOUNDATION | {"run_config"},
    "monitor": FOUNDATION | {"metrics"},
    "train": FOUNDATION | {"metrics", "models", "data", "optim", "monitor", "run_config", "run_dir", "quant"},  # the probe
    "quant": FOUNDATION | {"metrics", "models", "data", "monitor", "run_config", "run_dir", "analysis"},
    "analysis": FOUNDATION | {"metrics", "models", "optim", "monitor", "run_config", "run_dir"},
    "report": FOUNDATION | {"metrics", "analysis", "run_dir"},
    "audit": FOUNDATION | {"metrics", "data", "monitor", "quant"},
    "callbacks": FOUNDATION | {"models", "monitor", "quant"},  # the quantisation probe
    "titan": FOUNDATION | {"monitor", "optim", "callbacks"},  # ofe inside torchtitan
    "zoo": FOUNDATION | {"metrics", "models", "data", "monitor"},
    "experiment": FOUNDATION | {"metrics", "models", "data", "optim", "monitor", "run_config", "run_dir", "train",
                                "quant", "analysis", "report"},
}


def test_each_part_imports_only_the_parts_its_layer_allows():
    graph = part_graph()
    assert set(graph) - {"cli"} <= set(ALLOWED), sorted(set(graph) - {"cli"} - set(ALLOWED))  # a new part needs a row
    extra = {part: sorted(imports - ALLOWED[part]) for part, imports in graph.items()
             if part != "cli" and imports - ALLOWED[part]}
    assert not extra, extra


def test_only_train_experiment_and_cli_import_the_trainer():
    graph = part_graph()
    assert sorted(p for p, imports in graph.items() if "train" in imports) == ["cli", "experiment"]
    assert "monitor" in graph["train"] and "run_dir" in graph["train"]


def test_the_allowed_table_has_no_cycle():
    assert find_cycle(ALLOWED) is None


@pytest.mark.parametrize("literal", ["config.json", "checkpoint.pt", "metrics.jsonl", "model.safetensors",
                                     "quant.json", "sweep_run.json", "DIVERGED"])
def test_one_module_names_each_run_directory_file(literal):
    """No string in any other module (code or docstring) names a run-directory file."""
    def strings(path):
        return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                and isinstance(n.value, str)]
    holders = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if any(literal in s for s in strings(p)))
    assert holders == ["run_dir.py"], holders


OPTIONAL = {"ofe.titan": "torchtitan"}  # modules of an optional extra, importable only with it


def _all_modules():
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(ofe.__path__, "ofe.")
            if m.name != "ofe.__main__" and importlib.util.find_spec(OPTIONAL.get(m.name, "ofe")) is not None]


def test_every_ofe_error_class_derives_from_ofe_error():
    errors = {obj for mod in _all_modules() for _, obj in inspect.getmembers(mod, inspect.isclass)
              if issubclass(obj, Exception) and obj.__module__.startswith("ofe.")}
    names = {e.__name__ for e in errors}
    assert {"ConfigError", "CorpusError", "TrainError", "NonFiniteLoss", "RunDirError", "CheckpointError",
            "QuantError", "AuditError", "RunError", "ReportError"} <= names
    outside = {e.__name__ for e in errors if not issubclass(e, OfeError)} - {"LockHeld"}  # internal signal, caught
    assert not outside, outside


def test_cli_catches_user_errors_once_and_nothing_else():
    """The command line catches ofe's own errors, the operating system's (a path, a full disk) and text
    encoding errors, each turned into one line, and Ctrl-C or SIGTERM (``Terminated``, a KeyboardInterrupt);
    any other exception is a bug and keeps its traceback."""
    tree = ast.parse((SRC / "cli.py").read_text())
    caught = {ast.unparse(h.type) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.type is not None}
    assert caught == {"OfeError", "OSError", "UnicodeError", "KeyboardInterrupt", "Terminated"}


def test_no_two_modules_of_a_package_import_each_other():
    """Inside a package too, imports point one way (e.g. optim's config reads the registry; the registry
    describes what it reads of a config by a Protocol, not by importing it back)."""
    edges = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for target in _imports(path, module):
            if target != module and target.rsplit(".", 1)[0] == module.rsplit(".", 1)[0] and path.name != "__init__.py":
                edges.add((module, target))
    mutual = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not mutual, mutual
