"""Corpora, split, tokenizers, the token cache and batches."""

import json

import numpy as np
import pytest
import torch

from ofe.data import (
    BPETokenizer,
    ByteTokenizer,
    CorpusError,
    DataConfig,
    default_sample,
    is_validation,
    load_tokenizer,
    open_corpus,
    prepare,
    random_windows,
    stdlib_files,
    stdlib_root,
    train_batch,
    val_windows,
)
from ofe.data import dataset as dataset_module


def test_stdlib_corpus_is_python_source_and_deterministic():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert files == sorted(files) and (stdlib_root() / "os.py") in files
    a, b = default_sample(1 << 16), default_sample(1 << 16)
    assert a.dtype == np.uint8 and len(a) == 1 << 16 and np.array_equal(a, b)
    assert b"def " in a.tobytes()


def test_split_is_deterministic_and_near_the_fraction():
    ids = [f"pkg/mod{i}.py" for i in range(4000)]
    val = [i for i in ids if is_validation(i, 0.1)]
    assert val == [i for i in ids if is_validation(i, 0.1)]
    assert 300 < len(val) < 500
    assert set(val) <= {i for i in ids if is_validation(i, 0.2)}  # monotone in the fraction


def test_prepare_stdlib_splits_by_file_and_caches(monkeypatch):
    cfg = DataConfig()
    data = prepare(cfg, log=lambda *a: None)
    assert data.vocab_size == 256 and data.train.dtype == np.uint8
    assert data.meta["train_docs"] > 10 * data.meta["val_docs"] > 0
    assert len(data.train) > 10_000_000 and len(data.val) > 100_000
    corpus = open_corpus("stdlib")
    val_ids = [d for d, _ in corpus.documents() if is_validation(d, cfg.val_fraction)]
    assert len(val_ids) == data.meta["val_docs"]
    monkeypatch.setattr(dataset_module, "_build", lambda *a: pytest.fail("cache miss on the second run"))
    again = prepare(cfg, log=lambda *a: None)
    assert again.directory == data.directory and np.array_equal(again.val, data.val)


def test_directory_corpus_skips_and_counts_unreadable_files(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("hello world " * 50)
    (root / "b.txt").write_bytes(b"\xff\xfe\x00bad latin-1 \xe9")
    (root / "sub").mkdir()
    (root / "sub" / "c.txt").write_text("more text " * 50)
    docs = list((corpus := open_corpus(str(root))).documents())
    assert sorted(d for d, _ in docs) == ["a.txt", "sub/c.txt"] and corpus.skipped == 1
    data = prepare(DataConfig(corpus=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.5), log=lambda *a: None)
    assert data.meta["skipped_files"] == 1
    assert data.meta["train_tokens"] + data.meta["val_tokens"] == 600 + 500


def test_txt_and_jsonl_corpora(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("".join(f"line {i}\n" for i in range(1000)))
    docs = list(open_corpus(str(txt)).documents())
    assert len(docs) == 5 and "".join(t for _, t in docs) == txt.read_text()
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"content": f"doc {i}", "id": i}) for i in range(10)) + "\n")
    assert [t for _, t in open_corpus(str(jl), text_field="content").documents()][:2] == ["doc 0", "doc 1"]
    with pytest.raises(CorpusError, match="no string field 'text'"):
        list(open_corpus(str(jl)).documents())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: not valid JSON"):
        list(open_corpus(str(bad)).documents())


@pytest.mark.parametrize("source,needle", [("/no/such/corpus", "not found"), ("__file__.csv", "expected 'stdlib'")])
def test_bad_corpus_sources(tmp_path, source, needle):
    if source.endswith(".csv"):
        source = str(tmp_path / "x.csv")
        (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=needle):
        open_corpus(source)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no files match"):
        open_corpus(str(empty))


