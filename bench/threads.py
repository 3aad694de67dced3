"""One ONNX Runtime thread against two for a step of the bare loop (bench/generation.py's f), row by
row: where a second thread starts to pay for its wake-ups. Prints the figures of bench/README.md
("Threads per step"), from which model/runtime/onnx_step.py's THREADED_STEP_FLOPS comes.

    .venv/bin/python bench/threads.py [--artifact artifacts/default] [--rounds 5] [--seconds 1]
    .venv/bin/python bench/threads.py --graph model.onnx     # a bare graph (random weights do: the
                                                              # time does not depend on them)

Both sessions are the engine's (model.runtime.onnx_step.make_session: threads that do not spin).
At each row count the two take turns of 10 steps for --seconds per round (so a burst of other work
hits both alike); the ratio is 2-thread / 1-thread characters per second, per round, and the table
gives its median and range. Run it with the cores to itself: on a shared machine the other work
decides the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.generation import PROMPT, BareLoop, side_by_side  # noqa: E402

ROWS = (1, 4, 8, 12, 16, 24, 32, 48, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"), help="artifact directory (default: %(default)s)")
    parser.add_argument("--graph", help="a model.onnx to time instead of an artifact's")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per row count and round, both sessions together (default: %(default)s)")
    args = parser.parse_args()

    from model.runtime import artifact
    from model.runtime.onnx_step import OrtStep, make_session, providers

    if args.graph:
        graph, prompt_ids = args.graph, np.arange(len(PROMPT))
    else:
        try:
            path, _, vocab = artifact.check(args.artifact)
        except artifact.ArtifactError as e:
            sys.exit(f"error: {e}")
        graph, prompt_ids = str(path / "model.onnx"), vocab.encode(PROMPT).ids
    step = OrtStep(graph, 1, threads=1)
    names = step.names
    sessions = {t: make_session(graph, t, providers("cpu")) for t in (1, 2)}
    rates: dict = {}
    for _ in range(args.rounds):
        for rows in ROWS:
            pair = {t: BareLoop(sessions[t], names, step.depth, step.units, prompt_ids, rows) for t in (1, 2)}
            for t, rate in side_by_side(pair, rows, args.seconds).items():
                rates.setdefault((t, rows), []).append(rate)

    flops = step.flops_per_char()
    print(f"{step.depth}x{step.units} {step.cell}: {flops / 1e6:.3f} MFLOP per character; the engine's threshold "
          f"{step.min_rows_per_thread} rows; median of {args.rounds} interleaved rounds")
    print(f"  {'rows':>5} {'MFLOP/step':>10} {'1 thread':>10} {'2 threads':>10} {'2 / 1':>6} {'range':>10}")
    for rows in ROWS:
        ratio = [two / one for one, two in zip(rates[1, rows], rates[2, rows])]
        print(f"  {rows:>5} {rows * flops / 1e6:>10.1f} {statistics.median(rates[1, rows]):>10,.0f} "
              f"{statistics.median(rates[2, rows]):>10,.0f} {statistics.median(ratio):>6.2f} {min(ratio):>4.2f}-{max(ratio):.2f}")


if __name__ == "__main__":
    main()
