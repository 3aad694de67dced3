"""The int8 graph (model.int8.onnx) of an LSTM artifact, and the measure that decides whether serving
runs it by default (issue 24).

`int8_graph` turns model.onnx into model.int8.onnx with ONNX Runtime's dynamic quantization
(`onnxruntime.quantization.quantize_dynamic`): each LSTM becomes the `com.microsoft.DynamicQuantizeLSTM`
contrib operator with int8 weights, the output layer's MatMul a MatMulInteger, the embedding an int8
table; activations are quantized on the fly at every step. The signature and the chargen metadata
stay the graph's (model/runtime/graph.py), plus metadata precision "int8".

GRU and vanilla RNN artifacts get none: ONNX Runtime has no quantized GRU or RNN operator, so
quantize_dynamic quantizes only their output layer and embedding, and the recurrent products, most
of the work, stay float32; bench/int8_cells.py measured such graphs within noise of float32 (a
quantized graph whose batch changes its results, for nothing clear). A GRU written out of
quantizable MatMuls would need the recurrence as an ONNX Loop or one runtime call per character:
not tried. Those artifacts record `NO_INT8[cell]` and serve float32.

`measure` scores both graphs on the same text with ONNX Runtime, in consecutive windows of 256 from
a fresh state (model/training/evaluate.py's window_loss, nanoGPT's measure): the figures meta.json
records, and the quality gate (model/records/meta.py's MAX_INT8_LOSS_INCREASE) compares.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from model.records.meta import MAX_INT8_LOSS_INCREASE, Int8Info
from model.training.evaluate import GraphNetwork, Loss, window_loss

WINDOW = 256
# The most characters of a text the measure scores (its start): bounded time at export and at each
# save a training run makes (every new best is measured).
MAX_CHARS = 2**17
NO_INT8 = {
    "gru": "ONNX Runtime has no quantized GRU operator: quantize_dynamic leaves the recurrent products in float32, "
           "and the graph it makes measured no clear gain over float32 (bench/int8_cells.py)",
    "rnn": "ONNX Runtime has no quantized RNN operator: quantize_dynamic leaves the recurrent products in float32, "
           "and the graph it makes measured no clear gain over float32 (bench/int8_cells.py)",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def int8_graph(float32_graph: bytes) -> bytes:
    """model.int8.onnx's bytes from model.onnx's (the same bytes for the same graph)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger()  # the quantizer warns on the root logger that ids (int64) are not quantized
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="chargen-int8-") as tmp:
        source, target = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        source.write_bytes(float32_graph)
        quiet.setLevel(logging.ERROR)
        try:
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        finally:
            quiet.setLevel(level)
        model = onnx.load(target)
    props = {p.key: p.value for p in model.metadata_props if p.key != "onnx.infer"}
    props["precision"] = "int8"
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.doc_string = (model.doc_string + ", int8 weights (onnxruntime.quantization.quantize_dynamic)").lstrip(", ")
    return model.SerializeToString()


def graph_loss(graph: bytes, ids: np.ndarray, window: int = WINDOW) -> Loss:
    """A graph's loss on `ids` (at most MAX_CHARS of them) in consecutive windows from a fresh state."""
    return window_loss(GraphNetwork(graph), np.asarray(ids[:MAX_CHARS]), window)


def measure(float32_graph: bytes, int8: bytes, ids: np.ndarray, text: str,
            max_increase: float = MAX_INT8_LOSS_INCREASE) -> Int8Info:
    """Both graphs scored on `ids` (`text` says what they are), as meta.json's `int8` records them."""
    before, after = graph_loss(float32_graph, ids), graph_loss(int8, ids)
    return Int8Info(sha256=sha256(int8), float32_sha256=sha256(float32_graph), text=text,
                    window=min(WINDOW, len(ids[:MAX_CHARS]) - 1), chars_scored=before.chars,
                    float32_nats_per_char=round(before.nats, 5), int8_nats_per_char=round(after.nats, 5),
                    max_increase=max_increase)


def none_for(cell: str) -> Int8Info:
    """meta.json's `int8` for an artifact whose cell has no int8 graph."""
    return Int8Info(sha256=None, reason=NO_INT8[cell])

