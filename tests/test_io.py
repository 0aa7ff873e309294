"""Atomic writes: a failure while writing leaves the previous file intact and no temporary behind."""

import pytest

from ofe.io import atomic_write


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    target = tmp_path / "ckpt.bin"
    atomic_write(target, lambda p: p.write_bytes(b"first"))
    assert target.read_bytes() == b"first"

    def crashes(p):
        p.write_bytes(b"half-writ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crashes)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]
    atomic_write(target, lambda p: p.write_bytes(b"second"))
    assert target.read_bytes() == b"second"


def test_an_atomic_write_error_names_the_target_not_its_temporary(tmp_path):
    """Under a path whose parent is a file, or onto a directory: the error's file name is the one asked for."""
    import errno

    from ofe.io import atomic_write

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for target, code in ((tmp_path / "afile" / "x.json", errno.ENOTDIR), (tmp_path / "adir", errno.EISDIR)):
        with pytest.raises(OSError) as caught:
            atomic_write(target, lambda p: p.write_text("{}"))
        assert caught.value.errno == code and caught.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no temporary left behind
