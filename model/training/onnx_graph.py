"""The network as an ONNX graph: built from the Keras weights, checked against an artifact's meta.json.

One graph serves one-character steps and whole prompts (batch and sequence length are symbolic):

    inputs   ids     int64    (batch, seq)           character ids
             h       float32  (layers, batch, units)  each layer's hidden state
             c       float32  (layers, batch, units)  each layer's cell state (lstm only)
    outputs  logits  float32  (batch, seq, vocab)     the next-character logits after every position
             h_out   float32  (layers, batch, units)  the states after the last position
             c_out   float32  (layers, batch, units)  (lstm only)

Each layer is one of ONNX's recurrent operators (LSTM, GRU, RNN), so a whole prompt loops inside the
runtime rather than one call per character. Keras's layouts become ONNX's here:
  - Keras keeps (in, gates) kernels; ONNX wants (gates, in), one direction first: W (1, G, in).
  - LSTM gates: Keras i, f, c, o; ONNX i, o, f, c. GRU is z, r, h in both, and Keras's
    reset_after=True is ONNX's linear_before_reset=1 (the recurrent bias inside r * (...)).
  - ONNX has an input and a recurrent bias per gate; Keras's single bias goes in the first half
    (GRU with reset_after has both, as (2, G)).
  - ONNX Runtime's CPU recurrent operators take time-major input only (layout=0), so ids are
    transposed to (seq, batch) first and the logits back to (batch, seq, vocab) last.

`check_graph` needs only `onnx` (a serving install has no Keras): importing this module never
imports Keras; `weights_of` reads a Keras model it is handed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GRAPH_FORMAT = 1  # metadata "chargen_graph_format": bump when the signature or the metadata changes
OPSET = 17  # ONNX Runtime 1.14+ and onnxruntime-web run it; the recurrent operators are version 14
IR_VERSION = 8  # the IR version that opset 17 came with
OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
LSTM_GATES = [0, 3, 1, 2]  # Keras's i, f, c, o blocks in ONNX's order i, o, f, c


@dataclass(frozen=True)
class Weights:
    """A chargen network's weights in Keras's layouts (what `model.keras` holds)."""

    cell: str  # lstm | gru | rnn
    embedding: np.ndarray  # (V, E)
    rnn: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]  # per layer: kernel (in, G), recurrent (H, G), bias (G,), GRU (2, G)
    logits_kernel: np.ndarray  # (H, V)
    logits_bias: np.ndarray  # (V,)

    @property
    def units(self) -> int:
        return self.rnn[0][1].shape[0]

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]


def signature(cell: str, layers: int, units: int, vocab_size: int) -> tuple[list, list]:
    """(inputs, outputs) as [(name, element type, dims)]; a str dim is symbolic (any size)."""
    if cell not in OPS:
        raise ValueError(f"cell must be one of {', '.join(OPS)}, got {cell!r}")
    state = [layers, "batch", units]
    inputs = [("ids", TensorProto.INT64, ["batch", "seq"]), ("h", TensorProto.FLOAT, state)]
    outputs = [("logits", TensorProto.FLOAT, ["batch", "seq", vocab_size]), ("h_out", TensorProto.FLOAT, state)]
    if cell == "lstm":
        inputs.append(("c", TensorProto.FLOAT, state))
        outputs.append(("c_out", TensorProto.FLOAT, state))
    return inputs, outputs


# ---------------------------------------------------------------- building


def weights_of(model) -> Weights:
    """The weights of a Keras chargen network (model.training.network.build_model's layers), after checking
    that its layers are ones the ONNX operators compute exactly."""
    from model.training.network import config_of# here, not above: checking a graph never loads the Keras side

    config = config_of(model)
    rnn = []
    for i in range(config.layers):
        layer = model.get_layer(f"rnn_{i + 1}")
        _check_layer(layer, config.cell)
        cell = layer.cell
        rnn.append(tuple(np.asarray(v.numpy(), np.float32) for v in (cell.kernel, cell.recurrent_kernel, cell.bias)))
    dense = model.get_layer("logits")
    return Weights(
        cell=config.cell,
        embedding=np.asarray(model.get_layer("embedding").embeddings.numpy(), np.float32),
        rnn=tuple(rnn),
        logits_kernel=np.asarray(dense.kernel.numpy(), np.float32),
        logits_bias=np.asarray(dense.bias.numpy(), np.float32),
    )


def _check_layer(layer, cell: str) -> None:
    config = layer.get_config()
    wanted = {"activation": "tanh", "use_bias": True, "go_backwards": False}
    if cell != "rnn":
        wanted["recurrent_activation"] = "sigmoid"
    if cell == "gru":
        wanted["reset_after"] = True
    for key, value in wanted.items():
        if config.get(key) != value:
            raise ValueError(f"{layer.name}: the ONNX graph supports {key}={value!r} only, got {config.get(key)!r}")


def build_graph(model) -> onnx.ModelProto:
    """The ONNX graph of a Keras chargen network."""
    return graph_of(weights_of(model))


def graph_of(w: Weights) -> onnx.ModelProto:
    """The ONNX graph of a network's weights (see the module docstring for its signature)."""
    V, E = w.embedding.shape
    H, L, lstm = w.units, len(w.rnn), w.cell == "lstm"
    initializers: list[TensorProto] = []

    def const(name: str, array, dtype=np.float32) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype), name))
        return name

    nodes = [
        helper.make_node("Transpose", ["ids"], ["ids_tb"], perm=[1, 0]),  # (T, B)
        helper.make_node("Gather", [const("embedding", w.embedding), "ids_tb"], ["x_0"]),  # (T, B, E)
    ]
    states = ["h", "c"] if lstm else ["h"]
    if L == 1:
        per_layer = {s: [s] for s in states}  # (1, B, H) is already one layer's (directions, B, H)
    else:
        ones = const("split_ones", np.ones(L), np.int64)
        per_layer = {s: [f"{s}_{i}" for i in range(1, L + 1)] for s in states}
        nodes += [helper.make_node("Split", [s, ones], per_layer[s], axis=0) for s in states]
    out_axis = const("direction_axis", [1], np.int64)
    x = "x_0"
    for i, (kernel, recurrent, bias) in enumerate(w.rnn, start=1):
        W, R, B = _onnx_weights(w.cell, kernel, recurrent, bias, H)
        outs = [f"{s}_out" if L == 1 else f"{s}_out_{i}" for s in states]
        inputs = [x, const(f"W_{i}", W), const(f"R_{i}", R), const(f"B_{i}", B), "", per_layer["h"][i - 1]]
        if lstm:
            inputs.append(per_layer["c"][i - 1])
        extra = {"linear_before_reset": 1} if w.cell == "gru" else {}
        nodes.append(helper.make_node(OPS[w.cell], inputs, [f"y_{i}", *outs], name=f"rnn_{i}", hidden_size=H, **extra))
        nodes.append(helper.make_node("Squeeze", [f"y_{i}", out_axis], [f"x_{i}"]))  # (T, 1, B, H) -> (T, B, H)
        x = f"x_{i}"
    if L > 1:
        nodes += [helper.make_node("Concat", [f"{s}_out_{i}" for i in range(1, L + 1)], [f"{s}_out"], axis=0) for s in states]
    nodes += [
        helper.make_node("MatMul", [x, const("logits_kernel", w.logits_kernel)], ["logits_tb_raw"]),  # (T, B, V)
        helper.make_node("Add", ["logits_tb_raw", const("logits_bias", w.logits_bias)], ["logits_tb"]),
        helper.make_node("Transpose", ["logits_tb"], ["logits"], perm=[1, 0, 2]),  # (B, T, V)
    ]
    inputs, outputs = signature(w.cell, L, H, V)
    graph = helper.make_graph(
        nodes, f"chargen_{w.cell}",
        [helper.make_tensor_value_info(*spec) for spec in inputs],
        [helper.make_tensor_value_info(*spec) for spec in outputs],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="chargen", doc_string=f"chargen {L}x{H} {w.cell}, {V} characters, embedding {E}")
    helper.set_model_props(model, {
        "chargen_graph_format": str(GRAPH_FORMAT), "cell": w.cell, "layers": str(L),
        "units": str(H), "embedding": str(E), "vocab_size": str(V),
    })
    onnx.checker.check_model(model, full_check=True)
    return model


