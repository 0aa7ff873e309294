"""The embedded default corpus: the standard library's own source."""

import numpy as np
import pytest

from ofe.data import CorpusError, default_sample, random_windows, stdlib_files, stdlib_root


def test_stdlib_corpus_is_python_source_and_deterministic():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert files == sorted(files) and (stdlib_root() / "os.py") in files
    a, b = default_sample(1 << 16), default_sample(1 << 16)
    assert a.dtype == np.uint8 and len(a) == 1 << 16 and np.array_equal(a, b)
    assert b"def " in a.tobytes()


def test_random_windows_are_seeded_slices():
    tokens = np.arange(1000, dtype=np.uint8)
    w1, w2 = random_windows(tokens, 4, 16, seed=3), random_windows(tokens, 4, 16, seed=3)
    assert w1.shape == (4, 16) and w1.dtype.is_floating_point is False
    assert (w1 == w2).all()
    diffs = (w1[:, 1:] - w1[:, :-1]) % 256
    assert (diffs == 1).all()  # contiguous windows of the corpus
    with pytest.raises(CorpusError, match="fewer than"):
        random_windows(tokens[:10], 1, 16, seed=0)
