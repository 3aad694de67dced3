"""Does ONNX Runtime's dynamic quantization make each cell faster? The float32 graph of a network
with random weights (its time does not depend on them) against the same graph after
`quantize_dynamic` (model/training/quantize.py's int8_graph), per cell, in the bare loop
(bench/generation.py's f) at 1 and 32 streams, taking turns: the measurement behind GRU and RNN
artifacts serving float32 (ONNX Runtime has no quantized GRU or RNN operator, so only their output
layer and embedding are quantized) while an LSTM gets model.int8.onnx.

    .venv/bin/python bench/int8_cells.py [--layers 3] [--units 384] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.generation import BareLoop, side_by_side  # noqa: E402

VOCAB = 65
STREAMS = (1, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--units", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell and stream count, both graphs (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    args = parser.parse_args()

    from model.records.config import ModelConfig
    from model.runtime.onnx_step import make_session, providers
    from model.training.network import build_model
    from model.training.onnx_graph import build_graph
    from model.training.quantize import int8_graph

    print(f"{args.layers}x{args.units}, vocabulary {VOCAB}, random weights; bare loop on one thread; "
          f"median of {args.rounds} interleaved rounds")
    print(f"  {'cell':5} {'streams':>7} {'float32':>10} {'int8':>10} {'int8 / float32':>15}")
    prompt = np.arange(7) % VOCAB
    for cell in ("lstm", "gru", "rnn"):
        model = build_model(ModelConfig(cell=cell, layers=args.layers, units=args.units, embedding=64), VOCAB)
        graphs = {"float32": build_graph(model).SerializeToString()}
        graphs["int8"] = int8_graph(graphs["float32"])
        sessions = {p: make_session(g, 1, providers("cpu")) for p, g in graphs.items()}
        names = ["h", "c"] if cell == "lstm" else ["h"]
        for b in STREAMS:
            rates: dict = {}
            for _ in range(args.rounds):
                loops = {p: BareLoop(s, names, args.layers, args.units, prompt, b) for p, s in sessions.items()}
                for p, rate in side_by_side(loops, b, args.seconds / args.rounds).items():
                    rates.setdefault(p, []).append(rate)
            ratio = statistics.median(i / f for i, f in zip(rates["int8"], rates["float32"]))
            print(f"  {cell:5} {b:>7} {statistics.median(rates['float32']):>10,.0f} {statistics.median(rates['int8']):>10,.0f} "
                  f"{ratio:>15.2f}")


if __name__ == "__main__":
    main()