def _onnx_weights(cell: str, kernel, recurrent, bias, H: int):
    """Keras's (kernel (in, G), recurrent (H, G), bias) -> ONNX's W (1, G, in), R (1, G, H), B (1, 2G)."""
    if cell == "lstm":
        def order(a):
            return np.concatenate([a[..., k * H:(k + 1) * H] for k in LSTM_GATES], axis=-1)
        kernel, recurrent, bias = order(kernel), order(recurrent), order(bias)
    if cell == "gru":  # (2, G): input bias, recurrent bias
        B = np.concatenate([bias[0], bias[1]])
    else:
        B = np.concatenate([bias, np.zeros_like(bias)])
    return kernel.T[None], recurrent.T[None], B[None]


# ---------------------------------------------------------------- checking


def check_graph(source: str | Path | bytes, *, cell: str, layers: int, units: int, vocab_size: int,
                name: str | None = None) -> onnx.ModelProto:
    """Load a graph (a path or its bytes) and check it is the graph of the network meta.json
    describes; returns it. Raises ValueError naming the file (`name`, else the path) and every
    mismatch found."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, data = name or "model.onnx", bytes(source)
    else:
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ValueError(f"{name}: cannot be read: {e.strerror or e}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError, whose module differs between implementations
        raise ValueError(f"{name}: not an ONNX model (damaged or truncated?): {e}") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ValueError(f"{name}: not an ONNX model (empty, damaged or truncated: it holds no graph)")

    problems = _metadata_problems(model, cell, layers, units, vocab_size)
    expected_in, expected_out = signature(cell, layers, units, vocab_size)
    problems += _tensor_problems("input", model.graph.input, expected_in)
    problems += _tensor_problems("output", model.graph.output, expected_out)
    ops = [n.op_type for n in model.graph.node if n.op_type in OPS.values()]
    if ops != [OPS[cell]] * layers:
        problems.append(f"recurrent operators are [{', '.join(ops)}], expected {layers} x {OPS[cell]}")
    if problems:
        described = f"a {layers}-layer {cell} network of {units} units and {vocab_size} characters"
        raise ValueError(f"{name}: does not match meta.json ({described}): " + "; ".join(problems))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValueError(f"{name}: damaged ONNX graph: {str(e).strip().splitlines()[0]}") from None
    return model


def _metadata_problems(model: onnx.ModelProto, cell: str, layers: int, units: int, vocab_size: int) -> list[str]:
    props = {p.key: p.value for p in model.metadata_props}
    if "chargen_graph_format" not in props:
        return ["no chargen metadata (not made by `chargen export`, or truncated)"]
    if props["chargen_graph_format"] != str(GRAPH_FORMAT):
        return [f"chargen_graph_format {props['chargen_graph_format']!r} is not supported (this chargen reads {GRAPH_FORMAT})"]
    wanted = {"cell": cell, "layers": str(layers), "units": str(units), "vocab_size": str(vocab_size)}
    return [f"metadata {key} is {props.get(key)!r}, meta.json says {value!r}"
            for key, value in wanted.items() if props.get(key) != value]


def _tensor_problems(kind: str, found, expected: list) -> list[str]:
    got = {v.name: v for v in found}
    names = [n for n, _, _ in expected]
    problems = [f"missing {kind} {n!r}" for n in names if n not in got]
    problems += [f"unexpected {kind} {n!r}" for n in got if n not in names]
    for n, elem, dims in expected:
        if n not in got:
            continue
        tensor = got[n].type.tensor_type
        if tensor.elem_type != elem:
            problems.append(f"{kind} {n!r} is {_type_name(tensor.elem_type)}, expected {_type_name(elem)}")
            continue
        have = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        fits = tensor.HasField("shape") and len(have) == len(dims) and all(
            (isinstance(w, str) and isinstance(h, str)) or w == h for w, h in zip(dims, have))
        if not fits:
            shown = "unknown" if not tensor.HasField("shape") else _dims(have)
            problems.append(f"{kind} {n!r} has shape {shown}, expected {_dims(dims)}")
    return problems


def _type_name(elem: int) -> str:
    return TensorProto.DataType.Name(elem).lower() if elem in TensorProto.DataType.values() else f"type {elem}"


def _dims(dims) -> str:
    return "(" + ", ".join(map(str, dims)) + ")"
