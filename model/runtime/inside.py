"""Inside the network: per character and layer, the hidden state, the LSTM's cell state and the gates,
computed with numpy from the weights in the artifact's own model.onnx (what /v1/inspect and
`chargen inspect` show).

Where the weights come from, and why: model.onnx is the one copy of the weights that serving runs,
so reading them from it means the values shown are those of the network the engine runs, for every
artifact already written, with no change to the graph or to the artifact format. The recurrent
operators of ONNX Runtime return no gates, so a second graph could not give them; weights written
beside the graph would be a second copy that could drift from it. The graph is read with protobuf
(which onnxruntime itself depends on) and a description of the few fields of ONNX's messages read
here (the `onnx` package is the training side's); protobuf skips every other field.

The recurrences are ONNX's LSTM, GRU (linear_before_reset=1) and RNN operators as
model/training/onnx_graph.py writes them: gate order i, o, f, c for the LSTM and z, r, h for the GRU,
W (1, G, in), R (1, G, H), B (1, 2G) = input bias then recurrent bias. They run in float32 as ONNX
Runtime runs them; the input projections of a whole layer are one matrix product, the recurrent
part one product per character, on the request's thread alone (see `_times`). None of this is on
the engine's path: it runs only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F32 = np.float32
MAX_CHARS = 4_000  # the longest text traced at once (/v1/inspect's bound; the CLI traces longer texts in pieces)
GATES = {"lstm": ("input", "forget", "output", "candidate"), "gru": ("update", "reset", "candidate"),
         "rnn": ("preactivation",)}
SIGMOID_GATES = {"input", "forget", "output", "update", "reset"}  # the others are tanh's inputs or outputs
_FLOAT = 1  # TensorProto.FLOAT


# ---------------------------------------------------------------- reading model.onnx's weights


def _onnx_messages():
    """ModelProto -> graph -> initializer (TensorProto), with only the fields read here; their numbers
    and types are onnx.proto's (github.com/onnx/onnx, onnx/onnx.proto)."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="chargen_onnx_subset.proto", package="chargen_onnx_subset", syntax="proto2")

    def message(name, fields):
        m = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".chargen_onnx_subset.{type_name}"

    optional, repeated = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("TensorProto", [("dims", 1, F.TYPE_INT64, repeated, None), ("data_type", 2, F.TYPE_INT32, optional, None),
                            ("float_data", 4, F.TYPE_FLOAT, repeated, None), ("name", 8, F.TYPE_STRING, optional, None),
                            ("raw_data", 9, F.TYPE_BYTES, optional, None), ("data_location", 14, F.TYPE_INT32, optional, None)])
    message("GraphProto", [("initializer", 5, F.TYPE_MESSAGE, repeated, "TensorProto")])
    message("ModelProto", [("graph", 7, F.TYPE_MESSAGE, optional, "GraphProto")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("chargen_onnx_subset.ModelProto"))


def read_initializers(path: str | Path) -> dict[str, np.ndarray]:
    """The float32 initializers (weights) of an ONNX graph, by name."""
    model = _onnx_messages().FromString(Path(path).read_bytes())
    out = {}
    for t in model.graph.initializer:
        if t.data_type != _FLOAT:
            continue  # the graph's int64 constants (split sizes, axes)
        if t.data_location == 1:
            raise ValueError(f"{path}: initializer {t.name!r} is stored outside the graph, which chargen never writes")
        data = np.frombuffer(t.raw_data, "<f4") if t.raw_data else np.asarray(t.float_data, F32)
        out[t.name] = data.astype(F32).reshape(tuple(t.dims))
    return out


# ---------------------------------------------------------------- the network and its trace


@dataclass(frozen=True)
class Layer:
    W: np.ndarray  # (G*H, in)
    R: np.ndarray  # (G*H, H)
    Wb: np.ndarray  # (G*H,)
    Rb: np.ndarray  # (G*H,)


@dataclass
class LayerTrace:
    """One layer's values after every character: (T, H) float32 each."""

    hidden: np.ndarray
    cell: np.ndarray | None  # lstm only
    gates: dict[str, np.ndarray]  # the gates asked for, by name (GATES)


# Each layer's state after a text, (h, c) of (H,) float32 (c None but for the lstm): where a next
# trace of the text that follows starts.
State = list[tuple[np.ndarray, np.ndarray | None]]


@dataclass
class Trace:
    layers: list[LayerTrace | None]  # None: a layer not asked for
    logits: np.ndarray  # (T, V): row t predicts the character after ids[t]
    state: State  # after the last character

    def kept(self, layers: set[int], gates: set[str]) -> "Trace":
        """Only these 1-based layers and gates (what a trace with these arguments holds)."""
        return Trace([None if t is None or i not in layers else LayerTrace(t.hidden, t.cell, {g: v for g, v in t.gates.items() if g in gates})
                      for i, t in enumerate(self.layers, start=1)], self.logits, self.state)

    @staticmethod
    def joined(pieces: list["Trace"]) -> "Trace":
        """The trace of a text from the traces of its consecutive pieces (each from the state the one before ended in)."""
        def cat(arrays):
            return np.concatenate(arrays) if arrays[0] is not None else None

        layers = []
        for i, first in enumerate(pieces[0].layers):
            parts = [p.layers[i] for p in pieces]
            layers.append(None if first is None else LayerTrace(cat([p.hidden for p in parts]), cat([p.cell for p in parts]),
                                                                {g: cat([p.gates[g] for p in parts]) for g in first.gates}))
        return Trace(layers, np.concatenate([p.logits for p in pieces]), pieces[-1].state)


@dataclass(frozen=True)
class Network:
    """A chargen network's weights, as its model.onnx holds them."""

    cell: str
    embedding: np.ndarray  # (V, E)
    layers: tuple[Layer, ...]
    logits_kernel: np.ndarray  # (H, V)
    logits_bias: np.ndarray  # (V,)

    @property
    def units(self) -> int:
        return self.layers[0].R.shape[1]

    @property
    def gates(self) -> tuple[str, ...]:
        return GATES[self.cell]

    @classmethod
    def from_graph(cls, path: str | Path, cell: str, num_layers: int) -> "Network":
        """The weights of the graph at `path` (an artifact's checked model.onnx), named as
        model/training/onnx_graph.py names them."""
        w = read_initializers(path)
        missing = [n for n in ["embedding", "logits_kernel", "logits_bias",
                               *(f"{k}_{i}" for i in range(1, num_layers + 1) for k in "WRB")] if n not in w]
        if missing:
            raise ValueError(f"{path}: no weights named {', '.join(missing)} (not a graph chargen wrote?)")
        layers = []
        for i in range(1, num_layers + 1):
            B = w[f"B_{i}"][0]
            half = B.shape[0] // 2
            layers.append(Layer(w[f"W_{i}"][0], w[f"R_{i}"][0], B[:half], B[half:]))
        return cls(cell, w["embedding"], tuple(layers), w["logits_kernel"], w["logits_bias"])

    def trace(self, ids: np.ndarray, layers: set[int] | None = None, gates: set[str] | None = None,
              state: State | None = None) -> Trace:
        """The values after each of `ids` (T,), T >= 1, for the 1-based `layers` (default all; the
        layers below them run anyway) and `gates` (default all of the cell type's; an empty set:
        none), from `state` (default the zero state, as the engine starts a prompt)."""
        ids = np.asarray(ids, np.int64)
        wanted = set(range(1, len(self.layers) + 1)) if layers is None else layers
        gates = set(self.gates) if gates is None else gates
        x = self.embedding[ids]  # (T, E)
        out: list[LayerTrace | None] = []
        after: State = []
        for i, layer in enumerate(self.layers, start=1):
            H = self.units
            h0, c0 = state[i - 1] if state is not None else (np.zeros(H, F32), np.zeros(H, F32) if self.cell == "lstm" else None)
            t = _RUN[self.cell](layer, x, gates if i in wanted else set(), h0, c0)
            out.append(t if i in wanted else None)
            after.append((t.hidden[-1].copy(), None if t.cell is None else t.cell[-1].copy()))
            x = t.hidden
        return Trace(out, x @ self.logits_kernel + self.logits_bias, after)


def _times(h: np.ndarray, RT: np.ndarray) -> np.ndarray:
    """h (H,) @ RT (H, G), one character's recurrent product, on this thread only: numpy's matmul
    hands a product this size to OpenBLAS's threads, which spin while waiting and, on cores the
    engine and the other requests share, made a step several times slower than one thread's loop
    (einsum does not call BLAS)."""
    return np.einsum("h,hg->g", h, RT)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-a))).astype(F32)


