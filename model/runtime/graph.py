"""The ONNX graph of a chargen network as the runtime sees it: its signature and metadata, and the
check that an artifact's model.onnx is the graph of the network its meta.json describes, made with
ONNX Runtime alone. The training side builds the graph to this signature
(model/training/onnx_graph.py).

One graph serves one-character steps and whole prompts (batch and sequence length are symbolic):

    inputs   ids     int64  (batch, seq)            character ids
             h       float  (layers, batch, units)  each layer's hidden state
             c       float  (layers, batch, units)  each layer's cell state (lstm only)
    outputs  logits  float  (batch, seq, vocab)     the next-character logits after every position
             h_out   float  (layers, batch, units)  the states after the last position
             c_out   float  (layers, batch, units)  (lstm only)

Its metadata (strings): chargen_graph_format, cell, layers, units, embedding, vocab_size, and in an
int8 graph (model.int8.onnx, model/training/quantize.py) precision "int8": the same signature, its
weights stored in int8 (a graph without `precision` is float32).

Its float initializers (the weights model/runtime/inside.py reads back): embedding (V, E); per layer
i = 1..layers W_i, R_i, B_i in the layouts of ONNX's recurrent operators; logits_kernel (H, V), logits_bias (V,).

What the check sees is what ONNX Runtime reports: a graph it refuses is damaged; one it accepts is
compared with meta.json by its metadata, inputs and outputs. The operators inside are not compared
(ONNX Runtime does not list them): export writes them, the metadata and the signature together.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf

GRAPH_FORMAT = 1  # metadata "chargen_graph_format": bump when the signature or the metadata changes
CELLS = ("lstm", "gru", "rnn")

# (name, element type as ONNX names it, dims): an int dim is fixed, a str dim symbolic (any size)
Tensor = tuple[str, str, list]


def signature(cell: str, layers: int, units: int, vocab_size: int) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's (inputs, outputs), in order."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    state = [layers, "batch", units]
    inputs = [("ids", "int64", ["batch", "seq"]), ("h", "float", state)]
    outputs = [("logits", "float", ["batch", "seq", vocab_size]), ("h_out", "float", state)]
    if cell == "lstm":
        inputs.append(("c", "float", state))
        outputs.append(("c_out", "float", state))
    return inputs, outputs


def metadata(cell: str, layers: int, units: int, embedding: int, vocab_size: int) -> dict[str, str]:
    """The graph's metadata (what `check_graph` and the engine read back)."""
    return {"chargen_graph_format": str(GRAPH_FORMAT), "cell": cell, "layers": str(layers), "units": str(units),
            "embedding": str(embedding), "vocab_size": str(vocab_size)}


def check_graph(source: str | Path | bytes, *, cell: str, layers: int, units: int, vocab_size: int,
                embedding: int | None = None, name: str | None = None, precision: str = "float32") -> None:
    """Check that a graph (a path or its bytes) is the graph of the network meta.json describes, in
    `precision` (float32: model.onnx, int8: model.int8.onnx); its embedding's size too when given.
    Raises ValueError naming the file (`name`, else the path) and every mismatch found."""
    name = _name(source, name, precision)
    problems = graph_problems(source, cell=cell, layers=layers, units=units, vocab_size=vocab_size,
                              embedding=embedding, name=name, precision=precision)
    if problems:
        raise ValueError(f"{name}: does not match meta.json ({described(cell, layers, units, vocab_size)}): "
                         + "; ".join(problems))


