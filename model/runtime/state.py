"""A recurrent state outside the network step's slots, and how many positions one runtime call takes:
what the network step (model/runtime/network_step.py, model/runtime/onnx_step.py), the engine and
the prompt cache pass between them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPT_CHUNK = 16_384  # positions per runtime call: longer prompts are fed in calls of this many


@dataclass(frozen=True, eq=False)
class State:
    """A recurrent state outside the slots, and its prediction for the next character. Opaque to
    the engine but for its size; made by `prompt`/`predict` of the same network step."""

    arrays: tuple[np.ndarray, ...]  # the network step's own layout, one array per recurrent state
    logits: np.ndarray  # (V,) float32: the prediction for the character after the state

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays) + self.logits.nbytes
