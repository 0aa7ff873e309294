"""Bigram-Backcopy: a synthetic corpus in which attention sinks and massive activations form in minutes.

The task of Guo et al. 2024 ("Active-dormant attention heads: mechanistically demystifying
extreme-token phenomena in LLMs", arXiv 2410.13835). Text over an alphabet of ``len(ALPHABET)``
symbols is a Markov chain with a fixed random transition matrix (each row drawn from a Dirichlet
with a small concentration, so most rows are peaked), except after a *trigger* symbol: the symbol
that follows a trigger copies the symbol just before it ("backcopy"). Predicting the bigram needs
no attention; predicting the copy needs an attention head that looks one position back, but only on
the few trigger positions. On every other position that head has nothing to do, and a trained
Pre-LN model parks its attention on the first position (an attention sink), whose residual stream
grows a massive activation: the extreme-token phenomenon, in a 2-layer model, within a few thousand
steps on a CPU (docs/results/studies/bigram-backcopy.md).

The corpus is a fixed dataset (its own seed, not the training seed), generated in memory: nothing is
read or downloaded. Symbols are ASCII letters and digits, so the byte tokenizer maps them 1:1. The
source string ``bigram-backcopy`` gives the defaults; ``bigram-backcopy:triggers=8,docs=1280,length=1024``
changes some (keys: ``triggers``, ``concentration``, ``docs``, ``length``, ``seed``).
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from ofe.resources import too_big

NAME = "bigram-backcopy"
ALPHABET = string.ascii_letters + string.digits  # 62 symbols, one byte each


@dataclass(frozen=True)
class BigramBackcopy:
    """The generator's settings; every one is part of the corpus fingerprint.

    ``n_triggers``: how many symbols are triggers (the first ones of ``ALPHABET``); ``concentration``:
    the Dirichlet parameter of each transition row (small: peaked rows, a learnable bigram);
    ``n_docs`` x ``doc_len``: the corpus size in symbols (= byte tokens)."""

    n_triggers: int = 3
    concentration: float = 0.1
    n_docs: int = 320
    doc_len: int = 4096
    seed: int = 0
    version: int = 1  # bump when the generated text changes

    def __post_init__(self) -> None:
        if not (0 < self.n_triggers < len(ALPHABET) and self.concentration > 0 and self.n_docs > 0 and self.doc_len > 2):
            raise ValueError(f"need 0 < triggers < {len(ALPHABET)}, concentration > 0, docs > 0, length > 2")

    def transitions(self) -> np.ndarray:
        """Row-stochastic transition matrix, float64 ``(V, V)``."""
        rng = np.random.default_rng(self.seed)
        return rng.dirichlet(np.full(len(ALPHABET), self.concentration), size=len(ALPHABET))

    def symbols(self) -> np.ndarray:
        """The whole corpus as symbol indices, int64 ``(n_docs, doc_len)``; document-parallel
        sampling, one position at a time."""
        cumulative = np.cumsum(self.transitions(), axis=1)
        rng = np.random.default_rng([self.seed, 1])

        def bigram_step(previous: np.ndarray) -> np.ndarray:  # one draw per document (inverse CDF)
            u = rng.random(self.n_docs)
            return (cumulative[previous] < u[:, None]).sum(axis=1).clip(max=len(ALPHABET) - 1)

        x = np.empty((self.n_docs, self.doc_len), dtype=np.int64)
        x[:, 0] = rng.integers(0, len(ALPHABET), size=self.n_docs)
        x[:, 1] = bigram_step(x[:, 0])  # no symbol two back yet: no copy
        for t in range(2, self.doc_len):
            drawn = bigram_step(x[:, t - 1])
            x[:, t] = np.where(x[:, t - 1] < self.n_triggers, x[:, t - 2], drawn)
        return x

    def documents(self) -> Iterator[tuple[str, str]]:
        """``(doc_id, text)`` for every document."""
        letters = np.frombuffer(ALPHABET.encode(), dtype=np.uint8)
        for i, row in enumerate(self.symbols()):
            yield f"{NAME}-{i:05d}", letters[row].tobytes().decode("ascii")

    def bayes_loss(self, x: np.ndarray | None = None) -> float:
        """The lowest expected next-symbol loss any model can reach on ``x`` (default: the corpus), in
        nats per token, counted over positions 1..doc_len-1: the copy is certain after a trigger
        (loss 0) once two symbols are seen, every other symbol costs -log P(next | previous)."""
        x = self.symbols() if x is None else x
        p = self.transitions()
        prev, nxt = x[:, :-1], x[:, 1:]
        nll = -np.log(p[prev, nxt])
        copied = prev < self.n_triggers
        copied[:, 0] = False  # the second symbol has no symbol two back to copy
        return float(np.where(copied, 0.0, nll).mean())


# Generating and tokenising: the int64 symbol array, the text and its tokens held until the cache is written.
PEAK_BYTES_PER_SYMBOL = 24

SPEC_KEYS = {"triggers": ("n_triggers", int), "concentration": ("concentration", float), "docs": ("n_docs", int),
             "length": ("doc_len", int), "seed": ("seed", int)}


def from_spec(source: str) -> BigramBackcopy | None:
    """The generator a corpus source names (``bigram-backcopy[:key=value,...]``), or None when the
    source is not this task. Raises ``ValueError`` naming a bad key or value."""
    name, _, options = source.partition(":")
    if name != NAME:
        return None
    settings = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if key not in SPEC_KEYS:
            raise ValueError(f"corpus {source}: unknown setting {key!r} (known: {', '.join(SPEC_KEYS)})")
        if not eq:
            raise ValueError(f"corpus {source}: setting {key!r} has no value (write {NAME}:{key}=VALUE,...)")
        field_name, kind = SPEC_KEYS[key]
        try:
            settings[field_name] = kind(value)
        except ValueError:
            raise ValueError(f"corpus {source}: {key} must be {kind.__name__}, got {value!r}") from None
    try:
        generator = replace(BigramBackcopy(), **settings)
    except ValueError as e:
        raise ValueError(f"corpus {source}: {e}") from None
    symbols = generator.n_docs * generator.doc_len
    if problem := too_big(symbols * PEAK_BYTES_PER_SYMBOL):
        raise ValueError(f"corpus {source}: {symbols:,} symbols {problem}; lower docs or length")
    return generator
