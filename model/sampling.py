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

The per-row work is compiled (numba): `pick`, which `next_ids` and the engine call, and its
`_weights`, which `probabilities` calls too. The math runs in float64: logits that differ by
float32 rounding (as a batched matrix product can give compared with a single row) change a pick
only when the draw falls within about 1e-6 of a boundary between two characters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numba as nb
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


@nb.njit(nogil=True, cache=True)
def _weights(row, temperature, top_k, top_p, out):
    """out (V,) float64 = weights of one row of logits after temperature, top-k and top-p:
    proportional to the probabilities it is sampled with, zero where filtered out."""
    V = row.shape[0]
    for v in range(V):
        out[v] = np.float64(row[v]) / temperature
    top = out.max()
    for v in range(V):
        out[v] = np.exp(out[v] - top)  # the largest weight is 1
    if top_k == 0 and top_p >= 1.0:
        return
    order = np.argsort(-out, kind="mergesort")  # most likely first; ties: lower id first
    k = min(top_k, V) if top_k else V
    total = 0.0
    for r in range(k):
        total += out[order[r]]
    before = 0.0  # probability mass (within the top k) of the more likely characters
    for r in range(V):
        v = order[r]
        if r >= k or before >= top_p - TOP_P_SLACK:  # the most likely one (mass 0) always stays
            out[v] = 0.0
        else:
            out[v] /= total
            before += out[v]


@nb.njit(nogil=True, cache=True)
def pick(logits, temperature, top_k, top_p, u, ids):
    """The sampler's core, row by row: ids[b] = argmax of logits[b] (lowest id on ties) where
    temperature[b] == 0, else the first id whose running sum of weights exceeds u[b] times their
    total, u[b] in [0, 1) being the row's draw. Every path that samples ends here."""
    V = logits.shape[1]
    w = np.empty(V)
    for b in range(logits.shape[0]):
        if temperature[b] == 0.0:
            ids[b] = np.argmax(logits[b])
            continue
        _weights(logits[b], temperature[b], top_k[b], top_p[b], w)
        total = 0.0
        for v in range(V):
            total += w[v]
        target = u[b] * total  # u < 1 makes u * total < total in floating point too
        running, chosen = 0.0, V - 1
        for v in range(V):
            running += w[v]
            if running > target:  # never true first at a zero weight: the sum did not grow there
                chosen = v
                break
        ids[b] = chosen


def probabilities(logits: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """The distribution one row is sampled from, (V,) float64 by id; one-hot for greedy."""
    logits = np.asarray(logits)
    if settings.greedy:
        out = np.zeros(logits.shape[-1])
        out[int(np.argmax(logits))] = 1.0
        return out
    w = np.empty(logits.shape[-1])
    _weights(logits, settings.temperature, settings.top_k, settings.top_p, w)
    return w / w.sum()


def next_ids(logits: np.ndarray, settings: Sequence[SamplingSettings], generators: Sequence[np.random.Generator]) -> np.ndarray:
    """Pick the next character id of every row of `logits` (B, V); returns (B,) int64.

    Row b uses settings[b] and draws (unless greedy) one number from generators[b].
    """
    logits = np.asarray(logits)
    B = logits.shape[0]
    if not (len(settings) == len(generators) == B):
        raise ValueError(f"need one setting and one generator per row: {B} rows, {len(settings)} settings, {len(generators)} generators")
    temperature = np.array([s.temperature for s in settings])
    top_k = np.array([s.top_k for s in settings], dtype=np.int64)
    top_p = np.array([s.top_p for s in settings])
    u = np.array([g.random() if s.temperature else 0.0 for s, g in zip(settings, generators)])
    ids = np.empty(B, dtype=np.int64)
    pick(logits, temperature, top_k, top_p, u, ids)
    return ids
