"""How soon the command line reports a mistake that needs no model (issue 20).

    .venv/bin/python bench/cli.py [--runs 5]

Runs each case --runs times, each in a fresh process as a user would (`.venv/bin/chargen ...`), and
prints the median and slowest seconds from starting the command to its exit, with the goal. The
cases: `chargen serve` on a port another socket holds, `chargen serve` of a missing artifact, and
`chargen train` of a missing corpus. Goal: each under 1 s (they are reported before TensorFlow
loads, and a port in use before onnx). The tests assert the messages and what was imported, not the
time (tests/test_cli.py); times depend on what else the machine is doing: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHARGEN = str(Path(sys.executable).with_name("chargen"))
GOAL_S = 1.0


def seconds(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        done = subprocess.run([CHARGEN, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        times.append(time.monotonic() - started)
        if done.returncode == 0 or not done.stderr.startswith("Error: "):
            sys.exit(f"chargen {' '.join(args)}: expected a one-line error, got {done.returncode}: {done.stderr[-2000:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per case")
    args = parser.parse_args()
    with socket.socket() as taken, tempfile.TemporaryDirectory() as tmp:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = {
            "serve, port in use": ["serve", "--port", str(taken.getsockname()[1])],
            "serve, no artifact": ["serve", "--artifact", f"{tmp}/nowhere", "--port", "0"],
            "train, no corpus": ["train", "--corpus", f"{tmp}/absent.txt", "--out", f"{tmp}/run"],
        }
        for name, case in cases.items():
            times = seconds(case, args.runs)
            verdict = "ok" if statistics.median(times) < GOAL_S else "NOT MET"
            print(f"{name:22} median {statistics.median(times):.2f} s, slowest {max(times):.2f} s  "
                  f"goal < {GOAL_S:g} s  {verdict}")


if __name__ == "__main__":
    main()
