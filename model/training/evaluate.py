"""Loss of a model on a text, in nats and bits per character, measured two ways.

`StreamScorer` (the carried-state score, what training reports): the text is cut into B contiguous
streams that run side by side; each carries its recurrent state from its first character to its
last, so every character is predicted from everything before it in its stream (as when sampling),
not from a fixed window.

`window_loss` (nanoGPT's measure): the text is cut into consecutive windows, each run from a fresh
(zero) state, so a character is predicted from the characters before it in its window only. This is
nanoGPT's `estimate_loss`, whose `get_batch` takes a block x = data[i:i+256] and its targets
y = data[i+1:i+257] and averages the loss over all 256 targets, so the first target of a block is
predicted from one character, the last from 256. nanoGPT samples blocks at random offsets; this
scores the text in consecutive blocks instead (block k is characters 256·k to 256·k+256, sharing
its first character with the previous block's last), every target once. As in nanoGPT only whole
blocks are scored: the last (len - 1) mod 256 characters of the text are not predicted.

Both take a Keras network, or a `GraphNetwork`: an artifact's ONNX graph (model.onnx or
model.int8.onnx) on ONNX Runtime, scored the same way (`chargen evaluate --precision int8`, and the
int8 graph's quality gate, model/training/quantize.py).

A deadline (training's --max-minutes) ends scoring between groups of streams: the loss is then that
of a prefix of the text, and `Loss.chars` says how much was scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.training.data import streams
from model.runtime.sampling import LN2, log_softmax

if TYPE_CHECKING:
    import keras



@dataclass(frozen=True)
class Loss:
    nats: float
    chars: int  # how many predictions were scored

    @property
    def bits(self) -> float:
        return self.nats / LN2

    def to_dict(self) -> dict:
        return {"nats_per_char": round(self.nats, 5), "bits_per_char": round(self.bits, 5), "chars_scored": self.chars}


class GraphNetwork:
    """An ONNX graph of a chargen network (its bytes or path) with Keras's `predict_on_batch`: the
    logits (B, T, V) after every position of ids (B, T), each row from the zero state."""

    def __init__(self, graph: bytes | str | Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = graph if isinstance(graph, bytes) else str(graph)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.states = {i.name: i.shape for i in self.session.get_inputs() if i.name != "ids"}  # h, c: (layers, batch, units)

    def predict_on_batch(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        zero = {name: np.zeros((shape[0], ids.shape[0], shape[2]), np.float32) for name, shape in self.states.items()}
        return self.session.run(["logits"], {"ids": ids, **zero})[0]


def nats_of(logits: np.ndarray, targets: np.ndarray) -> float:
    """The summed negative log-likelihood of `targets` (B, T) under `logits` (B, T, V)."""
    logp = np.take_along_axis(log_softmax(logits), targets[..., None].astype(np.int64), axis=-1)
    return -float(logp.sum())


class StreamScorer:
    """Scores texts with a model; each stream runs through the network in one call, so the state is
    carried from its first character to its last (streams of at most `max_len` characters)."""

    def __init__(self, n_streams: int = 64, max_len: int = 4096, batch: int = 64):
        self.n_streams, self.max_len, self.batch = n_streams, max_len, batch

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return streams(ids, max(self.n_streams, -(-len(ids) // self.max_len)))  # (B, L)

    def groups(self, ids: np.ndarray) -> int:
        """How many network calls scoring `ids` takes."""
        return -(-self.rows(ids).shape[0] // self.batch)

    def scored(self, ids: np.ndarray) -> int:
        """How many characters scoring all of `ids` predicts (every character but each stream's first)."""
        rows = self.rows(ids)
        return rows.shape[0] * (rows.shape[1] - 1)

    def loss(self, model: keras.Model, ids: np.ndarray, deadline: float | None = None) -> Loss:
        """The loss on `ids`; with a `deadline` (time.monotonic()), groups of streams are scored
        while the time the last group took still fits before it, and always at least one."""
        import keras

        if len(ids) < 2:
            raise ValueError("need at least two characters to score")
        rows = self.rows(ids)
        total, count, took = 0.0, 0, 0.0
        for start in range(0, rows.shape[0], self.batch):
            if deadline is not None and count and time.monotonic() + took > deadline:
                break
            began = time.monotonic()
            group = rows[start : start + self.batch]
            x, y = group[:, :-1], group[:, 1:]
            logits = keras.ops.convert_to_numpy(model.predict_on_batch(x))  # (b, L-1, V)
            total += nats_of(logits, y)
            count += y.size
            took = time.monotonic() - began
        return Loss(total / count, count)


def window_loss(model: keras.Model, ids: np.ndarray, window: int, batch: int = 64) -> Loss:
    """The loss on `ids` scored in consecutive blocks of `window` predictions, each from a fresh
    state (nanoGPT's measure with window 256; see the module's docstring), `batch` blocks per
    network call. A text shorter than one block is scored as one shorter block."""
    import keras

    if len(ids) < 2:
        raise ValueError("need at least two characters to score")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    ids = np.asarray(ids)
    window = min(window, len(ids) - 1)
    starts = np.arange((len(ids) - 1) // window) * window
    blocks = ids[starts[:, None] + np.arange(window + 1)]  # (N, W+1): inputs [:, :-1], targets [:, 1:]
    total = 0.0
    for start in range(0, len(blocks), batch):
        group = blocks[start : start + batch]
        logits = keras.ops.convert_to_numpy(model.predict_on_batch(group[:, :-1]))  # (b, W, V)
        total += nats_of(logits, group[:, 1:])
    return Loss(total / (blocks.shape[0] * window), blocks.shape[0] * window)