def test_tokenizer_round_trips(tmp_path):
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓\n"
    byte = ByteTokenizer()
    assert byte.decode(byte.encode(text)) == text and max(byte.encode(text)) < 256
    byte.save(tmp_path / "b.json")
    assert isinstance(load_tokenizer(tmp_path / "b.json"), ByteTokenizer)
    corpus = [f"def g{i}(a, b):\n    return a + b * {i}\n" for i in range(300)]
    bpe = BPETokenizer.train(corpus, vocab_size=400)
    assert bpe.vocab_size == 400 and bpe.eos_id is not None
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(bpe.encode(corpus[5])) < len(corpus[5].encode()) / 2  # it learned merges
    bpe.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").encode(text) == ids


def test_bpe_prepare_separates_documents_with_eos(small_corpus, tmp_path):
    cfg = DataConfig(corpus=str(small_corpus), tokenizer="bpe", bpe_vocab_size=512, cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, log=lambda *a: None)
    assert 257 < data.vocab_size <= 512 and data.train.dtype == np.uint16  # fewer if merges run out
    eos = data.tokenizer.eos_id
    assert int((np.asarray(data.train) == eos).sum()) == data.meta["train_docs"]
    text = data.tokenizer.decode(np.asarray(data.train[:200]).tolist())
    assert text.startswith("# module")


def test_batches_are_seeded_windows_of_the_corpus():
    tokens = np.arange(5000, dtype=np.uint16)
    a = train_batch(tokens, 4, 16, seed=1, step=3, micro=0)
    assert a.shape == (4, 17) and np.array_equal(a, train_batch(tokens, 4, 16, seed=1, step=3, micro=0))
    assert not np.array_equal(a, train_batch(tokens, 4, 16, seed=1, step=4, micro=0))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()
    v = val_windows(tokens, 5, 16)
    assert v[0, 0] == 0 and v[-1, -1] == 4999 and np.array_equal(v, val_windows(tokens, 5, 16))


def test_random_windows_are_seeded_slices():
    tokens = np.arange(1000, dtype=np.uint8)
    w1, w2 = random_windows(tokens, 4, 16, seed=3), random_windows(tokens, 4, 16, seed=3)
    assert w1.shape == (4, 16) and (w1 == w2).all()
    assert (((w1[:, 1:] - w1[:, :-1]) % 256) == 1).all()
    with pytest.raises(CorpusError, match="fewer than"):
        random_windows(tokens[:10], 1, 16, seed=0)


def test_bos_windows_start_with_the_bos_token_then_the_same_text():
    tokens = np.arange(1000, dtype=np.uint8) % 200
    plain = train_batch(tokens, 4, 16, seed=3, step=7)
    bos = train_batch(tokens, 4, 16, seed=3, step=7, bos_id=256)
    assert bos.shape == plain.shape == (4, 17)
    assert (bos[:, 0] == 256).all() and torch.equal(bos[:, 1:], plain[:, :-1])  # same starts, one token less text
    val = val_windows(tokens, 3, 16, bos_id=256)
    assert (val[:, 0] == 256).all() and torch.equal(val[:, 1:], val_windows(tokens, 3, 16)[:, :-1])


def test_bos_grows_the_vocabulary_and_trains(tmp_path, small_corpus):
    from ofe.run_dir import RunDir
    from ofe.train import build_train_config, train

    cfg = build_train_config({"out_dir": str(tmp_path / "run"), "preset": "tiny", "steps": 2, "batch_size": 4,
                              "eval_batches": 1, "progress": False, "data": {"corpus": str(small_corpus), "bos": True}})
    train(cfg, log=lambda *a: None)
    assert RunDir(tmp_path / "run").config().model.vocab_size == 257


