"""The network as an ONNX graph, built from the Keras weights to the signature and metadata that
model/runtime/graph.py defines (and checks an artifact's graph against).

Each layer is one of ONNX's recurrent operators (LSTM, GRU, RNN), so a whole prompt loops inside the
runtime rather than one call per character. Keras's layouts become ONNX's here:
  - Keras keeps (in, gates) kernels; ONNX wants (gates, in), one direction first: W (1, G, in).
  - LSTM gates: Keras i, f, c, o; ONNX i, o, f, c. GRU is z, r, h in both, and Keras's
    reset_after=True is ONNX's linear_before_reset=1 (the recurrent bias inside r * (...)).
  - ONNX has an input and a recurrent bias per gate; Keras's single bias goes in the first half
    (GRU with reset_after has both, as (2, G)).
  - ONNX Runtime's CPU recurrent operators take time-major input only (layout=0), so ids are
    transposed to (seq, batch) first and the logits back to (batch, seq, vocab) last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model.runtime.graph import metadata, signature
from model.training.network import config_of

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


def weights_of(model) -> Weights:
    """The weights of a Keras chargen network (model.training.network.build_model's layers), after checking
    that its layers are ones the ONNX operators compute exactly."""
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
        [helper.make_tensor_value_info(name, getattr(TensorProto, elem.upper()), dims) for name, elem, dims in inputs],
        [helper.make_tensor_value_info(name, getattr(TensorProto, elem.upper()), dims) for name, elem, dims in outputs],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="chargen", doc_string=f"chargen {L}x{H} {w.cell}, {V} characters, embedding {E}")
    helper.set_model_props(model, metadata(w.cell, L, H, E, V))
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
