import os
import tempfile

import pytest

# One token cache for the whole session, outside the user's home: the standard-library corpus is
# tokenised once and every test that trains on it maps the same arrays.
os.environ.setdefault("OFE_CACHE", tempfile.mkdtemp(prefix="ofe-test-cache-"))


@pytest.fixture
def small_corpus(tmp_path):
    """A directory of a few hundred Python-ish files: enough text for tiny models, fast to tokenise."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(120):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (root / f"m{i:03d}.py").write_text(f"# module {i}\nimport os\n\n{body}")
    return root
