"""Experiments: grids of training runs (`ofe sweep`) and the paper's study (`ofe reproduce`)."""

from ofe.experiment.sweep import Sweep, SweepRun, load_sweep, parse_spec, run_sweep, sweep_states

__all__ = ["Sweep", "SweepRun", "load_sweep", "parse_spec", "run_sweep", "sweep_states"]
