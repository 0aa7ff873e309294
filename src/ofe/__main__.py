"""``python -m ofe`` (also what ``torchrun -m ofe`` runs) and the ``ofe`` command.

The command line's module loads torch and the rest; Ctrl-C while they load is the same one
"interrupted" line and exit code 130 as Ctrl-C during a command, not a traceback from an import.
"""

import sys


def run() -> int:
    try:
        from ofe.cli import main
    except KeyboardInterrupt:
        print("ofe: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
