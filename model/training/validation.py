"""What a training run's evaluations score: the validation text, whole or a fixed sample of it
(`Validation`), and the network they score it with (`Scoring`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from model.records.config import ModelConfig, Recipe
from model.training.data import sample_pieces, sample_text
from model.training.distribute import Placement
from model.training.evaluate import Loss, StreamScorer
from model.training.network import build_model, copy_weights, trainable_weights
from model.training.recipe import averaged_weights

if TYPE_CHECKING:
    import keras


class Validation:
    """The text each evaluation scores and how. Short validation texts (at most --eval-chars) are
    scored whole, as `chargen evaluate` scores a text; longer ones through a fixed sample: pieces
    at evenly spaced offsets, each one stream (model/training/data.py's sample_text), the same characters
    at every evaluation. A long text is scored in segments, giving the memory map's pages back
    between them, so scoring all of it does not make the process grow with it; and a network call
    takes as many streams as keep its activations within CALL_BYTES (64 streams of 4,096
    characters through a 256-unit LSTM would need a gigabyte)."""

    SEGMENT = 2**20  # characters
    CALL_BYTES = 2**28  # streams x length x 4 x units float32 gate activations in one network call

    def __init__(self, ids: np.ndarray, eval_chars: int | None, n_streams: int, units: int, release=lambda: None):
        self.whole = eval_chars is None or eval_chars >= len(ids)
        if self.whole:
            self.text, self.scorer = ids, StreamScorer(n_streams=n_streams)
        else:
            pieces, length = sample_pieces(eval_chars, n_streams)
            self.text, self.scorer = sample_text(ids, pieces, length), StreamScorer(n_streams=pieces, max_len=length)
        count = max(1, round(len(self.text) / self.SEGMENT))
        bounds = np.linspace(0, len(self.text), count + 1).astype(int)
        self.segments = list(zip(bounds[:-1], bounds[1:]))
        length = self.scorer.rows(self.text[: bounds[1]]).shape[1]
        self.scorer.batch = max(1, min(self.scorer.batch, self.CALL_BYTES // (length * 16 * units)))
        self.chars = sum(self.scorer.scored(self.text[a:b]) for a, b in self.segments)  # predictions when whole
        self.groups = sum(self.scorer.groups(self.text[a:b]) for a, b in self.segments)
        self.release = release
        release()  # the pages a sample was copied from

    def loss(self, model: keras.Model, deadline: float | None = None) -> Loss:
        """The loss on the text, or on a prefix of it when `deadline` comes first (always at least one group)."""
        total, count = 0.0, 0
        for a, b in self.segments:
            if deadline is not None and count and time.monotonic() >= deadline:
                break
            part = self.scorer.loss(model, self.text[a:b], deadline=deadline)
            self.release()
            total += part.nats * part.chars
            count += part.chars
            if part.chars < self.scorer.scored(self.text[a:b]):  # the deadline cut it short
                break
        return Loss(total / count, count)


class Scoring:
    """The network evaluations run: the training model itself on one device in float32 without an
    average of its weights or weight drop (a weight-dropped layer is not a cell config_of() and the
    samples' ONNX graph know); otherwise a plain float32 network (no recipe layers) on this process's
    first device, given the weights to score before each use: the training weights, or their moving
    average under --ema (the distributed model would split the streams over the devices and
    processes, and its layers may compute in another precision). `model(weights)` is the copy with
    other weights (the best's). An artifact is saved from the network that was scored."""

    def __init__(self, model: keras.Model, config: ModelConfig, vocab_size: int, placement: Placement, precision: str,
                 recipe: Recipe):
        self.training, self.config, self.vocab_size = model, config, vocab_size
        separate = placement.parallel or precision != "float32" or recipe.ema or recipe.weight_drop
        self.copy = build_model(config, vocab_size) if separate else None

    def model(self, weights: list | None = None) -> keras.Model:
        if self.copy is None:
            if weights is None:
                return self.training
            self.copy = build_model(self.config, self.vocab_size)
        if weights is None:
            weights = averaged_weights(self.training) or trainable_weights(self.training)
        copy_weights(weights, self.copy)
        return self.copy

    def raw(self) -> keras.Model | None:
        """Under --ema, once there is an average: the copy given the raw training weights (which
        every evaluation scores beside the average); otherwise None."""
        if averaged_weights(self.training) is None:
            return None
        return self.model(trainable_weights(self.training))
