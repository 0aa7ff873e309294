"""Quantise a trained run: perplexities of the float model and of several formats, per-layer SQNR
beside each layer's kurtosis. Used by ``ofe quantize RUN_DIR``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ofe import config as C
from ofe.data import TokenData, prepare, train_batch, val_windows
from ofe.errors import OfeError
from ofe.io import pause_point
from ofe.metrics import abs_max_median, kurtosis, position0_share, sequence_kurtosis, token_excess_kurtosis
from ofe.models import GPT
from ofe.quant.simulate import SITE_FAMILIES, QuantConfig, SimulatedQuantModel, block_outputs, perplexity, sqnr_db
from ofe.run_dir import RunDir
from ofe.run_config import TrainConfig

class QuantError(OfeError):
    """A user-facing problem with the run directory to quantise."""


def load_trained(run_dir: str | Path, step: int | None = None) -> tuple[TrainConfig, GPT]:
    """``(TrainConfig, GPT)`` of an ``ofe train`` run, with its final weights (``step`` None, the run
    must have finished) or those it kept at ``step``."""
    run = RunDir(run_dir)
    cfg = run.config()
    model = run.load_weights(GPT(cfg.model), step)
    return cfg, model.eval()


def calibration_batches(data: TokenData, cfg: TrainConfig, qcfg: QuantConfig) -> list[Tensor]:
    """The calibration batches ``(B, T)`` drawn from the training split with ``qcfg.seed``."""
    return [train_batch(data.train, qcfg.calib_batch_size, cfg.model.seq_len, qcfg.seed, step=i, bos_id=data.bos_id)[:, :-1]
            for i in range(qcfg.calib_batches)]


def evaluation_data(cfg: TrainConfig, qcfg: QuantConfig, eval_sequences: int = 0, log=print,
                    data: TokenData | None = None) -> tuple[Tensor, list[Tensor]]:
    """The run's validation windows ``(N, T + 1)`` (``eval_sequences``, or the run's own eval
    size) and the calibration batches ``(B, T)`` drawn from the training split with ``qcfg.seed``;
    from ``data`` when the caller has prepared the run's corpus already."""
    data = data if data is not None else prepare(cfg.data, log=log)
    T = cfg.model.seq_len
    windows = val_windows(data.val, eval_sequences or cfg.eval_batches * cfg.batch_size, T, bos_id=data.bos_id)
    return windows, calibration_batches(data, cfg, qcfg)


def protocol_w8a8(qcfg: QuantConfig) -> QuantConfig:
    """``qcfg`` with 8-bit integer weights and activations (its other choices kept): the protocol's
    W8A8 when ``qcfg`` has the default ranges, granularity and sites."""
    return dataclasses.replace(qcfg, weight_bits=8, act_bits=8, weight_format="int", act_format="int")


def format_variants(qcfg: QuantConfig) -> list[QuantConfig]:
    """W8A8 (:func:`protocol_w8a8`), its activation bit-width sweep (6, 5, 4), FP8, W4 weight-only and
    W4A4, all keeping ``qcfg``'s other choices; then the deployment style, per-token dynamic
    activations with per-channel weights, at W8A8 and W4A4 (``-token``); plus ``qcfg`` itself when it
    is none of these."""
    w8a8 = protocol_w8a8(qcfg)
    variants = [w8a8] + [dataclasses.replace(w8a8, act_bits=b) for b in (6, 5, 4)]
    variants += [dataclasses.replace(w8a8, weight_format="fp8", act_format="fp8"),
                 dataclasses.replace(w8a8, weight_bits=4, act_bits=0),
                 dataclasses.replace(w8a8, weight_bits=4, act_bits=4)]
    deployed = dataclasses.replace(w8a8, act_granularity="token", weight_granularity="channel")
    variants += [deployed, dataclasses.replace(deployed, weight_bits=4, act_bits=4)]
    return variants if qcfg in variants else [qcfg, *variants]


