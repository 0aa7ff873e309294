"""Analysis of training runs: the kurtosis-update decomposition, loading runs, testing the claims."""

from ofe.analysis.decomposition import TERMS, KurtosisUpdateTracker, reconstructed_kurtosis, relative_u4

__all__ = ["TERMS", "KurtosisUpdateTracker", "reconstructed_kurtosis", "relative_u4"]
