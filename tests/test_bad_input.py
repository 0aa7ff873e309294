"""Every subcommand over a table of user mistakes: exit code 2, one line on stderr naming the problem,
no traceback, and nothing written outside the directory the command was given."""

import contextlib
import json
import os

import pytest

from ofe.cli import main


@pytest.fixture
def world(tmp_path, small_corpus):
    """A scratch directory with the files the bad inputs point at; returns a path formatter."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.toml").write_text("steps = = 3\n")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\nsteps = 3\n")  # not UTF-8
    (tmp_path / "unknown.toml").write_text("stepz = 3\n")
    (tmp_path / "notdir").write_text("a file")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")  # a link loop
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block until a writer comes
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "mine.txt").write_text("user data")
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "tiny"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (tmp_path / "spec_unknown.toml").write_text('out_dir = "sw"\nflavour = 1\n')
    (tmp_path / "spec_escape.toml").write_text('out_dir = "sw"\n[base]\npreset = "tiny"\n[[variants]]\nname = "../escape"\n')
    (tmp_path / "spec_bad.toml").write_text("[base\n")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{broken")
    return lambda s: s.format(t=tmp_path, c=small_corpus)


TRAIN = "train --out_dir {t}/out --preset tiny --steps 2 --batch_size 4 --progress false --data.corpus {c}"
CASES = [
    TRAIN + " --steps abc",
    TRAIN + " --steps -1",
    TRAIN + " --optim.lr nan",
    TRAIN + " --optim.lr inf",
    TRAIN + " --optim.lr 1e39",
    TRAIN + " --optim.weight_decay 1e30",
    TRAIN + " --optim.eps nan",
    TRAIN + " --optim.grad_clip nan",
    TRAIN + " --optim.betas 0.9",
    TRAIN + " --optim.betas 2,3",
    TRAIN + " --optim.rotation.precondition_frequency 3",
    TRAIN + " --model.block foo",
    TRAIN + " --device foo",
    TRAIN + " --device cuda:99",  # no such device here (no CUDA at all on the test machines)
    TRAIN + " --preset nope",
    TRAIN + " --model.n_head 3",
    TRAIN + " --batch_size 3 --grad_accum 2",
    TRAIN + " --data.val_fraction 0",
    TRAIN + " --data.tokenizer words",
    TRAIN + " --data.corpus {t}/missing",
    TRAIN + " --data.corpus {t}/empty.txt",
    TRAIN + " --data.corpus {t}/pipe.txt",
    TRAIN + " --data.corpus bigram-backcopy:triggers=x",
    TRAIN + " --data.corpus bigram-backcopy:nonsense=1",
    TRAIN + " --data.corpus bigram-backcopy:docs=1000000000",  # ~90 TiB to generate: refused by the memory estimate
    TRAIN + " --model.d_model 10000000",
    TRAIN + " --model.layerscale 1e39",  # finite in Python, inf in the float32 parameter
    TRAIN + " --model.beta 1e39",
    TRAIN + " --data.corpus {t}/loop1",  # 2.4e15 parameters: refused before anything is allocated
    TRAIN + " --config {t}/missing.toml",
    TRAIN + " --config {t}/bad.toml",
    TRAIN + " --config {t}/unknown.toml",
    TRAIN + " --config {t}/latin1.toml",
    TRAIN + " --config {t}/plain",
    TRAIN + " --out_dir {t}/notdir",
    TRAIN + " --out_dir {t}/broken",
    TRAIN + " --out_dir {t}/unfinished",
    "train --out_dir {t}/nothing --resume true",
    "train --out_dir {t}/broken --resume true",
    "quantize {t}/missing",
    "quantize {t}/plain",
    "quantize {t}/unfinished",
    "quantize {t}/broken",
    "quantize {t}/unfinished --eval_sequences -1",
    "report {t}/missing",
    "report {t}/plain",
    "report {t}/broken",
    "sweep {t}/missing.toml",
    "sweep {t}/spec_bad.toml",
    "sweep {t}/spec_unknown.toml",
    "sweep {t}/spec_escape.toml",
    "audit {t}/missing",
    "audit {t}/plain",
    "audit {t}/hf",
    "reproduce --blocks foo",
    "reproduce --optimizers sgd",
    "reproduce --preset nope",
    "reproduce --steps -5",
    "reproduce --device gpu",
    "zoo --blocks foo",
    "zoo --preset nope",
    "zoo --batch_size 0",
    "audit {t}/plain --seq_len 1",
]


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = world(case).split()
    before = _snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"ofe {argv[0]}: error: ") and "Traceback" not in err, err
    after = _snapshot(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    allowed = {"out", "out/.lock"}  # a new run's directory and lock may appear before the config is refused
    assert changed <= allowed, (case, sorted(changed))


@pytest.mark.parametrize("args,needle", [
    (["train", "--optim.lr", "-1e-3"], "optim.lr must be in (0, 10], got -0.001"),  # a negative value, not "an option"
    (["train", "--data.corpus", ""], "config key 'data.corpus' is empty"),  # not the current directory
    (["train", "--seed", "-1"], "config key 'seed': a seed must be in [0, 2**32), got -1"),
    (["train", "--seed", str(2**64)], "a seed must be in [0, 2**32)"),
    (["reproduce", "--seeds", "0,-2", "--dry_run", "true"], "config key 'seeds[1]': a seed must be in"),
    (["quantize", "RUN", "--quant.seed", "-5"], "config key 'quant.seed': a seed must be in"),
    (["train", "--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1 (see ofe --help)"),
])
def test_values_the_parser_used_to_misread_are_one_validator_line(tmp_path, capsys, args, needle):
    args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    if args[0] == "train":
        args += ["--out_dir", str(tmp_path / "out"), "--preset", "tiny", "--steps", "1"]
    with pytest.raises(SystemExit) if "unrecognized" in needle else contextlib.nullcontext():
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_file_size_limit_is_one_disk_full_line(tmp_path, small_corpus):
    """EFBIG (``ulimit -f``) while writing a checkpoint: one line naming the file and the limit, exit 2,
    and the run resumes once the limit is lifted."""
    import resource
    import subprocess
    import sys

    out = tmp_path / "run"
    base = [sys.executable, "-m", "ofe", "train", "--preset", "tiny", "--steps", "2", "--batch_size", "4",
            "--progress", "false", "--data.corpus", str(small_corpus)]
    assert subprocess.run(base + ["--out_dir", str(tmp_path / "warm")], capture_output=True, timeout=120).returncode == 0
    args = base + ["--out_dir", str(out)]  # the token cache exists now: the first large write is the checkpoint
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # noqa: E731  (a checkpoint is larger)
    done = subprocess.run(args, preexec_fn=limit, capture_output=True, text=True, timeout=120)
    err = [line for line in done.stderr.strip().splitlines() if line.startswith("ofe train")]
    assert done.returncode == 2, done.stderr
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "checkpoint.pt" in err[0] and ("file too large" in err[0] or "size limit" in err[0]), err[0]
    assert subprocess.run(args + ["--resume", "true"], capture_output=True, timeout=120).returncode == 0
    assert (out / "model.safetensors").is_file()


def test_a_full_disk_while_logging_is_the_one_line_that_names_the_metrics_file(tmp_path, small_corpus, capsys, monkeypatch):
    """ENOSPC on the metrics log: the error the user sees is that one (naming metrics.jsonl), not a second
    ENOSPC from closing the same file while the first one propagates."""
    import errno

    from ofe.train import logger as L

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device", "while closing")

    real_init = L.RunLogger.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._file.close()
        self._file = FullDisk()

    monkeypatch.setattr(L.RunLogger, "__init__", init)
    code = main(["train", "--out_dir", str(tmp_path / "run"), "--preset", "tiny", "--steps", "2", "--batch_size", "4",
                 "--progress", "false", "--data.corpus", str(small_corpus)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "metrics.jsonl" in err[0] and "no space" in err[0].lower() and "while closing" not in err[0], err[0]