def graph_problems(source: str | Path | bytes, *, cell: str, layers: int, units: int, vocab_size: int,
                   embedding: int | None = None, name: str | None = None, precision: str = "float32") -> list[str]:
    """check_graph's mismatches of a sound graph, each a phrase (empty: the graph is the network's).
    Raises ValueError naming the file when it cannot be read, ONNX Runtime refuses it, or it is the
    network's graph in the other precision."""
    name = _name(source, name, precision)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ValueError(f"{name}: cannot be read: {e.strerror or e}") from None
    if not data:
        raise ValueError(f"{name}: not an ONNX model (empty, damaged or truncated: it holds no graph)")
    try:
        session = _session(data)
    except InvalidProtobuf as e:
        raise ValueError(f"{name}: not an ONNX model (damaged or truncated?): {_reason(e)}") from None
    except Exception as e:  # ONNX Runtime's error classes derive from Exception only
        raise ValueError(f"{name}: damaged ONNX graph: {_reason(e)}") from None

    props = session.get_modelmeta().custom_metadata_map
    problems = _metadata_problems(props, cell, layers, units, embedding, vocab_size)
    expected_in, expected_out = signature(cell, layers, units, vocab_size)
    problems += _tensor_problems("input", session.get_inputs(), expected_in)
    problems += _tensor_problems("output", session.get_outputs(), expected_out)
    if not problems and props.get("precision", "float32") != precision:  # the network's graph, the other file of two
        raise ValueError(f"{name}: does not match meta.json ({described(cell, layers, units, vocab_size)}): it is "
                         f"the {props.get('precision', 'float32')} graph, expected the {precision} one")
    return problems


def described(cell: str, layers: int, units: int, vocab_size: int) -> str:
    """The network meta.json describes, in the words of check_graph's message."""
    return f"a {layers}-layer {cell} network of {units} units and {vocab_size} characters"


def _name(source: str | Path | bytes, name: str | None, precision: str) -> str:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "model.onnx" if precision == "float32" else "model.int8.onnx"
    return str(source)


def _session(data: bytes) -> ort.InferenceSession:
    """A session that only loads the graph: ONNX Runtime checks its operators, types and shapes
    as it loads it; the engine makes its own sessions to run it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _reason(error: Exception) -> str:
    """ONNX Runtime's message without its "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " prefix and
    final full stop (a "; rebuild it with: ..." may follow)."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[0]).rstrip(".")


def _metadata_problems(props: dict[str, str], cell: str, layers: int, units: int, embedding: int | None,
                       vocab_size: int) -> list[str]:
    if "chargen_graph_format" not in props:
        return ["no chargen metadata (not made by `chargen export`, or truncated)"]
    if props["chargen_graph_format"] != str(GRAPH_FORMAT):
        return [f"chargen_graph_format {props['chargen_graph_format']!r} is not supported (this chargen reads {GRAPH_FORMAT})"]
    wanted = {"cell": cell, "layers": str(layers), "units": str(units), "vocab_size": str(vocab_size)}
    if embedding is not None:
        wanted["embedding"] = str(embedding)
    return [f"metadata {key} is {props.get(key)!r}, meta.json says {value!r}"
            for key, value in wanted.items() if props.get(key) != value]


def _tensor_problems(kind: str, found: list, expected: list[Tensor]) -> list[str]:
    """`found`: ONNX Runtime's NodeArgs (name, type "tensor(float)", shape: a list with None for an
    unnamed dim, empty when the graph gives none)."""
    got = {arg.name: arg for arg in found}
    names = [n for n, _, _ in expected]
    problems = [f"missing {kind} {n!r}" for n in names if n not in got]
    problems += [f"unexpected {kind} {n!r}" for n in got if n not in names]
    for n, elem, dims in expected:
        if n not in got:
            continue
        arg = got[n]
        found_elem = re.sub(r"^tensor\((.*)\)$", r"\1", arg.type)
        if found_elem != elem:
            problems.append(f"{kind} {n!r} is {found_elem}, expected {elem}")
            continue
        have = ["?" if d is None else d for d in arg.shape or []]
        fits = len(have) == len(dims) and all(
            (isinstance(w, str) and isinstance(h, str)) or w == h for w, h in zip(dims, have))
        if not fits:
            shown = _dims(have) if have else "unknown"  # no tensor here is a scalar
            problems.append(f"{kind} {n!r} has shape {shown}, expected {_dims(dims)}")
    return problems


def _dims(dims) -> str:
    return "(" + ", ".join(map(str, dims)) + ")"
