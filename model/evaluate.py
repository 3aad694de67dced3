"""Loss of a model on a text, in nats and bits per character, with the state carried through it.

The text is cut into B contiguous streams that run side by side; each carries its recurrent state
from its first character to its last, so every character is predicted from everything before it in
its stream (as when sampling), not from a fixed window.

A deadline (training's --max-minutes) ends scoring between groups of streams: the loss is then that
of a prefix of the text, and `Loss.chars` says how much was scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.data import streams
from model.sampling import log_softmax

if TYPE_CHECKING:
    import keras

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Loss:
    nats: float
    chars: int  # how many predictions were scored

    @property
    def bits(self) -> float:
        return self.nats / LN2

    def to_dict(self) -> dict:
        return {"nats_per_char": round(self.nats, 5), "bits_per_char": round(self.bits, 5), "chars_scored": self.chars}


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
            logp = np.take_along_axis(log_softmax(logits), y[..., None].astype(np.int64), axis=-1)
            total -= float(logp.sum())
            count += y.size
            took = time.monotonic() - began
        return Loss(total / count, count)
