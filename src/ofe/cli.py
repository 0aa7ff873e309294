"""The ``ofe`` command line: parses, then dispatches to the module that does the work.

Each subcommand takes a typed config (a ``--config FILE`` plus one ``--dotted.key VALUE`` flag per
field). Every user-facing error is an :class:`~ofe.errors.OfeError`, printed as one line with its
exit code (2; 3 for a diverged run); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ofe import config as C
from ofe.audit import AuditOptions, run_audit
from ofe.errors import OfeError, Terminated, describe_os_error
from ofe.io import pause_point
from ofe.experiment import SweepOptions, sweep_spec_file
from ofe.experiment.remedies import RemediesOptions, remedies
from ofe.experiment.reproduce import ReproduceOptions, reproduce
from ofe.models import presets_table
from ofe.quant import QuantizeOptions, format_table, quantize_run
from ofe.report import ReportOptions, rejudge, report
from ofe.train import TrainConfig, train
from ofe.train.config import load_train_config
from ofe.experiment.survey import ZooOptions, zoo

T = TypeVar("T")


def load_config(cls: type[T], ns: argparse.Namespace) -> T:
    """File (``--config``) then ``--key value`` overrides, strictly typed."""
    data = C.load_file(ns.config) if getattr(ns, "config", None) else {}
    return C.from_dict(cls, C.apply_overrides(cls, data, C.overrides_from_namespace(ns)))


def _cmd_train(ns: argparse.Namespace) -> None:
    data = C.load_file(ns.config) if ns.config else {}
    train(load_train_config(data, C.overrides_from_namespace(ns)))


def _cmd_quantize(ns: argparse.Namespace) -> None:
    print(format_table(quantize_run(ns.run_dir, load_config(QuantizeOptions, ns))))


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace], object]
    config: type | None = None  # typed options: --config FILE plus one flag per field
    positional: tuple[str, str, str] | None = None  # (dest, metavar, help)
    nargs: str | None = None  # of the positional: "+" for one or more


COMMANDS: dict[str, Command] = {
    "train": Command("train a model on a corpus (the embedded default: the Python standard library)", _cmd_train,
                     TrainConfig),
    "quantize": Command("simulate W8A8 (and other formats) on a trained run; saves the result in RUN_DIR",
                        _cmd_quantize, QuantizeOptions, ("run_dir", "RUN_DIR", "directory of a finished `ofe train` run")),
    "audit": Command("outlier features and W8A8 cost of a Hugging Face checkpoint on disk",
                     lambda ns: run_audit(ns.model_dir, load_config(AuditOptions, ns)), AuditOptions,
                     ("model_dir", "MODEL_DIR", "a local Hugging Face model directory")),
    "sweep": Command("train (and quantise) a grid of runs described by a spec file; resumable",
                     lambda ns: sweep_spec_file(ns.spec, load_config(SweepOptions, ns)), SweepOptions,
                     ("spec", "SPEC", "a .toml or .json sweep spec (see docs/experiments.md)")),
    "report": Command("figures, a markdown report and the claims table of a set of runs",
                      lambda ns: report(ns.run_dirs, load_config(ReportOptions, ns)), ReportOptions,
                      ("run_dirs", "RUN_DIR", "run directories, or directories holding runs (a sweep)"), nargs="+"),
    "rejudge": Command("judge saved reports again with today's claim rules, from their evidence.json.gz alone",
                       lambda ns: rejudge(ns.report_dirs), None,
                       ("report_dirs", "REPORT_DIR", "report directories, or directories holding reports (docs/results)"),
                       nargs="+"),
    "reproduce": Command("the paper's study end to end: train Pre-LN/OP x AdamW/SOAP, quantise, report the claims",
                         lambda ns: reproduce(load_config(ReproduceOptions, ns)), ReproduceOptions),
    "remedies": Command("every remedy for outlier features side by side: train-time ones at their tuned lr, "
                        "post-hoc ones on the baseline, W8A8 / W4A4 costs, a table and a plot",
                        lambda ns: remedies(load_config(RemediesOptions, ns)), RemediesOptions),
    "zoo": Command("build every block variant and print per-layer outlier metrics",
                   lambda ns: zoo(load_config(ZooOptions, ns)), ZooOptions),
    "presets": Command("list the model presets with their parameter counts", lambda ns: print(presets_table())),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (and exit 2), not the whole usage text."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--optim.lr -1e-3`` as ``--optim.lr=-1e-3``: argparse would take ``-1e-3`` for an option, and the
    value is the validator's to refuse (with a message naming the key), not the parser's."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NEGATIVE_NUMBER.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ofe", description="Measure, understand and minimise outlier features.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.positional is not None:
            dest, metavar, help_text = command.positional
            p.add_argument(dest, metavar=metavar, help=help_text, nargs=command.nargs)
        if command.config is not None:
            p.add_argument("--config", metavar="FILE", help="a .toml or .json config file; flags override it")
            C.add_arguments(p, command.config)
    return parser


pause_point("cli-imported")  # tests: Ctrl-C while the command line loads (ofe.__main__ catches it)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        with _terminate_as_interrupt():
            COMMANDS[ns.command].run(ns)
    except OfeError as e:
        print(f"ofe {ns.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave (or its disk) failed: one line, whatever the command
        print(f"ofe {ns.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except UnicodeError as e:
        print(f"ofe {ns.command}: error: text that is not valid UTF-8 ({getattr(e, 'reason', e)}): check the file or "
              "argument's encoding", file=sys.stderr)
        return 2
    except Terminated:
        print(f"ofe {ns.command}: terminated (SIGTERM); re-run the command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"ofe {ns.command}: interrupted", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so that a sweep
    stops its workers and the command exits with one line, as on Ctrl-C. Only from the main thread, and
    only where nobody else handles SIGTERM (a caller's handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminated(_signum: int, _frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
