"""Simulated post-training quantisation: the paper's W8A8 protocol, FP8, weight-only, bit-width sweeps."""

from ofe.quant.quantize import QuantError, QuantizeOptions, evaluate_run, format_table, load_trained, quantize_run
from ofe.quant.quantizers import (
    RangeObserver,
    asymmetric_qparams,
    fake_fp8,
    fake_quant,
    int_grid,
    quantize_weight,
    symmetric_scale,
)
from ofe.quant.simulate import QuantConfig, SimulatedQuantModel, perplexity, sqnr_db

__all__ = [
    "QuantConfig", "QuantError", "QuantizeOptions", "RangeObserver", "SimulatedQuantModel", "asymmetric_qparams",
    "evaluate_run", "fake_fp8", "fake_quant", "format_table", "int_grid", "load_trained", "quantize_run", "perplexity",
    "quantize_weight", "sqnr_db", "symmetric_scale",
]
