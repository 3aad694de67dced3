"""The time budget of a training run (--max-minutes): when training must stop so that an evaluation
and its saving still fit."""

from __future__ import annotations

import math


class Budget:
    """--max-minutes covers everything the run does, from train() being called to its return:
    preparing the corpus, training, validating and saving. (Without it, every deadline is
    infinitely far away.)

    After each stretch of training come an evaluation and its saving, so training stops early
    enough for both to fit: the stretch is cut short, rather than the evaluation, because
    validation losses are compared with each other (the best artifact, early stopping) and stay
    comparable only on the same characters. Validation is estimated before the first stretch by
    timing one group of streams on the untrained network, then measured; saving is guessed, then
    measured. An evaluation that the deadline still cuts short (a misestimate) scored only a prefix
    of the text: it is recorded as partial and never chosen as the best. The first evaluation is
    never cut short, so every run leaves an artifact: when validating alone takes longer than the
    budget (a huge --eval-chars), the run trains one batch and overruns by that evaluation."""

    SAVING_GUESS = 2.0  # seconds, until an evaluation's saving has been measured

    def __init__(self, started: float, minutes: float | None):
        self.total = 60.0 * minutes if minutes else math.inf
        self.end = started + self.total
        self.validation = 0.0  # seconds a whole validation takes
        self.saving: float | None = None

    def __bool__(self) -> bool:
        return math.isfinite(self.total)

    def _saving(self) -> float:
        return self.SAVING_GUESS if self.saving is None else self.saving

    def train_until(self) -> float:
        return self.end - self._saving() - self.validation

    def validate_until(self) -> float:
        return self.end - self._saving()

    def validated(self, seconds: float, scored: int, whole: int) -> None:
        self.validation = seconds * whole / scored

    def saved(self, seconds: float) -> None:
        self.saving = seconds if self.saving is None else max(self.saving, seconds)