def _kept(gates: set[str], T: int, H: int) -> dict[str, np.ndarray]:
    return {g: np.empty((T, H), F32) for g in gates}


def _lstm(layer: Layer, x: np.ndarray, gates: set[str], h: np.ndarray, c: np.ndarray) -> LayerTrace:
    T, H = len(x), layer.R.shape[1]
    xw = x @ layer.W.T + (layer.Wb + layer.Rb)  # (T, 4H)
    RT = np.ascontiguousarray(layer.R.T)  # (H, 4H)
    hs, cs, kept = np.empty((T, H), F32), np.empty((T, H), F32), _kept(gates, T, H)
    for t in range(T):
        a = xw[t] + _times(h, RT)  # (4H,) blocks i, o, f, c
        s = _sigmoid(a[: 3 * H])
        i, o, f = s[:H], s[H: 2 * H], s[2 * H:]
        g = np.tanh(a[3 * H:])
        c = f * c + i * g
        h = o * np.tanh(c)
        hs[t], cs[t] = h, c
        for name, value in (("input", i), ("output", o), ("forget", f), ("candidate", g)):
            if name in kept:
                kept[name][t] = value
    return LayerTrace(hs, cs, kept)


def _gru(layer: Layer, x: np.ndarray, gates: set[str], h: np.ndarray, _c=None) -> LayerTrace:
    T, H = len(x), layer.R.shape[1]
    xw = x @ layer.W.T + layer.Wb  # (T, 3H) blocks z, r, h
    RT = np.ascontiguousarray(layer.R.T)  # (H, 3H)
    hs, kept = np.empty((T, H), F32), _kept(gates, T, H)
    for t in range(T):
        hr = _times(h, RT) + layer.Rb  # (3H,): linear_before_reset, the recurrent bias inside r * (...)
        zr = _sigmoid(xw[t, : 2 * H] + hr[: 2 * H])
        z, r = zr[:H], zr[H:]
        n = np.tanh(xw[t, 2 * H:] + r * hr[2 * H:])
        h = (1 - z) * n + z * h
        hs[t] = h
        for name, value in (("update", z), ("reset", r), ("candidate", n)):
            if name in kept:
                kept[name][t] = value
    return LayerTrace(hs, None, kept)


def _rnn(layer: Layer, x: np.ndarray, gates: set[str], h: np.ndarray, _c=None) -> LayerTrace:
    T, H = len(x), layer.R.shape[1]
    xw = x @ layer.W.T + (layer.Wb + layer.Rb)  # (T, H)
    RT = np.ascontiguousarray(layer.R.T)
    hs, kept = np.empty((T, H), F32), _kept(gates, T, H)
    for t in range(T):
        a = xw[t] + _times(h, RT)
        h = np.tanh(a)
        hs[t] = h
        if "preactivation" in kept:
            kept["preactivation"][t] = a
    return LayerTrace(hs, None, kept)


_RUN = {"lstm": _lstm, "gru": _gru, "rnn": _rnn}


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, (T, V) -> (T, V)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
