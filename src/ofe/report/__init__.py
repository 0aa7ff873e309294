"""Reports: figures in the paper's style and a markdown summary of a set of runs."""

from ofe.report.build import ReportError, run_row, write_report

__all__ = ["ReportError", "run_row", "write_report"]