def evaluate_run(run_dir: str | Path, qcfg: QuantConfig, eval_sequences: int = 0, sweep: bool = True,
                 log=print, step: int | None = None, real_int8: bool = False, calib_draws: int = 1) -> dict[str, Any]:
    """Calibrate and evaluate the final weights (``step`` None) or those kept at ``step``; returns
    the result that :func:`quantize_run` saves beside the run. ``real_int8``: also compare the
    simulator with torchao's int8 kernels (:func:`ofe.quant.real_int8.crosscheck`)."""
    cfg, model = load_trained(run_dir, step)
    data = prepare(cfg.data, log=log)
    windows, calib = evaluation_data(cfg, qcfg, eval_sequences, data=data)
    T, n_eval = cfg.model.seq_len, len(windows)
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
    families = site_family_costs(model, qcfg, calib, windows, fp_ppl, log) if sweep else []
    draws = (calibration_draws(model, data, cfg, qcfg, windows, fp_ppl, calib_draws, ppl_of.get(protocol_w8a8(qcfg)),
                               log) if calib_draws > 1 else [])
    layers = [{"layer": i, "kurtosis": kurtosis(f).item(), "seq_kurtosis": sequence_kurtosis(f).item(),
               "token_excess_kurtosis": token_excess_kurtosis(f).item(), "max_abs": f.abs().max().item(),
               "abs_max_median": abs_max_median(f).item(), "position0_share": position0_share(f).item(),
               "sqnr_db": sqnr_db(f, q)}
              for i, (f, q) in enumerate(zip(float_hidden, quant_hidden))]
    extra = {}
    if real_int8:
        from ofe.quant.real_int8 import crosscheck
        check = extra["real_int8"] = crosscheck(model, windows)
        log("  " + real_int8_line(check))
    return {
        "run": str(run_dir), "block": cfg.model.block, "optimizer": cfg.optim.name,
        "step": cfg.steps if step is None else step,
        "fp_ppl": fp_ppl, "w8a8_ppl": ppl_of.get(protocol_w8a8(qcfg)),  # None if not evaluated (no sweep)
        "quant_format": qcfg.label, "quant_ppl": ppl_of[qcfg],
        "settings": C.to_dict(qcfg), "eval_sequences": n_eval, "seq_len": T,
        "calibration_tokens": qcfg.calib_batches * qcfg.calib_batch_size * T,
        "layers": layers, "formats": formats, "site_families": families, "calibration_draws": draws, **extra,
    }


def calibration_draws(model: GPT, data: TokenData, cfg: TrainConfig, qcfg: QuantConfig, windows: Tensor,
                      fp_ppl: float, draws: int, first: float | None = None, log=print) -> list[dict[str, Any]]:
    """The protocol's W8A8 cost calibrated on ``draws`` different draws of calibration batches
    (``quant.seed``, ``+1``, ...): the quantiser's own spread, apart from the seeds' and the lr's.
    ``first``: the perplexity already measured with ``quant.seed`` (not evaluated again)."""
    rows = []
    for seed in range(qcfg.seed, qcfg.seed + draws):
        variant = dataclasses.replace(protocol_w8a8(qcfg), seed=seed)
        if seed == qcfg.seed and first is not None:
            ppl = first
        else:
            sim = SimulatedQuantModel(model, variant)
            sim.calibrate(calibration_batches(data, cfg, variant))
            ppl = perplexity(sim, windows)
        rows.append({"seed": seed, "ppl": ppl, "increase_pct": 100.0 * (ppl / fp_ppl - 1.0)})
    costs = [r["increase_pct"] for r in rows]
    log(f"  W8A8 over {draws} calibration draws: {min(costs):+.2f}% .. {max(costs):+.2f}%")
    return rows


def site_family_costs(model: GPT, qcfg: QuantConfig, calib: list, windows, fp_ppl: float, log=print) -> list[dict[str, Any]]:
    """Where the W8A8 error comes from: the perplexity increase of quantising one thing alone, with
    everything else in float: the weights alone (W8A16), then each :data:`SITE_FAMILIES` family's
    activations alone (8 bits, float weights)."""
    w8a8 = protocol_w8a8(qcfg)
    parts = [("weights", dataclasses.replace(w8a8, act_bits=0), None)]
    parts += [(name, dataclasses.replace(w8a8, weight_bits=0), sites) for name, sites in SITE_FAMILIES.items()]
    rows = []
    for name, variant, sites in parts:
        sim = SimulatedQuantModel(model, variant, only_sites=sites)
        if not sim.quantizers and sites is not None:
            continue  # the model has no such site (e.g. OP has no norm outputs)
        sim.calibrate(calib)
        ppl = perplexity(sim, windows)
        rows.append({"family": name, "sites": list(sites or ()), "ppl": ppl, "increase_pct": 100.0 * (ppl / fp_ppl - 1.0)})
        log(f"  W8A8 {name + ' only':<20} perplexity {ppl:10.4f}  ({rows[-1]['increase_pct']:+.2f}%)")
    return rows


def real_int8_line(check: dict[str, Any]) -> str:
    """One line summing up :func:`ofe.quant.real_int8.crosscheck`'s result."""
    return (f"real int8 (torchao) {check['format']}: simulated {check['simulated_increase_pct']:+.3f}%, real "
            f"{check['real_increase_pct']:+.3f}%; per layer {'agree' if check['agree'] else 'DISAGREE'} "
            f"(worst gap {check['worst_layer_gap']:.1e} of the quantisation error, tolerance {check['tolerance']:g})")


