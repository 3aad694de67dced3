"""Turn next-character logits into the next character: temperature, top-k, top-p, seeded draws.

One sampler serves every path (the engine, `chargen sample`, the service, the reference sampler in
the tests). It works on a batch of rows, one per stream, each with its own settings and its own
seeded `np.random.Generator`; a row's choice depends only on its own logits, settings and generator.

Per row, in this order:
    temperature  0 -> greedy: the most likely character (the lowest id on ties); no random draw.
                 t > 0 -> probabilities softmax(logits / t).
    top_k        k > 0 keeps the k most likely characters (ties: lower ids first).
    top_p        p < 1 keeps the smallest set of most likely characters whose probability mass
                 (after top-k, renormalized) reaches p.
then one uniform draw u from the row's generator picks, by inverse CDF in id order, the first
character whose cumulative probability exceeds u. Every non-greedy pick consumes exactly one
`generator.random()`, so a seed fixes the text.

The math runs in float64: logits that differ by float32 rounding (as a batched matrix product can
give compared with a single row) change a pick only when the draw falls within about 1e-6 of a
boundary between two characters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numpy as np

# Running sums of probabilities round; without this slack a set whose mass is exactly p could
# compute as p - 1e-17 and take one character more than the smallest set.
TOP_P_SLACK = 1e-12


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0  # >= 0; 0 means greedy (argmax, lowest id on ties)
    top_k: int = 0  # >= 0; 0 means no top-k filter
    top_p: float = 1.0  # in (0, 1]; 1 means no nucleus filter

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, Real) or not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0 means no top-k filter), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, Real) or not (0 < p <= 1):  # also rejects NaN
            raise ValueError(f"top_p must be a number in (0, 1] (1 means no nucleus filter), got {p!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingSettings(temperature=0.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities in float64 over the last axis (the raw model distribution)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _weights(logits: np.ndarray, settings: Sequence[SamplingSettings]) -> np.ndarray:
    """(B, V) float64 weights of non-greedy rows after temperature, top-k and top-p: proportional
    to the probabilities a row is sampled with, zero where filtered out (not normalized)."""
    temperature = np.array([s.temperature for s in settings])[:, None]  # (B, 1)
    w = np.array(logits, dtype=np.float64)  # a copy: (B, V)
    w /= temperature
    w -= w.max(axis=1, keepdims=True)
    np.exp(w, out=w)  # the largest weight of a row is 1
    # Only rows with a filter pay for sorting their characters by likelihood.
    rows = [b for b, s in enumerate(settings) if s.top_k or s.top_p < 1.0]
    if rows:
        V = w.shape[1]
        top_k = np.array([settings[b].top_k or V for b in rows])[:, None]
        top_p = np.array([settings[b].top_p for b in rows])[:, None]
        order = np.argsort(-w[rows], axis=1, kind="stable")  # most likely first; ties: lower id first
        ranked = np.take_along_axis(w[rows], order, axis=1)
        ranked[np.arange(V)[None, :] >= top_k] = 0.0
        ranked /= ranked.sum(axis=1, keepdims=True)  # probabilities within the top k
        mass_before = np.cumsum(ranked, axis=1) - ranked  # mass of the more likely characters
        ranked[mass_before >= top_p - TOP_P_SLACK] = 0.0  # the most likely one (mass 0) always stays
        kept = np.empty_like(ranked)
        np.put_along_axis(kept, order, ranked, axis=1)
        w[rows] = kept
    return w


def probabilities(logits: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """The distribution one row is sampled from, (V,) float64 by id; one-hot for greedy."""
    logits = np.asarray(logits)
    if settings.greedy:
        out = np.zeros(logits.shape[-1])
        out[int(np.argmax(logits))] = 1.0
        return out
    w = _weights(logits[None, :], [settings])[0]
    return w / w.sum()


def next_ids(logits: np.ndarray, settings: Sequence[SamplingSettings], generators: Sequence[np.random.Generator]) -> np.ndarray:
    """Pick the next character id of every row of `logits` (B, V); returns (B,) int64.

    Row b uses settings[b] and draws (unless greedy) one number from generators[b].
    """
    logits = np.asarray(logits)
    B = logits.shape[0]
    if not (len(settings) == len(generators) == B):
        raise ValueError(f"need one setting and one generator per row: {B} rows, {len(settings)} settings, {len(generators)} generators")
    ids = np.argmax(logits, axis=1)  # greedy rows keep these
    rows = [b for b in range(B) if settings[b].temperature]
    if not rows:
        return ids
    if len(rows) < B:
        logits, settings, generators = logits[rows], [settings[b] for b in rows], [generators[b] for b in rows]
    cdf = _weights(logits, settings)
    np.cumsum(cdf, axis=1, out=cdf)  # (b, V)
    u = np.fromiter((g.random() for g in generators), np.float64, len(generators))
    u *= cdf[:, -1]  # u < 1 makes u * total < total in floating point too: some cdf entry exceeds it
    ids[rows] = (cdf <= u[:, None]).sum(axis=1)  # the first id whose cdf exceeds u (never a zero weight)
    return ids
