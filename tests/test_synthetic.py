"""The synthetic Bigram-Backcopy corpus: the rule, the transition statistics, the Bayes loss, and its
use as a corpus."""

import math

import numpy as np
import pytest

from ofe.data import BigramBackcopy, CorpusError, DataConfig, open_corpus, prepare
from ofe.data.synthetic import ALPHABET

SMALL = BigramBackcopy(n_triggers=8, n_docs=40, doc_len=2000, seed=3)


def test_every_symbol_after_a_trigger_copies_the_one_before_it():
    x = SMALL.symbols()
    assert x.shape == (40, 2000) and x.min() >= 0 and x.max() < len(ALPHABET)
    trig = x[:, 1:-1] < SMALL.n_triggers  # a trigger at t-1 with a symbol at t-2
    assert trig.sum() > 500
    assert np.array_equal(x[:, 2:][trig], x[:, :-2][trig])


def test_other_transitions_follow_the_transition_matrix():
    x = BigramBackcopy(n_triggers=8, n_docs=200, doc_len=2000, seed=3).symbols()
    p = SMALL.transitions()
    assert np.allclose(p.sum(axis=1), 1.0)
    prev, nxt = x[:, :-1].ravel(), x[:, 1:].ravel()
    keep = prev >= SMALL.n_triggers
    counts = np.zeros_like(p)
    np.add.at(counts, (prev[keep], nxt[keep]), 1)
    rows = counts.sum(axis=1) > 2000
    empirical = counts[rows] / counts[rows].sum(axis=1, keepdims=True)
    assert rows.sum() > 20
    assert np.abs(empirical - p[rows]).max() < 0.04  # ~4 standard errors at these counts


def test_bayes_loss_against_a_plain_loop():
    gen = BigramBackcopy(n_docs=3, doc_len=300, seed=5)
    x = gen.symbols()
    p = gen.transitions()
    total, n = 0.0, 0
    for row in x.tolist():
        for t in range(1, len(row)):
            copied = t >= 2 and row[t - 1] < gen.n_triggers
            total += 0.0 if copied else -math.log(p[row[t - 1]][row[t]])
            n += 1
    assert math.isclose(gen.bayes_loss(x), total / n, rel_tol=1e-12)
    # Knowing the copy rule beats the best bigram-only model, which cannot predict a copy.
    assert gen.bayes_loss(x) < -np.mean(np.log(p[x[:, :-1], x[:, 1:]]))


def test_the_corpus_is_deterministic_and_fingerprinted_by_its_settings():
    a, b = open_corpus("bigram-backcopy"), open_corpus("bigram-backcopy")
    assert a.fingerprint() == b.fingerprint()
    first = [next(a.documents()), next(b.documents())]
    assert first[0] == first[1] and set(first[0][1]) <= set(ALPHABET)
    a.generator = BigramBackcopy(seed=1)
    assert a.fingerprint() != b.fingerprint()


def test_prepare_tokenises_it_as_bytes(tmp_path):
    data = prepare(DataConfig(corpus="bigram-backcopy", cache_dir=str(tmp_path)), log=lambda *a: None)
    gen = BigramBackcopy()
    assert data.meta["train_tokens"] + data.meta["val_tokens"] == gen.n_docs * gen.doc_len
    assert set(np.unique(data.train).tolist()) <= set(ALPHABET.encode())


def test_a_source_string_sets_the_generator_and_bad_settings_name_the_key():
    gen = open_corpus("bigram-backcopy:triggers=8,docs=10,length=64,concentration=0.5,seed=2").generator
    assert gen == BigramBackcopy(n_triggers=8, n_docs=10, doc_len=64, concentration=0.5, seed=2)
    assert open_corpus("bigram-backcopy").generator == BigramBackcopy()
    for source, needle in (("bigram-backcopy:foo=1", "'foo'"), ("bigram-backcopy:docs=x", "docs must be int"),
                           ("bigram-backcopy:triggers", "has no value"), ("bigram-backcopy:triggers=62", "triggers <")):
        with pytest.raises(CorpusError, match=needle):
            open_corpus(source)
