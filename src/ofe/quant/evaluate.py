"""Quantise a trained run: perplexities of the float model and of several formats, per-layer SQNR
beside each layer's kurtosis. Used by ``ofe quantize RUN_DIR``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_model

from ofe import config as C
from ofe.data import prepare, train_batch, val_windows
from ofe.metrics import kurtosis
from ofe.models import GPT
from ofe.quant.simulate import QuantConfig, SimulatedQuantModel, block_outputs, perplexity, sqnr_db

QUANT_FILE = "quant.json"


class QuantError(RuntimeError):
    """A user-facing problem with the run directory to quantise."""


def load_run(run_dir: str | Path):
    """``(TrainConfig, GPT with the final weights)`` of a finished ``ofe train`` run."""
    from ofe.train import TrainConfig

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise QuantError(f"{run} is not an ofe run directory (no config.json)")
    if not (run / "model.safetensors").is_file():
        raise QuantError(f"{run} has no model.safetensors: the run has not finished")
    try:
        cfg = C.from_dict(TrainConfig, json.loads((run / "config.json").read_text()))
    except (json.JSONDecodeError, C.ConfigError) as e:
        raise QuantError(f"{run}/config.json is not a valid run config: {e}") from None
    model = GPT(cfg.model)
    try:
        load_model(model, str(run / "model.safetensors"))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise QuantError(f"{run}/model.safetensors does not load into the run's model: {str(e).splitlines()[0]}") from None
    return cfg, model.eval()


def protocol_w8a8(qcfg: QuantConfig) -> QuantConfig:
    """``qcfg`` with 8-bit integer weights and activations (its other choices kept): the protocol's
    W8A8 when ``qcfg`` has the default ranges, granularity and sites."""
    return dataclasses.replace(qcfg, weight_bits=8, act_bits=8, weight_format="int", act_format="int")


def format_variants(qcfg: QuantConfig) -> list[QuantConfig]:
    """W8A8 (:func:`protocol_w8a8`), its activation bit-width sweep (6, 5, 4), FP8 and W4 weight-only,
    all keeping ``qcfg``'s other choices, plus ``qcfg`` itself when it is none of these."""
    w8a8 = protocol_w8a8(qcfg)
    variants = [w8a8] + [dataclasses.replace(w8a8, act_bits=b) for b in (6, 5, 4)]
    variants += [dataclasses.replace(w8a8, weight_format="fp8", act_format="fp8"),
                 dataclasses.replace(w8a8, weight_bits=4, act_bits=0)]
    return variants if qcfg in variants else [qcfg, *variants]


def evaluate_run(run_dir: str | Path, qcfg: QuantConfig, eval_sequences: int = 0, sweep: bool = True,
                 log=print) -> dict[str, Any]:
    """Calibrate and evaluate; returns the ``quant.json`` content (not written)."""
    cfg, model = load_run(run_dir)
    data = prepare(cfg.data, log=log)
    T = cfg.model.seq_len
    n_eval = eval_sequences or cfg.eval_batches * cfg.batch_size
    windows = val_windows(data.val, n_eval, T)
    calib = [train_batch(data.train, qcfg.calib_batch_size, T, qcfg.seed, step=i)[:, :-1]
             for i in range(qcfg.calib_batches)]
    fp_ppl = perplexity(model, windows)
    probe = windows[: min(16, len(windows)), :-1]
    float_hidden = block_outputs(model, model.blocks, probe)

    formats, ppl_of, main = [], {}, None
    for variant in format_variants(qcfg) if sweep else [qcfg]:
        sim = SimulatedQuantModel(model, variant)
        sim.calibrate(calib)
        ppl = ppl_of[variant] = perplexity(sim, windows)
        formats.append({"format": variant.label, "settings": C.to_dict(variant), "ppl": ppl,
                        "increase_pct": 100.0 * (ppl / fp_ppl - 1.0)})
        log(f"  {variant.label:<8} perplexity {ppl:10.4f}  ({formats[-1]['increase_pct']:+.2f}%)")
        if variant == qcfg:
            main = sim
    quant_hidden = block_outputs(main.model, main.model.blocks, probe)
    layers = [{"layer": i, "kurtosis": kurtosis(f).item(), "sqnr_db": sqnr_db(f, q)}
              for i, (f, q) in enumerate(zip(float_hidden, quant_hidden))]
    return {
        "run": str(run_dir), "block": cfg.model.block, "optimizer": cfg.optim.name,
        "fp_ppl": fp_ppl, "w8a8_ppl": ppl_of.get(protocol_w8a8(qcfg)),  # None if not evaluated (no sweep)
        "quant_format": qcfg.label, "quant_ppl": ppl_of[qcfg],
        "settings": C.to_dict(qcfg), "eval_sequences": n_eval, "seq_len": T,
        "calibration_tokens": qcfg.calib_batches * qcfg.calib_batch_size * T,
        "layers": layers, "formats": formats,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['run']}: {result['block']} + {result['optimizer']}, float perplexity {result['fp_ppl']:.4f}",
             f"{'format':<8} {'perplexity':>11} {'increase':>9}"]
    lines += [f"{f['format']:<8} {f['ppl']:>11.4f} {f['increase_pct']:>+8.2f}%" for f in result["formats"]]
    lines.append(f"per layer ({result['quant_format']}): {'layer':>5} {'kurtosis':>9} {'SQNR dB':>8}")
    lines += [f"{'':>{len(result['quant_format']) + 13}}{row['layer']:>5} {row['kurtosis']:>9.3f} {row['sqnr_db']:>8.2f}"
              for row in result["layers"]]
    return "\n".join(lines)
