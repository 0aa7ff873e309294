"""Analysis of finished runs: loading and labelling them (`runs`), testing the claims (`claims`)."""

from ofe.analysis.runs import Run, RunError, label_runs, load_run, load_runs

__all__ = ["Run", "RunError", "label_runs", "load_run", "load_runs"]
