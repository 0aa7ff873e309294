"""The ofe command line: the zoo main job, presets, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from ofe.cli import main
from ofe.models import expected_param_count, preset


def test_zoo_prints_per_layer_metrics_and_writes_json(tmp_path, capsys):
    out = tmp_path / "zoo.json"
    assert main(["zoo", "--preset", "tiny", "--blocks", "op,pre-ln", "--batch_size", "2", "--json_out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "op  (" in text and "pre-ln  (" in text and "kurtosis" in text
    data = json.loads(out.read_text())
    assert set(data) == {"op", "pre-ln"}
    assert data["op"]["params"] == expected_param_count(preset("tiny", block="op"))
    assert len(data["pre-ln"]["resid"]["kurtosis"]) == 2
    assert all(k >= 1.0 for k in data["pre-ln"]["resid"]["kurtosis"])


def test_zoo_config_file_with_override(tmp_path, capsys):
    cfg = tmp_path / "zoo.toml"
    cfg.write_text('preset = "tiny"\nblocks = ["post-ln"]\nbatch_size = 1\n')
    assert main(["zoo", "--config", str(cfg), "--blocks", "pre-srms"]) == 0
    text = capsys.readouterr().out
    assert "pre-srms" in text and "post-ln" not in text


@pytest.mark.parametrize(
    "args,needle",
    [(["--preset", "huge"], "unknown model preset 'huge'"), (["--blocks", "pre-ln,nope"], "unknown block 'nope'"),
     (["--batch_size", "0"], "'batch_size' must be positive"), (["--seed", "1.5"], "'seed': expected an integer")],
)
def test_bad_input_is_one_line_and_nonzero(args, needle, capsys, tmp_path):
    out = tmp_path / "never.json"
    assert main(["zoo", *args, "--json_out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "zoo.json"
    cfg.write_text(json.dumps({"preset": "tiny", "batchsize": 3}))
    assert main(["zoo", "--config", str(cfg)]) == 2
    assert "unknown config key 'batchsize'" in capsys.readouterr().err


def test_presets_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ofe", "presets"], capture_output=True, text=True, check=True)
    assert "codeparrot-130m" in proc.stdout and f"{expected_param_count(preset('small-cpu')):,}" in proc.stdout
    helptext = subprocess.run([sys.executable, "-m", "ofe", "zoo", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--preset", "--blocks", "--batch_size", "--seed", "--sample_bytes", "--json_out", "--config"):
        assert flag in helptext
    assert "default" in helptext


def test_start_up_imports_nothing_heavy_that_it_does_not_use():
    """`ofe --help` (every command's start) does not import torch's compiler, DCP, scipy or matplotlib:
    together they cost seconds (~11 s to ~3 s for `ofe --help` on a 2-core AMD EPYC); each is imported
    by the code that uses it."""
    heavy = ("torch._dynamo", "torch.distributed.checkpoint", "scipy", "matplotlib")
    code = f"import sys, ofe.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
