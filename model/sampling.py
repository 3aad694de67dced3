"""Turn next-character logits into the next character: temperature, top-k, top-p, seeded draws.

One sampler serves every path (the engine, `chargen sample`, the service, the reference sampler in
the tests). It works on a batch of rows, one per stream, each with its own settings and its own
seeded `np.random.Generator`; a row's choice depends only on its own logits, settings and generator.

Per row, in this order:
    temperature  0 -> greedy: the most likely character (the lowest id on ties); no random draw.
                 (So is a temperature below GREEDY_BELOW, the smallest normal float.)
                 t > 0 -> probabilities softmax(logits / t).
    top_k        k > 0 keeps the k most likely characters (ties: lower ids first).
    top_p        p < 1 keeps the smallest set of most likely characters whose probability mass
                 (after top-k, renormalized) reaches p.
then one uniform draw u from the row's generator picks, by inverse CDF in id order, the first
character whose cumulative probability exceeds u. Every non-greedy pick consumes exactly one
`generator.random()`, so a seed fixes the text.

The sampler is vectorized over rows (`pick`): a step of any number of streams is a fixed handful
of numpy operations, with no Python per row. The math runs in float64: logits that differ by
float32 rounding (as a batched matrix product can give compared with a single row) change a pick
only when the draw falls within about 1e-6 of a boundary between two characters. Running sums are
numpy's cumulative sums, which add in order, so a row's weights and its pick do not depend on the
other rows of its batch.

Adjustments of a row's logits that do not depend on the temperature (penalties for what a stream
already produced, biases per character) belong in `pick`, on its float64 copy of the logits,
before greedy picks and the temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Running sums of probabilities round; without this slack a set whose mass is exactly p could
# compute as p - 1e-17 and take one character more than the smallest set.
TOP_P_SLACK = 1e-12
# A subnormal temperature (1e-310) is greedy: where denormals are flushed to zero (a thread of a
# process that loaded TensorFlow may run so) logits / t would be x / 0, NaN weights, a wrong pick.
GREEDY_BELOW = float(np.finfo(np.float64).tiny)


@dataclass(frozen=True)
class SamplingSettings:
    """How one stream picks its characters. The temperature has no default: the caller says
    (model/defaults.py holds the command line's and the service's); top_k and top_p default to
    "no filter"."""

    temperature: float  # >= 0; 0 means greedy (argmax, lowest id on ties)
    top_k: int = 0  # >= 0; 0 means no top-k filter
    top_p: float = 1.0  # in (0, 1]; 1 means no nucleus filter

    def __post_init__(self):
        # What people type is validated where they type it (the HTTP schemas, the command line's
        # options); this only catches code that builds settings wrongly. NaN fails every comparison.
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (0 <= t < math.inf and k >= 0 and k == int(k) and 0 < p <= 1):
            raise ValueError(f"invalid sampling settings: temperature={t!r}, top_k={k!r}, top_p={p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


GREEDY = SamplingSettings(temperature=0.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities in float64 over the last axis (the raw model distribution)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def pick(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The sampler's core, every row at once: (n,) int64 ids for logits (n, V) with per-row
    settings (n,) and draws u (n,) in [0, 1). A row whose temperature is 0 (below GREEDY_BELOW)
    takes its argmax (lowest id on ties); any other row takes the first id whose running sum of
    weights exceeds u times their total. Every path that samples ends here."""
    z = np.asarray(logits).astype(np.float64)  # (n, V): the sampler's own copy
    # Per-row adjustments of the logits (penalties, biases) go here, before greedy and temperature.
    if temperature.min() >= GREEDY_BELOW:  # the usual batch: every row samples
        ids = None
        w = _weights(z, temperature, top_k, top_p)
    else:
        ids = z.argmax(axis=1)
        rows = np.flatnonzero(temperature >= GREEDY_BELOW)
        if not len(rows):
            return ids
        w, u = _weights(z[rows], temperature[rows], top_k[rows], top_p[rows]), u[rows]
    running = np.add.accumulate(w, axis=1, out=w)  # adds in id order (np.cumsum, with less overhead)
    target = u * running[:, -1]  # u < 1 makes u * total < total in floating point too
    # the first id whose running sum exceeds the target: never a zero weight (the sum did not grow
    # there), and there is one (the total exceeds the target)
    chosen = (running > target[:, None]).argmax(axis=1)
    if ids is None:
        return chosen
    ids[rows] = chosen
    return ids


def _weights(z: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Rows of float64 logits z (m, V), overwritten with their weights after temperature, top-k and
    top-p: proportional to the probabilities each row is sampled with, zero where filtered out."""
    # the maximum subtracted before dividing: a tiny temperature (1e-310) then gives 0 / t = 0 and
    # -x / t = -inf, where z / t would overflow to inf - inf = NaN
    z -= z.max(axis=1, keepdims=True)
    z /= temperature[:, None]
    w = np.exp(z, out=z)  # the largest weight of a row is 1
    if top_k.any() or (top_p < 1.0).any():
        rows = np.flatnonzero((top_k > 0) | (top_p < 1.0))
        w[rows] = _filter(w[rows], top_k[rows], top_p[rows])
    return w


def _filter(w: np.ndarray, top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Rows of weights with top-k and then top-p applied: the kept ones normalized to sum to 1 over
    the top k, the others 0."""
    m, V = w.shape
    order = np.argsort(-w, axis=1, kind="stable")  # most likely first; ties: lower id first
    ranked = np.take_along_axis(w, order, axis=1)
    k = np.where(top_k > 0, np.minimum(top_k, V), V)
    total = np.add.accumulate(ranked, axis=1)[np.arange(m), k - 1]  # the mass of the top k, added in order
    ranked /= total[:, None]
    before = np.zeros_like(ranked)  # probability mass (within the top k) of the more likely characters
    np.add.accumulate(ranked[:, :-1], axis=1, out=before[:, 1:])
    rank = np.arange(V)
    keep = (rank < k[:, None]) & ((before < (top_p - TOP_P_SLACK)[:, None]) | (rank == 0))  # the most likely one always stays
    out = np.zeros_like(w)
    np.put_along_axis(out, order, np.where(keep, ranked, 0.0), axis=1)
    return out


def probabilities(logits: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """The distribution one row is sampled from, (V,) float64 by id; one-hot for greedy."""
    logits = np.asarray(logits)
    if settings.greedy:
        out = np.zeros(logits.shape[-1])
        out[int(np.argmax(logits))] = 1.0
        return out
    w = _weights(logits[None].astype(np.float64), np.array([settings.temperature]), np.array([settings.top_k]), np.array([settings.top_p]))[0]
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
    u = np.array([0.0 if s.greedy else g.random() for s, g in zip(settings, generators)])
    return pick(logits, temperature, top_k, top_p, u)
