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
