"""Start-up time of the ``ofe`` command against its floor, ``import torch``: the price of every
``ofe`` call (``ofe --help`` included) and of every worker process a sweep spawns.

Each round runs, in a rotating order, ``python -c "import torch"`` (the peer: ofe cannot start faster
than the library it is built on), ``python -m ofe --help`` and ``python -c "import ofe.cli"``, each a
fresh interpreter; prints the median wall time of each and its ratio to the peer with a bootstrap
95% interval over the rounds.

    python benchmarks/startup.py                 # 7 rounds
    python benchmarks/startup.py --rounds 15 --json out.json
    python benchmarks/startup.py --baseline /tmp/old/src   # also an older checkout's `ofe --help`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _timing import cpu_name, interleaved, ratio_ci

COMMANDS = {
    "import torch (peer)": [sys.executable, "-c", "import torch"],
    "ofe --help": [sys.executable, "-m", "ofe", "--help"],
    "import ofe.cli": [sys.executable, "-c", "import ofe.cli"],
}
PEER = "import torch (peer)"


def _runner(argv: list[str], src: str = ""):
    env = {**os.environ, "PYTHONPATH": src} if src else None

    def run() -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="fresh interpreters per command")
    parser.add_argument("--json", default="", help="also write the timings here")
    parser.add_argument("--baseline", default="", help="the src/ folder of another ofe checkout: also time its "
                        "`ofe --help` (e.g. `git worktree add /tmp/old COMMIT`, then /tmp/old/src)")
    args = parser.parse_args()
    runners = {name: _runner(argv) for name, argv in COMMANDS.items()}
    if args.baseline:
        runners["ofe --help (baseline)"] = _runner(COMMANDS["ofe --help"], args.baseline)
    times = interleaved(runners, args.rounds)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; Python {sys.version.split()[0]}; "
          f"{args.rounds} rounds, interleaved; {time.strftime('%Y-%m-%d %H:%M')}")
    result = {}
    for name, values in times.items():
        low, high = ratio_ci(values, times[PEER])
        ratio = sum(values) / sum(times[PEER])
        result[name] = {"median_s": statistics.median(values), "ratio_to_peer": ratio, "ci95": [low, high],
                        "seconds": values}
        print(f"{name:22s} median {statistics.median(values):6.2f} s   x{ratio:5.2f} of the peer [{low:.2f}, {high:.2f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "rounds": args.rounds, "results": result}, f, indent=1)


if __name__ == "__main__":
    main()