def format_table(result: dict[str, Any]) -> str:
    at = f" at step {result['step']}" if "step" in result else ""
    lines = [f"{result['run']}{at}: {result['block']} + {result['optimizer']}, float perplexity {result['fp_ppl']:.4f}",
             f"{'format':<8} {'perplexity':>11} {'increase':>9}"]
    lines += [f"{f['format']:<8} {f['ppl']:>11.4f} {f['increase_pct']:>+8.2f}%" for f in result["formats"]]
    if result.get("site_families"):
        lines.append("W8A8 one part at a time (the rest in float):")
        lines += [f"  {f['family']:<14} {f['ppl']:>11.4f} {f['increase_pct']:>+8.2f}%" for f in result["site_families"]]
    if check := result.get("real_int8"):
        lines.append(real_int8_line(check))
    pad = len(result["quant_format"]) + 13
    lines.append(f"per layer ({result['quant_format']}): {'layer':>5} {'kurtosis':>9} {'Pearson':>8} {'OSP':>8} "
                 f"{'max|x|':>8} {'max/med':>8} {'top@pos0':>8} {'SQNR dB':>8}")
    lines += [f"{'':>{pad}}{row['layer']:>5} {row['kurtosis']:>9.3f} {row.get('seq_kurtosis', math.nan):>8.3g} "
              f"{row.get('token_excess_kurtosis', math.nan):>8.3g} {row['max_abs']:>8.1f} {row['abs_max_median']:>8.1f} "
              f"{row['position0_share']:>8.2f} {row['sqnr_db']:>8.2f}" for row in result["layers"]]
    lines.append(f"{'':>{pad}}(kurtosis: He et al.'s Eq. 1; Pearson: Bondarenko et al.'s; OSP: per-token excess, "
                 "docs/metrics.md)")
    return "\n".join(lines)


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of ``ofe quantize`` beside the quantisation settings (``quant.*``)."""

    quant: QuantConfig = QuantConfig()
    eval_sequences: int = C.field(0, "validation windows to evaluate; 0: the run's eval_batches x batch_size")
    sweep: bool = C.field(True, "also evaluate W8A6/A5/A4, FP8 and W4 weight-only")
    real_int8: bool = C.field(False, "also run W8A8 with real int8 kernels (torchao, per-token activations, "
                                     "per-channel weights) and compare with the simulator (needs ofe[int8])")
    step: int = C.field(-1, "quantise the weights the run kept at this step (trained with --keep_weights true); "
                            "-1: the final weights")
    matched_to: str = C.field("", "another run's directory: quantise this run's weights at that run's final "
                                  "validation loss (its first kept step at or below it: the matched-loss comparison)")
    calib_draws: int = C.field(3, "also evaluate the protocol's W8A8 on this many draws of calibration batches "
                                  "(quant.seed, +1, ...) to show the quantiser's own spread; 1: only quant.seed")

    def __post_init__(self) -> None:
        if self.calib_draws < 1:
            raise C.ConfigError(f"config key 'calib_draws' must be >= 1, got {self.calib_draws}")
        if self.eval_sequences < 0:
            raise C.ConfigError(f"config key 'eval_sequences' must be >= 0, got {self.eval_sequences}")
        if self.step < -1:
            raise C.ConfigError(f"config key 'step' must be >= 0, or -1 for the final weights, got {self.step}")
        if self.matched_to and self.step != -1:
            raise C.ConfigError("config keys 'step' and 'matched_to' choose the weights both: give one")


def matched_step(run_dir: str | Path, other_dir: str | Path, log=print) -> int | None:
    """The step of ``run_dir``'s kept weights at ``other_dir``'s final validation loss: its first kept
    step whose validation loss is at or below it (:func:`ofe.analysis.fair.matched_point`); None when
    that is its final step (no earlier kept weights reach the loss). A one-line :class:`QuantError`
    when this run is the worse one."""
    from ofe.analysis import RunError, load_run
    from ofe.analysis.fair import matched_point

    try:
        this, other = load_run(Path(run_dir)), load_run(Path(other_dir))
    except RunError as e:
        raise QuantError(str(e)) from None
    point = matched_point(this, other)
    if point.better is not this:
        raise QuantError(f"{run_dir}'s final validation loss {this.val_loss():.4f} is not below {other_dir}'s "
                         f"{other.val_loss():.4f}: it is the worse run, so its final weights are the matched ones "
                         f"(quantise without --matched_to)")
    log(f"matched loss: {run_dir} at step {point.better_step} (val loss {point.better_loss:.4f}), "
        f"{other_dir}'s final val loss {point.target:.4f}")
    if point.better_step == this.steps:
        log(f"(no earlier kept weights reach it: the final weights; kept steps: {list(this.kept_steps) or 'none'})")
        return None
    return point.better_step


def quantize_run(run_dir: str | Path, cfg: QuantizeOptions = QuantizeOptions(), log=print) -> dict[str, Any]:
    """Evaluate the run's formats and save the result in the run directory (``ofe quantize``):
    one result for the final weights and one per kept step (:meth:`RunDir.quant_path`)."""
    step = matched_step(run_dir, cfg.matched_to, log) if cfg.matched_to else (None if cfg.step < 0 else cfg.step)
    if Path(run_dir).is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):  # before minutes of evaluation
        raise QuantError(f"cannot write the result into {run_dir}: the folder is not writable (check its permissions)")
    run = RunDir(run_dir)
    # a finished run is locked while quantised, so that a second `ofe quantize` (or a resumed training)
    # on it is refused with the other pid instead of racing on quant.json
    with run.lock() if run.is_finished() else contextlib.nullcontext():
        result = evaluate_run(run_dir, cfg.quant, cfg.eval_sequences, cfg.sweep, log=log, step=step,
                              real_int8=cfg.real_int8, calib_draws=cfg.calib_draws if cfg.sweep else 1)
        pause_point("quantize-evaluated")
        run.write_quant(result, step)
    return result
