"""What the engine needs from the network: a step over a batch of slots, and where it comes from.

A network step holds the recurrent state of `max_batch` slots in buffers allocated up front, and
each slot's prediction for its next character (`logits`). The engine keeps the streams it steps in
slots 0..n-1 (it moves them there with `swap` and fills a freed slot with `copy`), so a step works
on the first n rows. A prompt's state can also live outside any slot (model/runtime/state.py's
`State`: what `prompt` returns and `restore` puts into a slot), so the engine can keep it (the
prompt cache) or score a text without taking a slot (`predict`). How the step is computed (ONNX
Runtime today, on the CPU or a GPU) stays behind this interface: the engine does not know which
implementation it runs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from model.runtime.artifact import Artifact, export_command
from model.runtime.onnx_step import OrtStep
from model.runtime.state import State


class NetworkStep(Protocol):
    vocab_size: int
    max_batch: int

    @property
    def logits(self) -> np.ndarray:
        """(max_batch, V) float32: each slot's prediction for its next character."""

    def consume(self, slot: int, ids: np.ndarray) -> None:
        """Reset `slot` to the zero state and run it through the prompt `ids` (T,) int64, T >= 1,
        leaving the prediction for the character after the prompt in logits[slot]."""

    def prompt(self, ids: np.ndarray, state: State | None = None) -> State:
        """The state after feeding `ids` (T,) int64, T >= 1, from `state` (None: the zero state),
        any length; no slot is touched."""

    def predict(self, ids: np.ndarray, state: State | None = None) -> tuple[np.ndarray, State]:
        """Like `prompt`, for at most PROMPT_CHUNK ids, with the prediction after every one:
        logits (T, V) float32 (row t predicts the character after ids[t]) and the state after."""

    def restore(self, slot: int, state: State) -> None:
        """Give `slot` this state and its prediction."""

    def state(self, slot: int) -> State:
        """A copy of `slot`'s state and prediction (to feed it a run of characters with `prompt`
        and `restore`)."""

    def advance(self, n: int, ids: np.ndarray) -> None:
        """Feed character ids[b] (n,) int64 to slot b for b < n; logits[:n] become the next
        predictions."""

    def swap(self, i: int, j: int) -> None:
        """Exchange the states and logits of slots i and j."""

    def copy(self, src: int, dst: int) -> None:
        """Give slot dst the state and logits of slot src."""

    def flops_per_char(self) -> int:
        """2 x the multiply-adds of the matrix products one character costs."""

    def bytes_per_slot(self) -> int:
        """State and scratch buffers allocated up front for each batch slot."""


def load(artifact: Artifact, max_batch: int, threads: int | None = None, device: str = "cpu") -> NetworkStep:
    """The artifact's network (the graph it serves: model.onnx, or model.int8.onnx) as a step over
    `max_batch` slots on ONNX Runtime, using at most `threads` threads (default: one per core), on
    `device` ("cpu" or "cuda")."""
    if artifact.onnx_path is None:
        raise ValueError(f"{artifact.path}: no model.onnx, the graph the engine runs; add it with: {export_command(artifact.path)}")
    return OrtStep(artifact.graph, max_batch, threads, device)
