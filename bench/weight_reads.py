"""Why int8's gain at one stream stops near 3×: at one row, a layer's matrix product reads each weight
once, so its time is the weights' bytes over the rate at which one core reads them. ONNX Runtime's
float32 MatMul and the int8 DynamicQuantizeMatMul that model.int8.onnx's LSTMs run (int8 weights,
activations quantized on the fly) at one row, for the shapes of a 384-unit LSTM layer's products
(input or recurrent, 384 wide; both, 768; the 3×384 network's six, 2,304), one thread, in turns,
median of --rounds. Random weights: the time does not depend on their values.

    .venv/bin/python bench/weight_reads.py [--units 384] [--rounds 9] [--steps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def product(precision: str, rows_in: int, cols: int, rng: np.random.Generator) -> tuple[ort.InferenceSession, int]:
    """A session computing x (1, rows_in) @ W (rows_in, cols) in `precision`, and W's bytes."""
    if precision == "int8":
        w = rng.integers(-127, 128, (rows_in, cols), dtype=np.int8)
        initializers = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
                        numpy_helper.from_array(np.array(0, np.int8), "zero_point")]
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "W", "scale", "zero_point"], ["y"], domain="com.microsoft")
    else:
        w = rng.standard_normal((rows_in, cols)).astype(np.float32)
        initializers = [numpy_helper.from_array(w, "W")]
        node = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph([node], "product", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), w.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=2000, help="products of each kind a round")
    args = parser.parse_args()
    rng, H = np.random.default_rng(0), args.units
    loops = {}
    for precision in ("float32", "int8"):
        for width in (H, 2 * H, 6 * H):
            session, size = product(precision, width, 4 * H, rng)
            binding = session.io_binding()
            binding.bind_cpu_input("x", np.full((1, width), 0.1, np.float32))
            binding.bind_output("y")
            loops[(precision, width)] = (session, binding, size)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in loops}
    for _ in range(args.rounds):
        for key, (session, binding, _) in loops.items():
            for _ in range(100):
                session.run_with_iobinding(binding)
            began = time.perf_counter()
            for _ in range(args.steps):
                session.run_with_iobinding(binding)
            times[key].append((time.perf_counter() - began) / args.steps)
    print(f"one row through x @ W, W of (width, {4 * H}), one thread, median of {args.rounds} rounds of {args.steps}\n")
    print("| precision | width | weights, MB | µs a product | GB of weights read a second | float32 / int8 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (precision, width), (_, _, size) in loops.items():
        t = statistics.median(times[(precision, width)])
        ratio = statistics.median(f / i for f, i in zip(times[("float32", width)], times[("int8", width)]))
        print(f"| {precision} | {width} | {size / 1e6:.2f} | {t * 1e6:.1f} | {size / t / 1e9:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
