"""No write through a symlink, no foreign files replaced, stale temporaries cleaned, a damaged
checkpoint step refused (issue 29's first class). Real symlinks pointing outside the target."""


import pytest
import torch

from ofe.cli import main
from ofe.io import UnsafePath, atomic_write, clean_stale_temporaries, exclusive_lock, open_append
from ofe.run_dir import RunDir, RunState


@pytest.fixture
def outside(tmp_path):
    """A user's file outside the target, which nothing may change."""
    victim = tmp_path / "outside" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("the user's data\n")
    return victim


def _unchanged(victim):
    return victim.read_text() == "the user's data\n" and sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


def test_atomic_write_refuses_a_link_and_ignores_a_planted_temporary(tmp_path, outside):
    target = tmp_path / "out"
    target.mkdir()
    (target / "result.json").symlink_to(outside)
    with pytest.raises(UnsafePath, match="result.json is a symbolic link"):
        atomic_write(target / "result.json", lambda p: p.write_text("{}"))
    (target / ".other.json.tmp").symlink_to(outside)  # the predictable temporary name of earlier versions
    atomic_write(target / "other.json", lambda p: p.write_text("{}"))
    assert (target / "other.json").read_text() == "{}" and _unchanged(outside)
    assert not [p.name for p in target.iterdir() if p.name.endswith(".tmp") and p.name != ".other.json.tmp"]


def test_locks_and_appends_do_not_follow_links(tmp_path, outside):
    (tmp_path / ".lock").symlink_to(outside)
    with pytest.raises(UnsafePath, match=".lock is a symbolic link"):
        with exclusive_lock(tmp_path / ".lock"):
            pass
    (tmp_path / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(UnsafePath, match="metrics.jsonl is a symbolic link"):
        open_append(tmp_path / "metrics.jsonl")
    assert _unchanged(outside)


def test_stale_temporaries_of_ofes_own_naming_are_cleaned(tmp_path, outside):
    (tmp_path / ".config.json.ab12cd34.tmp").write_text("half")
    (tmp_path / ".weights.st.zz99yy88.tmp").symlink_to(outside)  # a link is removed, never followed
    (tmp_path / ".keep.tmp").write_text("not ours")  # not our pattern
    (tmp_path / "notes.ab12cd34.tmp").write_text("not hidden: not ours")
    assert sorted(clean_stale_temporaries(tmp_path)) == [".config.json.ab12cd34.tmp", ".weights.st.zz99yy88.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.tmp", "notes.ab12cd34.tmp", "outside"] and _unchanged(outside)


def _train(out, *extra):
    return main(["train", "--out_dir", str(out), "--preset", "tiny", "--steps", "4", "--batch_size", "4", "--eval_batches",
                 "1", "--eval_interval", "2", "--ckpt_interval", "2", "--progress", "false", "--data.corpus",
                 "bigram-backcopy", *extra])


def test_train_refuses_a_folder_of_user_files_and_a_linked_lock(tmp_path, outside, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in (("tokenizer.json", "{}"), ("run.json", "[]"), ("metrics.jsonl", "user log\n")):
        (folder / name).write_text(text)
    assert RunDir(folder).state() is RunState.FOREIGN
    assert _train(folder) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds files ofe did not write (tokenizer.json, metrics.jsonl, run.json)" in err
    assert (folder / "metrics.jsonl").read_text() == "user log\n" and (folder / "run.json").read_text() == "[]"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".lock").symlink_to(outside)
    assert _train(linked) == 2
    assert ".lock is a symbolic link" in capsys.readouterr().err and _unchanged(outside)


def test_a_run_killed_before_its_config_is_finished_by_a_re_run(tmp_path):
    """The marker comes first: a directory with ofe's marker and an identity but no config is ofe's own
    half-started run, which a plain re-run replaces (a kill between the marker and the config)."""
    out = tmp_path / "run"
    out.mkdir()
    RunDir(out).mark()
    RunDir(out).write_identity("fingerprint-of-a-killed-start")
    (out / ".run.json.ab12cd34.tmp").write_text("torn")  # killed mid-write
    assert RunDir(out).state() is RunState.NEW
    assert _train(out) == 0 and RunDir(out).is_finished()
    assert not list(out.glob(".*.tmp"))


def test_a_report_never_writes_through_a_linked_figures_folder(tmp_path, outside, capsys):
    run = tmp_path / "run"
    assert _train(run) == 0
    report = tmp_path / "report"
    assert main(["report", str(run), "--out_dir", str(report)]) == 0
    (report / "figures").rename(tmp_path / "old-figures")
    (report / "figures").symlink_to(outside.parent)
    assert main(["report", str(run), "--out_dir", str(report)]) == 2
    assert "figures is a symbolic link" in capsys.readouterr().err and _unchanged(outside)


def test_a_checkpoint_step_beyond_the_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "6") == 0
    run = RunDir(out)
    state = run.load_checkpoint()
    state["step"] = 1_000_000
    torch.save(state, run.checkpoint_path)
    run.weights_path.unlink()  # as if the run had not finished
    assert _train(out, "--steps", "6", "--resume", "true") == 2
    err = capsys.readouterr().err.strip()
    assert "is at step 1000000, outside the run's 0..6" in err and len(err.splitlines()) == 1
    assert not run.weights_path.exists()


def test_an_empty_checkpoint_is_one_line(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoint_path.write_bytes(b"")
    from ofe.run_dir import CheckpointError
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        run.load_checkpoint()
