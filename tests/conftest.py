import os
import tempfile

import pytest

# One token cache for the whole session, outside the user's home: the standard-library corpus is
# tokenised once and every test that trains on it maps the same arrays.
os.environ.setdefault("OFE_CACHE", tempfile.mkdtemp(prefix="ofe-test-cache-"))


def write_corpus(root, files: int):
    """``files`` Python-ish files in ``root``: enough text for tiny models, fast to tokenise."""
    root.mkdir(exist_ok=True)
    for i in range(files):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (root / f"m{i:03d}.py").write_text(f"# module {i}\nimport os\n\n{body}")
    return root


@pytest.fixture
def small_corpus(tmp_path):
    """A directory of a hundred-odd Python-ish files, per test."""
    return write_corpus(tmp_path / "corpus", 120)


@pytest.fixture(scope="module")
def small_corpus_module(tmp_path_factory):
    """Sixty such files, shared by a module's tests."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), 60)
