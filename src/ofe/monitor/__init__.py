"""Watching a model: which modules to observe (`sites`), what to compute on them (`measure`), the
low-overhead `OutlierMonitor` that connects the two through forward hooks (`monitor`), the
kurtosis-update decomposition on fixed inputs (`decomposition`), and activations captured for one
forward pass (`capture`)."""

from ofe.monitor.capture import capture
from ofe.monitor.decomposition import (TERMS, KurtosisUpdateTracker, kurtosis_change_contributions,
                                       reconstructed_kurtosis)
from ofe.monitor.monitor import OutlierMonitor
from ofe.monitor.measure import ALL_METRICS, DEFAULT_METRICS, TRAIN_METRICS, Results, flatten_results
from ofe.monitor.sites import find_block_stack, layer_modules

OFE_SITES = ("resid", "attn_out", "mlp_hidden", "attn_probs")  # the common ones; any of GPT.taps() works

__all__ = ["ALL_METRICS", "DEFAULT_METRICS", "OFE_SITES", "TERMS", "TRAIN_METRICS", "KurtosisUpdateTracker", "capture", "OutlierMonitor", "Results",
           "find_block_stack", "flatten_results", "kurtosis_change_contributions", "layer_modules",
           "reconstructed_kurtosis"]
