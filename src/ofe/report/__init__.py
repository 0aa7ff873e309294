"""Reports: figures in the paper's style and a markdown summary of a set of runs."""

from ofe.report.write import FIGURES, ReportError, ReportOptions, rejudge, report, run_row, runs_table, write_report

__all__ = ["FIGURES", "ReportError", "ReportOptions", "rejudge", "report", "run_row", "runs_table", "write_report"]
