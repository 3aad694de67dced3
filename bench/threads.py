"""One ONNX Runtime thread against two for a step of the bare loop (bench/generation.py's f), row by
row: where a second thread starts to pay for its wake-ups. Prints the figures of bench/README.md
("Threads per step"), from which model/runtime/onnx_step.py's THREADED_STEP_FLOPS comes, one
table per graph: the artifact's float32 graph (model.onnx) and its int8 graph (model.int8.onnx),
whose threshold is set separately; and a 4,000-character prompt on one thread and on two (prompts
run on one).

    .venv/bin/python bench/threads.py [--artifact artifacts/default] [--rounds 5] [--seconds 1]
                                      [--precision float32,int8]
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.generation import PROMPT, BareLoop, side_by_side, text_of  # noqa: E402

ROWS = (1, 4, 8, 12, 16, 24, 32, 48, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"), help="artifact directory (default: %(default)s)")
    parser.add_argument("--graph", help="a model.onnx (or model.int8.onnx) to time instead of an artifact's")
    parser.add_argument("--precision", default="float32,int8",
                        help="the artifact's graphs to time, comma separated (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per row count and round, both sessions together (default: %(default)s)")
    parser.add_argument("--prompt-chars", type=int, default=4000, help="the prompt timed on one and two threads (default: %(default)s)")
    args = parser.parse_args()

    from model.runtime import artifact

    if args.graph:
        graphs, prompt_ids = {Path(args.graph).name: args.graph}, np.arange(len(PROMPT))
        prompt = np.arange(args.prompt_chars) % 8
    else:
        graphs = {}
        for precision in (p.strip() for p in args.precision.split(",") if p.strip()):
            try:
                graphs[precision] = str(artifact.load(args.artifact, precision).graph)
            except (artifact.ArtifactError, ValueError) as e:
                print(f"{precision}: left out: {e}")
        vocab = artifact.load(args.artifact, "float32").vocab
        prompt_ids = vocab.encode(PROMPT).ids
        prompt = vocab.encode(text_of(vocab, args.prompt_chars)).ids
    for name, graph in graphs.items():
        table(name, graph, prompt_ids, prompt, args.rounds, args.seconds)


def table(name: str, graph: str, prompt_ids: np.ndarray, prompt: np.ndarray, rounds: int, seconds: float) -> None:
    from model.runtime.onnx_step import OrtStep, make_session, providers

    step = OrtStep(graph, 1, threads=1)
    names = step.names
    sessions = {t: make_session(graph, t, providers("cpu")) for t in (1, 2)}
    rates: dict = {}
    prompt_ms: dict = {1: [], 2: []}
    for _ in range(rounds):
        for rows in ROWS:
            pair = {t: BareLoop(sessions[t], names, step.depth, step.units, prompt_ids, rows) for t in (1, 2)}
            for t, rate in side_by_side(pair, rows, seconds).items():
                rates.setdefault((t, rows), []).append(rate)
        for t in (1, 2):  # the prompt: one call from the zero state, as the engine feeds one
            zero = {n: np.zeros((step.depth, 1, step.units), np.float32) for n in names}
            began = time.perf_counter()
            sessions[t].run(None, {"ids": np.asarray(prompt, np.int64)[None], **zero})
            prompt_ms[t].append((time.perf_counter() - began) * 1e3)

    flops = step.flops_per_char()
    print(f"{name}: {step.depth}x{step.units} {step.cell}, {step.precision} graph: {flops / 1e6:.3f} MFLOP per character; "
          f"the engine's threshold {step.min_rows_per_thread} rows; median of {rounds} interleaved rounds")
    print(f"  {'rows':>5} {'MFLOP/step':>10} {'1 thread':>10} {'2 threads':>10} {'2 / 1':>6} {'range':>10}")
    for rows in ROWS:
        ratio = [two / one for one, two in zip(rates[1, rows], rates[2, rows])]
        print(f"  {rows:>5} {rows * flops / 1e6:>10.1f} {statistics.median(rates[1, rows]):>10,.0f} "
              f"{statistics.median(rates[2, rows]):>10,.0f} {statistics.median(ratio):>6.2f} {min(ratio):>4.2f}-{max(ratio):.2f}")
    one, two = statistics.median(prompt_ms[1]), statistics.median(prompt_ms[2])
    print(f"  a {len(prompt):,}-character prompt: {one:.1f} ms on 1 thread, {two:.1f} ms on 2 ({one / two:.2f}x)")


if __name__ == "__main__":
    main()
