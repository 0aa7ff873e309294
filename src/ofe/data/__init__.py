"""Data: corpus sources and split (`corpus`), the synthetic Bigram-Backcopy task (`synthetic`), tokenizers (`tokenizer`), cached token arrays and batches (`dataset`)."""

from ofe.data.corpus import (
    Corpus,
    CorpusError,
    default_sample,
    is_validation,
    open_corpus,
    random_windows,
    stdlib_files,
    stdlib_root,
)
from ofe.data.dataset import DataConfig, TokenData, check_lengths, prepare, train_batch, val_windows
from ofe.data.synthetic import BigramBackcopy
from ofe.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "BPETokenizer", "BigramBackcopy", "ByteTokenizer", "Corpus", "CorpusError", "DataConfig", "TokenData", "check_lengths",
    "default_sample", "is_validation", "load_tokenizer", "open_corpus", "prepare", "random_windows",
    "stdlib_files", "stdlib_root", "train_batch", "val_windows",
]
