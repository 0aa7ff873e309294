"""Property-based fuzzing of the command line (issue 29): generated config files, sweep specs and damaged
run folders, for the commands that read them. Whatever the input: the exit code is one of 0, 2, 3, 130,
there is no traceback, an error is one line, and no file outside the command's target changes.

Bounded for the suite (``FUZZ_EXAMPLES`` examples per property, about 60 s in all on 2 cores); set
``OFE_FUZZ_EXAMPLES`` for a longer profile, e.g. ``OFE_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py``.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ofe.cli import main  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("OFE_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Keys the readers know (so that generated files reach past the first unknown key), plus noise.
KEYS = ["preset", "out_dir", "seeds", "other_seeds", "steps", "batch_size", "lr", "tune", "betas", "corpus", "blocks",
        "optimizers", "quantize", "device", "workers", "dry_run", "base", "grid", "variants", "name", "model", "optim",
        "model.block", "optim.lr", "seed", "data", "zzz", ""]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["tiny", "pre-ln", "op", "adamw", "soap", "../x", "/", "cpu",
                                                          "cuda:99", "1e-3", "0,1"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=12)
DOCUMENTS = st.one_of(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6), VALUES)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*") if not p.is_symlink()}


def _check(code: int, err: str, command: str) -> None:
    assert code in (0, 2, 3, 130), (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"ofe {command}: error")]
    if code:
        assert len(errors) == 1, err


@pytest.fixture
def outside(tmp_path_factory):
    """A folder outside every target, with a file that must never change."""
    root = tmp_path_factory.mktemp("outside")
    (root / "keep.txt").write_text("the user's")
    return root


def _run_in(work: Path, argv: list[str], capsys) -> tuple[int, str]:
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().err


@FUZZ
@given(doc=DOCUMENTS)
def test_generated_reproduce_configs(doc, tmp_path_factory, outside, capsys):
    work = tmp_path_factory.mktemp("work")
    (work / "config.json").write_text(json.dumps(doc, allow_nan=True))
    before = _snapshot(outside)
    code, err = _run_in(work, ["reproduce", "--config", "config.json", "--dry_run", "true"], capsys)
    _check(code, err, "reproduce")
    assert _snapshot(outside) == before


@FUZZ
@given(doc=DOCUMENTS)
def test_generated_sweep_specs(doc, tmp_path_factory, outside, capsys):
    work = tmp_path_factory.mktemp("work")
    (work / "spec.json").write_text(json.dumps(doc, allow_nan=True))
    before, inside = _snapshot(outside), _snapshot(work)
    code, err = _run_in(work, ["sweep", "spec.json", "--dry_run", "true", "--progress", "false"], capsys)
    _check(code, err, "sweep")
    assert _snapshot(outside) == before and _snapshot(work) == inside  # a dry run writes nothing


def _damage(run: Path, outside: Path, choice: int, name: str, offset: int, data: bytes) -> None:
    """One kind of damage to one file of a run folder."""
    target = run / name
    if choice == 0 and target.is_file() and not target.is_symlink():
        raw = target.read_bytes()
        target.write_bytes(raw[: offset % (len(raw) + 1)])  # truncated
    elif choice == 1 and target.is_file() and not target.is_symlink():
        raw = bytearray(target.read_bytes())
        if raw:
            raw[offset % len(raw)] = data[0] if data else 0xFF  # one byte changed
        target.write_bytes(bytes(raw))
    elif choice == 2:
        target.unlink(missing_ok=True) if target.is_symlink() or not target.is_dir() else shutil.rmtree(target)
    elif choice == 3:
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        target.symlink_to(outside / "keep.txt")  # a link to the user's file
    elif choice == 4:
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            target.unlink()
        target.mkdir(exist_ok=True)  # a folder where a file was
    else:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.is_symlink():
            target.unlink()
        target.write_bytes(data)  # replaced by garbage


RUN_FILES = ["config.json", "metrics.jsonl", "quant.json", "run.json", "DIVERGED", "tokenizer.json"]


@FUZZ
@given(damages=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(RUN_FILES), st.integers(0, 10**6),
                                  st.binary(max_size=40)), min_size=1, max_size=3))
def test_damaged_run_folders_for_report(damages, tmp_path_factory, outside, capsys):
    from test_report import make_run

    work = tmp_path_factory.mktemp("work")
    run = make_run(work / "runs", "run", "pre-ln", "adamw", 0, 8.0, 2.0, w8a8=5.0, w8a4=200.0, steps=20)
    for choice, name, offset, data in damages:
        _damage(run, outside, choice, name, offset, data)
    before = _snapshot(outside)
    code, err = _run_in(work, ["report", str(work / "runs"), "--out_dir", str(work / "report")], capsys)
    _check(code, err, "report")
    assert _snapshot(outside) == before


# Train options with the values a hurried or hostile user types. Sizes come from a list of edge values
# (never a large valid size: a fuzzed run must stay tiny), as strings the way the shell hands them over.
EDGE = ["-1", "0", "1", "2", "3", "0.5", "1e-3", "-1e-3", "1e39", "nan", "inf", "-inf", str(2**32), str(2**64),
        str(-2**63), "", "abc", "1,2", "\udcff", "x" * 300]
TRAIN_OPTIONS = {
    "seed": EDGE, "steps": EDGE, "batch_size": EDGE, "grad_accum": EDGE, "eval_interval": EDGE, "eval_batches": EDGE,
    "monitor_interval": EDGE, "ckpt_interval": EDGE, "quant_probe": EDGE, "optim.lr": EDGE, "optim.eps": EDGE,
    "optim.weight_decay": EDGE, "optim.betas": EDGE + ["0.9,0.95", "0.9"], "optim.warmup_frac": EDGE,
    "optim.name": ["adamw", "soap", "muon", "adafactor", "sgd", ""], "model.block": ["pre-ln", "op", "foo", ""],
    "model.d_model": EDGE + ["10000000"], "model.n_head": EDGE, "model.n_layer": EDGE, "model.layerscale": EDGE,
    "model.activation": ["gelu", "relu", "swiglu", "tanh", ""], "dtype": ["float32", "bfloat16", "float16", ""],
    "device": ["cpu", "cuda", "cuda:99", "foo", "auto", "", "mps"], "data.glob": ["", "/", "/etc/*", "..", "*.txt", "**/*"],
    "data.val_fraction": EDGE, "data.tokenizer": ["byte", "bpe", "words", ""], "data.bpe_vocab_size": EDGE,
    "data.corpus": ["", "/", "bigram-backcopy:docs=1000000000", "bigram-backcopy:length=2", "missing"],
    "out_dir": ["", "/", "run", "run/../../escape", "\udcff", "x" * 300, "a/" * 2500],
    "resume": ["true", "false", "maybe"], "parallel": ["ddp", "fsdp", "tp"],
}


@settings(parent=FUZZ, max_examples=max(10, FUZZ_EXAMPLES // 2))
@given(options=st.dictionaries(st.sampled_from(sorted(TRAIN_OPTIONS)), st.integers(0, 10**6), min_size=1, max_size=3))
def test_generated_train_options(options, tmp_path_factory, outside, small_corpus, capsys):
    work = tmp_path_factory.mktemp("work")
    argv = ["train", "--preset", "tiny", "--steps", "1", "--batch_size", "2", "--eval_batches", "1", "--progress", "false",
            "--data.corpus", str(small_corpus), "--out_dir", "run"]
    for key, pick in options.items():
        values = TRAIN_OPTIONS[key]
        argv += [f"--{key}", values[pick % len(values)]]
    before = _snapshot(outside)
    try:
        code, err = _run_in(work, argv, capsys)
    except SystemExit as e:  # argparse: an unknown value of a choice, a missing value
        code, err = e.code, capsys.readouterr().err
    _check(code, err, "train")
    assert _snapshot(outside) == before


# Every name a run, its quantisation and its report write (and their temporaries' predictable stems).
PLANTED = [".lock", ".ofe-run", "config.json", "run.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.prev.pt",
           "model.safetensors", "quant.json", "tokenizer.json", "DIVERGED", ".write-test", ".config.json.tmp",
           ".quant.json.tmp", "tb", "weights", "rep", "rep/summary.json", "rep/report.md", "rep/figures", "rep/.report.lock"]
COMMANDS = {
    "resume": ["train", "--out_dir", "run", "--resume", "true", "--progress", "false"],
    "quantize": ["quantize", "run", "--eval_sequences", "2", "--quant.calib_batches", "1", "--quant.calib_batch_size", "2"],
    "report": ["report", "run", "--out_dir", "rep"],
}


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory, small_corpus_module):
    """A tiny run stopped after its step-2 checkpoint (4 steps asked): resumable, quantisable once finished."""
    root = tmp_path_factory.mktemp("pristine")
    assert main(["train", "--preset", "tiny", "--steps", "2", "--batch_size", "2", "--eval_batches", "1", "--eval_interval",
                 "1", "--ckpt_interval", "1", "--progress", "false", "--data.corpus", str(small_corpus_module),
                 "--out_dir", str(root / "run")]) == 0
    return root / "run"


@settings(parent=FUZZ, max_examples=max(8, FUZZ_EXAMPLES // 5))
@given(plants=st.lists(st.tuples(st.sampled_from(PLANTED), st.booleans()), min_size=1, max_size=2),
       command=st.sampled_from(sorted(COMMANDS)))
def test_links_planted_where_a_command_writes(plants, command, tmp_path_factory, outside, unfinished_run, capsys):
    """A symbolic link (to the user's file, or to a folder of theirs) at any name the command writes: it
    finishes or refuses in one line, and nothing outside changes."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(unfinished_run, work / "run", symlinks=True)
    for name, to_folder in plants:
        target = work / "run" / name if not name.startswith("rep") else work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        target.symlink_to(outside if to_folder else outside / "keep.txt")
    before = _snapshot(outside)
    code, err = _run_in(work, COMMANDS[command], capsys)
    _check(code, err, COMMANDS[command][0])
    assert _snapshot(outside) == before and sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
