"""Experiments: grids of training runs (`ofe sweep`) and the paper's study (`ofe reproduce`)."""

from ofe.experiment.sweep import Sweep, SweepOptions, SweepRun, load_sweep, parse_spec, run_sweep, sweep_spec_file, sweep_states

__all__ = ["Sweep", "SweepOptions", "SweepRun", "sweep_spec_file", "load_sweep", "parse_spec", "run_sweep", "sweep_states"]
