"""Analysis of training runs: the kurtosis-update decomposition, loading runs, testing the claims."""

from ofe.analysis.decomposition import (TERMS, KurtosisUpdateTracker, kurtosis_change_contributions,
                                        reconstructed_kurtosis)
from ofe.analysis.runs import Run, RunError, label_runs, load_run, load_runs

__all__ = ["TERMS", "KurtosisUpdateTracker", "Run", "RunError", "kurtosis_change_contributions", "label_runs",
           "load_run", "load_runs", "reconstructed_kurtosis"]
