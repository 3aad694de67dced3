"""Would a graph that takes each layer's state as its own input and output make one stream faster?
The shipped artifact's graphs (model.onnx, model.int8.onnx) as they are, whose states are one (L, B,
H) tensor each, split per layer and concatenated back inside the graph, against the same graphs
edited to take and give h_1..h_L and c_1..c_L (no Split, no Concat); the same again made for one
character a step (no Transpose and no Squeeze either: each layer reads the last one's h_out, which
has the shape of a one-character input); and the float32 graph quantized with only its LSTMs in int8
(the output product and embedding left float32), per layer. One stream, one thread, the state bound in place (IO binding, as the engine steps), the
graphs in turns, median of --rounds. A probe for issue 24's one-stream ratio (bench/README.md,
"int8"): the layout would change the artifact's graph interface.

    .venv/bin/python bench/state_layout.py [--artifact artifacts/default] [--rounds 15] [--steps 1500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from model.runtime.onnx_step import make_session, providers  # noqa: E402


def per_layer(graph: bytes) -> bytes:
    """The graph with each layer's state as its own input and output."""
    m = onnx.load_from_string(graph)
    g = m.graph
    h = next(i for i in g.input if i.name == "h").type.tensor_type.shape.dim
    layers, batch, units = h[0].dim_value, h[1].dim_param or h[1].dim_value, h[2].dim_value
    nodes = [n for n in g.node if not (n.op_type == "Split" and n.input[0] in ("h", "c"))
             and not (n.op_type == "Concat" and n.output[0] in ("h_out", "c_out"))]
    inputs = [i for i in g.input if i.name not in ("h", "c")]
    outputs = [o for o in g.output if o.name not in ("h_out", "c_out")]
    for s in ("h", "c"):  # the LSTMs already read h_k and c_k and write h_out_k and c_out_k
        inputs += [helper.make_tensor_value_info(f"{s}_{k}", TensorProto.FLOAT, [1, batch, units]) for k in range(1, layers + 1)]
        outputs += [helper.make_tensor_value_info(f"{s}_out_{k}", TensorProto.FLOAT, [1, batch, units]) for k in range(1, layers + 1)]
    for field, items in ((g.node, nodes), (g.input, inputs), (g.output, outputs)):
        del field[:]
        field.extend(items)
    g.initializer.remove(next(i for i in g.initializer if i.name == "split_ones"))
    onnx.checker.check_model(m)
    return m.SerializeToString()


def one_step(graph: bytes) -> bytes:
    """per_layer's graph for one character a step, time-major: ids (1, B), logits (1, B, V), and no
    Transpose or Squeeze left (for one character, (B, 1) and (1, B) are the same bytes)."""
    m = onnx.load_from_string(per_layer(graph))
    g = m.graph
    layers = sum(1 for n in g.node if n.op_type.endswith("LSTM"))
    renamed = {"ids_tb": "ids", f"x_{layers}": f"h_out_{layers}", "logits_tb": "logits"}
    nodes = []
    for n in g.node:
        if n.op_type in ("Transpose", "Squeeze"):
            continue
        if n.op_type.endswith("LSTM"):
            k = int(n.output[1].rsplit("_", 1)[1])
            n.output[0] = ""  # Y: the sequence of outputs, one character long here
            if k > 1:
                n.input[0] = f"h_out_{k - 1}"
        n.input[:] = [renamed.get(name, name) for name in n.input]
        n.output[:] = [renamed.get(name, name) for name in n.output]
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.remove(next(i for i in g.initializer if i.name == "direction_axis"))
    for value in (next(i for i in g.input if i.name == "ids"), next(o for o in g.output if o.name == "logits")):
        seq, batch = value.type.tensor_type.shape.dim[:2]
        seq.dim_value, batch.dim_param = 1, "batch"
    onnx.checker.check_model(m)
    return m.SerializeToString()


def lstms_only_int8(graph: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        source.write_bytes(graph)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM"])
        return target.read_bytes()


class OneStream:
    """One stream stepped on a graph with its state bound in place, two bindings taking turns."""

    def __init__(self, graph: bytes, layered: bool):
        self.session = s = make_session(graph, 1, providers("cpu"))
        inputs = {i.name: i.shape for i in s.get_inputs()}
        V = s.get_outputs()[0].shape[-1]
        self.vocab = V
        self.ids, logits = np.zeros((1, 1), np.int64), np.zeros((1, 1, V), np.float32)
        names = [n for n in inputs if n != "ids"]
        shapes = {n: [d if isinstance(d, int) else 1 for d in inputs[n]] for n in names}
        states = [[np.zeros(shapes[n], np.float32) for n in names] for _ in range(2)]
        value = ort.OrtValue.ortvalue_from_numpy
        self.bindings = []
        for which in range(2):
            b = s.io_binding()
            b.bind_ortvalue_input("ids", value(self.ids))
            b.bind_ortvalue_output("logits", value(logits))
            for name, read, written in zip(names, states[which], states[1 - which]):
                b.bind_ortvalue_input(name, value(read))
                b.bind_ortvalue_output(name.replace("_", "_out_") if layered else f"{name}_out", value(written))
            self.bindings.append(b)

    def run(self, steps: int) -> float:
        """Seconds a step."""
        run, bindings, ids, V = self.session.run_with_iobinding, self.bindings, self.ids, self.vocab
        began = time.perf_counter()
        for k in range(steps):
            ids[0, 0] = k % V
            run(bindings[k & 1])
        return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", default=str(ROOT / "artifacts" / "default"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1500, help="steps of each graph a round")
    args = parser.parse_args()
    float32 = (Path(args.artifact) / "model.onnx").read_bytes()
    int8 = (Path(args.artifact) / "model.int8.onnx").read_bytes()
    loops = {"float32": OneStream(float32, False), "float32, per layer": OneStream(per_layer(float32), True),
             "float32, one step": OneStream(one_step(float32), True),
             "int8": OneStream(int8, False), "int8, per layer": OneStream(per_layer(int8), True),
             "int8, one step": OneStream(one_step(int8), True),
             "int8 LSTMs only, per layer": OneStream(lstms_only_int8(per_layer(float32)), True)}
    for name in ("float32, one step", "int8, one step"):  # the same logits as the shipped graph's
        shipped, edited = loops[name.split(",")[0]], loops[name]
        for loop in (shipped, edited):
            loop.ids[0, 0] = 7
            loop.session.run_with_iobinding(loop.bindings[0])
        same = np.array_equal(shipped.bindings[0].get_outputs()[0].numpy(), edited.bindings[0].get_outputs()[0].numpy())
        assert same, f"{name}: the edited graph's logits differ from the shipped graph's"
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            loop.run(100)
            times[name].append(loop.run(args.steps))
    print(f"{args.artifact}: one stream, one thread, median of {args.rounds} rounds of {args.steps} steps each, in turns\n")
    print("| graph | µs a step | float32 (same layout) / it |")
    print("| --- | ---: | ---: |")
    for name, t in times.items():
        layout = name.split(", ", 1)[1] if ", " in name else ""
        base = times[f"float32, {layout}" if layout else "float32"]
        ratio = statistics.median(b / x for b, x in zip(base, t))
        print(f"| {name} | {statistics.median(t) * 1e6:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