@pytest.mark.parametrize("damage,reason", [
    (lambda d: (d / "meta.json").write_text("{garbage"), "meta.json unreadable"),
    (lambda d: (d / "train.bin").write_bytes(b""), "train.bin holds 0 bytes"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()), "train_tokens": 7})),
     "does not match its checksum"),
    (lambda d: (d / "meta.json").write_text(json.dumps({"dtype": 3})), "lacks a field"),
])
def test_a_damaged_token_cache_is_rebuilt_with_a_warning(small_corpus, tmp_path, damage, reason):
    from ofe.data import DataConfig, prepare
    cfg = DataConfig(corpus=str(small_corpus), cache_dir=str(tmp_path / "cache"))
    fresh = prepare(cfg, log=lambda *a: None)
    train, val = np.array(fresh.train), np.array(fresh.val)
    damage(fresh.directory)
    with pytest.warns(UserWarning, match=f"is damaged \\((meta.json )?{reason}"):
        again = prepare(cfg, log=lambda *a: None)
    assert np.array_equal(np.array(again.train), train) and np.array_equal(np.array(again.val), val)
    assert dataset_module.cache_problem(again.directory) is None


def _as_old_cache(directory):
    """Drop the tokenizer checksum (as caches written before it), with meta.json's own checksum kept valid."""
    meta = json.loads((directory / "meta.json").read_text())
    meta.pop("tokenizer_sha256")
    meta["checksum"] = dataset_module._meta_checksum(meta)
    (directory / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,reason", [
    (lambda d: (d / "tokenizer.json").write_text("garbage"), "tokenizer.json does not match its checksum"),
    (lambda d: (_as_old_cache(d), (d / "tokenizer.json").write_text("garbage")), "is not a tokenizer file"),
    (lambda d: (_as_old_cache(d), (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')),
     "is not a tokenizer file .Missing vocab"),
    (lambda d: (_as_old_cache(d), (d / "tokenizer.json").write_bytes(b"\xff\xfe")), "is not a tokenizer file"),
    (lambda d: (_as_old_cache(d), (d / "tokenizer.json").write_text('{"ofe_tokenizer": "byte"}')),
     "tokenizer.json has 256 tokens, the metadata says 2[0-9][0-9]"),
])
def test_a_bpe_cache_with_a_damaged_tokenizer_is_rebuilt(tmp_path, damage, reason):
    """A cache entry whose meta.json and splits are intact but whose tokenizer.json is not: rebuilt with a
    warning naming the problem (it used to be a traceback from the tokenizers library)."""
    from ofe.data import DataConfig, prepare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    for i in range(30):
        (corpus / f"f{i}.txt").write_text(" ".join(words[(i * j + j // 3) % 6] for j in range(200)))
    cfg = DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), tokenizer="bpe", bpe_vocab_size=300)
    fresh = prepare(cfg, log=lambda *a: None)
    assert fresh.tokenizer.vocab_size == fresh.meta["vocab_size"] != 256
    damage(fresh.directory)
    with pytest.warns(UserWarning, match=f"is damaged \\(.*{reason}"):
        again = prepare(cfg, log=lambda *a: None)
    assert np.array_equal(np.array(again.train), np.array(fresh.train))
    assert again.tokenizer.encode("alpha beta") == fresh.tokenizer.encode("alpha beta")
    assert dataset_module.cache_problem(again.directory) is None


def test_a_damaged_cache_entry_with_foreign_files_is_refused_not_deleted(small_corpus, tmp_path):
    from ofe.data import CorpusError, DataConfig, prepare
    cfg = DataConfig(corpus=str(small_corpus), cache_dir=str(tmp_path / "cache"))
    directory = prepare(cfg, log=lambda *a: None).directory
    (directory / "train.bin").write_bytes(b"")
    (directory / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning), pytest.raises(CorpusError, match="holds files ofe did not write"):
        prepare(cfg, log=lambda *a: None)
    assert (directory / "notes.txt").read_text() == "mine"


def test_a_token_cache_entry_is_as_readable_as_a_folder_mkdir_makes(small_corpus, tmp_path):
    """A shared cache: the entry (built in a private temporary folder, then renamed into place) gets the
    umask's folder mode, not mkdtemp's 0700, so other users of the machine can read it."""
    import os
    import stat

    from ofe.data import DataConfig, prepare
    old = os.umask(0o022)
    try:
        entry = prepare(DataConfig(corpus=str(small_corpus), cache_dir=str(tmp_path / "cache")), log=lambda *a: None).directory
    finally:
        os.umask(old)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 for f in entry.iterdir())  # files readable by others
