"""Turn next-character logits into the next character: adjustments, temperature, min-p, top-k,
top-p, seeded draws.

One sampler serves every path (the engine, `chargen sample`, the service, the reference sampler in
the tests). It works on a batch of rows, one per stream, each with its own settings and its own
seeded `np.random.Generator`; a row's choice depends only on its own logits, settings, history and
generator.

Per row, in this order:
    constraint   the characters a constraint (model.runtime.constraints) disallows are removed
                 (their logits set to -inf), so they weigh nothing through everything below.
    logit_bias   added to the logits of the characters it names (OpenAI: -100 bans, +100 forces).
    repetition_penalty r (llama.cpp's repeat_penalty): each character among the row's last
                 repetition_window characters (the prompt's included) has its logit divided by r
                 when positive, multiplied by r when not.
    presence_penalty, frequency_penalty (OpenAI's definition): logit -= frequency * c +
                 presence * (c > 0), c = how often the character was generated so far (the prompt
                 does not count, as in OpenAI's API).
    temperature  0 -> greedy: the most likely character after the adjustments (the lowest id on
                 ties); no random draw. (So is a temperature below GREEDY_BELOW, the smallest normal
                 float.) t > 0 -> probabilities softmax(logits / t).
    min_p        p > 0 drops the characters whose probability is below p times the most likely
                 one's (after the temperature, as Hugging Face and vLLM apply it).
    top_k        k > 0 keeps the k most likely characters (ties: lower ids first).
    top_p        p < 1 keeps the smallest set of most likely characters whose probability mass
                 (after min-p and top-k, renormalized) reaches p.
then one uniform draw u from the row's generator picks, by inverse CDF in id order, the first
character whose cumulative probability exceeds u. Every non-greedy pick consumes exactly one
`generator.random()`, so a seed fixes the text.

The sampler is vectorized over rows (`pick`): a step of any number of streams is a fixed handful
of numpy operations, with no Python per row. The adjustments read per-row arrays (`Adjustments`:
the biases, and counts of what each stream produced, which the engine updates with one indexed add
per step). The math runs in float64: logits that differ by float32 rounding (as a batched matrix
product can give compared with a single row) change a pick only when the draw falls within about
1e-6 of a boundary between two characters. Running sums are numpy's cumulative sums, which add in
order, so a row's weights and its pick do not depend on the other rows of its batch.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from typing import Sequence

import numpy as np

# Running sums of probabilities round; without this slack a set whose mass is exactly p could
# compute as p - 1e-17 and take one character more than the smallest set.
TOP_P_SLACK = 1e-12
# A subnormal temperature (1e-310) is greedy: where denormals are flushed to zero (a thread of a
# process that loaded TensorFlow may run so) logits / t would be x / 0, NaN weights, a wrong pick.
GREEDY_BELOW = float(np.finfo(np.float64).tiny)
# The bounds of the adjustments (the HTTP schemas state the same): OpenAI's for the penalties and
# biases; a repetition penalty of 10 already all but bans what it touches; the window is a ring
# buffer of this many characters per slot (llama.cpp's default repeat_last_n is 64).
MAX_PENALTY = 2.0
MAX_BIAS = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_REPETITION_WINDOW = 1024
REPETITION_WINDOW = 64  # llama.cpp's repeat_last_n


@dataclass(frozen=True)
class SamplingSettings:
    """How one stream picks its characters. The temperature has no default: the caller says
    (model/records/defaults.py holds the command line's and the service's); everything else defaults to
    "off"."""

    temperature: float  # >= 0; 0 means greedy (argmax, lowest id on ties)
    top_k: int = 0  # >= 0; 0 means no top-k filter
    top_p: float = 1.0  # in (0, 1]; 1 means no nucleus filter
    min_p: float = 0.0  # in [0, 1]; 0 means no min-p filter
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    repetition_penalty: float = 1.0  # in (0, 10]; 1 means off
    repetition_window: int = REPETITION_WINDOW  # in [0, MAX_REPETITION_WINDOW]; 0 means off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (character id, bias in [-100, 100]); an id at most once

    def __post_init__(self):
        # What people type is validated where they type it (the HTTP schemas, the command line's
        # options); this only catches code that builds settings wrongly. NaN fails every comparison.
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (0 <= t < math.inf and k >= 0 and k == int(k) and 0 < p <= 1):
            raise ValueError(f"invalid sampling settings: temperature={t!r}, top_k={k!r}, top_p={p!r}")
        w = self.repetition_window
        if not (0 <= self.min_p <= 1 and abs(self.presence_penalty) <= MAX_PENALTY and abs(self.frequency_penalty) <= MAX_PENALTY
                and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY and w == int(w) and 0 <= w <= MAX_REPETITION_WINDOW):
            raise ValueError(f"invalid sampling settings: min_p={self.min_p!r}, presence_penalty={self.presence_penalty!r}, "
                             f"frequency_penalty={self.frequency_penalty!r}, repetition_penalty={self.repetition_penalty!r}, "
                             f"repetition_window={w!r}")
        ids = [i for i, _ in self.logit_bias]
        if len(set(ids)) != len(ids) or not all(i >= 0 and i == int(i) and abs(b) <= MAX_BIAS for i, b in self.logit_bias):
            raise ValueError(f"invalid sampling settings: logit_bias={self.logit_bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p can drop characters (min-p is its own: `min_p > 0`)."""
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def repeats(self) -> bool:
        """Whether the repetition penalty does anything (so the stream's window must be kept)."""
        return self.repetition_penalty != 1.0 and self.repetition_window > 0

    @property
    def adjusts(self) -> bool:
        """Whether any adjustment of the logits applies."""
        return bool(self.logit_bias) or self.repeats or self.presence_penalty != 0 or self.frequency_penalty != 0


GREEDY = SamplingSettings(temperature=0.0)
# Every setting but the temperature at the value that turns it off: SamplingSettings' defaults (the
# window, the repetition penalty's span, changes nothing while the penalty is 1). The HTTP schemas'
# defaults and /info's are these.
OFF = {f.name: f.default for f in fields(SamplingSettings) if f.default is not MISSING}


@dataclass
class Adjustments:
    """The inputs of the logit adjustments for n rows: each row's settings, and counts of what its
    stream produced (kept by the caller: the engine per slot, the reference sampler per row)."""

    bias: np.ndarray  # (n, V) float64, added to the logits (0 where no bias)
    repetition: np.ndarray  # (n,) repetition_penalty (1: off)
    recent: np.ndarray  # (n, V) how often each character occurs among the row's last repetition_window characters
    presence: np.ndarray  # (n,) presence_penalty
    frequency: np.ndarray  # (n,) frequency_penalty
    generated: np.ndarray  # (n, V) how often each character was generated so far

    @classmethod
    def of(cls, settings: Sequence[SamplingSettings], vocab_size: int, recent: np.ndarray | None = None,
           generated: np.ndarray | None = None) -> Adjustments:
        """The adjustments of rows with these settings and counts (None: nothing produced yet)."""
        n = len(settings)
        bias = np.zeros((n, vocab_size))
        for b, s in enumerate(settings):
            for i, value in s.logit_bias:
                if i < vocab_size:
                    bias[b, i] = value
        zeros = np.zeros((n, vocab_size), np.int64)
        return cls(bias, np.array([s.repetition_penalty if s.repeats else 1.0 for s in settings]),
                   zeros if recent is None else recent, np.array([s.presence_penalty for s in settings]),
                   np.array([s.frequency_penalty for s in settings]), zeros if generated is None else generated)


def adjust(z: np.ndarray, a: Adjustments) -> np.ndarray:
    """Rows of float64 logits z (n, V), adjusted in place (biases, then the repetition penalty, then
    presence and frequency), as the module docstring says."""
    z += a.bias
    r = a.repetition[:, None]
    repeated = (a.recent > 0) & (r != 1.0)
    if repeated.any():
        z[...] = np.where(repeated, np.where(z > 0, z / r, z * r), z)
    z -= a.frequency[:, None] * a.generated + a.presence[:, None] * (a.generated > 0)
    return z


LN2 = math.log(2.0)  # nats per bit


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities in float64 over the last axis (the raw model distribution)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def pick(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray | None, top_p: np.ndarray | None, u: np.ndarray,
         min_p: np.ndarray | None = None, adjustments: Adjustments | None = None, some_greedy: bool = True) -> np.ndarray:
    """The sampler's core, every row at once: (n,) int64 ids for logits (n, V) with per-row
    settings (n,) and draws u (n,) in [0, 1), and the adjustments of rows that have any. A row whose
    temperature is 0 (below GREEDY_BELOW) takes its argmax (lowest id on ties); any other row takes
    the first id whose running sum of weights exceeds u times their total. Every path that samples
    ends here. None for top_k and top_p (both or neither), or for min_p: no row filters so;
    some_greedy False: no row is greedy. (The engine counts its slots' settings and so skips these
    checks; bench/README.md, "The engine's own work at one stream".)"""
    z = np.asarray(logits).astype(np.float64)  # (n, V): the sampler's own copy
    if adjustments is not None:
        adjust(z, adjustments)
    if not some_greedy or temperature.min() >= GREEDY_BELOW:  # the usual batch: every row samples
        ids = None
        w = _weights(z, temperature, top_k, top_p, min_p)
    else:
        ids = z.argmax(axis=1)
        rows = np.flatnonzero(temperature >= GREEDY_BELOW)
        if not len(rows):
            return ids
        w, u = _weights(z[rows], temperature[rows], *_rows_of(rows, top_k, top_p, min_p)), u[rows]
    running = np.add.accumulate(w, axis=1, out=w)  # adds in id order (np.cumsum, with less overhead)
    target = u * running[:, -1]  # u < 1 makes u * total < total in floating point too
    # the first id whose running sum exceeds the target: never a zero weight (the sum did not grow
    # there), and there is one (the total exceeds the target)
    chosen = (running > target[:, None]).argmax(axis=1)
    if ids is None:
        return chosen
    ids[rows] = chosen
    return ids


def mask_out(z: np.ndarray, rows: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted, distinct) of logits z (n, V) with the characters a constraint disallows
    at -inf (blocked: (len(rows), V) bool, at least one False per row), in place: they then weigh 0
    through the adjustments, the temperature and the filters, and the draw falls among the others."""
    if len(rows) == len(z):  # every row
        np.putmask(z, blocked, -np.inf)
    else:
        z[rows] = np.where(blocked, -np.inf, z[rows])
    return z


def _rows_of(rows: np.ndarray, *settings: np.ndarray | None) -> list[np.ndarray | None]:
    return [None if a is None else a[rows] for a in settings]


def _weights(z: np.ndarray, temperature: np.ndarray, top_k: np.ndarray | None, top_p: np.ndarray | None,
             min_p: np.ndarray | None) -> np.ndarray:
    """Rows of float64 logits z (m, V), overwritten with their weights after temperature, min-p,
    top-k and top-p (None: off for every row): proportional to the probabilities each row is
    sampled with, zero where filtered out."""
    # the maximum subtracted before dividing: a tiny temperature (1e-310) then gives 0 / t = 0 and
    # -x / t = -inf, where z / t would overflow to inf - inf = NaN
    z -= z.max(axis=1, keepdims=True)
    z /= temperature[:, None]
    w = np.exp(z, out=z)  # the largest weight of a row is 1, so a weight is its probability / the largest one
    if min_p is not None and min_p.any():
        w[w < min_p[:, None]] = 0.0  # the most likely one (weight 1) always stays
    if top_k is not None and (top_k.any() or (top_p < 1.0).any()):
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


def probabilities(logits: np.ndarray, settings: SamplingSettings, recent: np.ndarray | None = None,
                  generated: np.ndarray | None = None, allowed: np.ndarray | None = None) -> np.ndarray:
    """The distribution one row is sampled from, (V,) float64 by id; one-hot for greedy. `recent`
    and `generated` (V,) are the row's counts for the penalties (None: nothing produced yet);
    `allowed` (V,) bool: the characters a constraint allows (None: all)."""
    z = np.asarray(logits, dtype=np.float64)[None].copy()
    if allowed is not None:
        mask_out(z, np.array([0]), ~np.asarray(allowed, bool)[None])
    if settings.adjusts:
        adjust(z, Adjustments.of([settings], z.shape[1], None if recent is None else recent[None],
                                 None if generated is None else generated[None]))
    if settings.greedy:
        out = np.zeros(z.shape[-1])
        out[int(np.argmax(z[0]))] = 1.0
        return out
    w = _weights(z, np.array([settings.temperature]), np.array([settings.top_k]), np.array([settings.top_p]),
                 np.array([settings.min_p]))[0]
    return w / w.sum()


def next_ids(logits: np.ndarray, settings: Sequence[SamplingSettings], generators: Sequence[np.random.Generator],
             recent: np.ndarray | None = None, generated: np.ndarray | None = None) -> np.ndarray:
    """Pick the next character id of every row of `logits` (B, V); returns (B,) int64.

    Row b uses settings[b] and draws (unless greedy) one number from generators[b]; `recent` and
    `generated` (B, V) are the rows' counts for the penalties (None: nothing produced yet).
    """
    logits = np.asarray(logits)
    B = logits.shape[0]
    if not (len(settings) == len(generators) == B):
        raise ValueError(f"need one setting and one generator per row: {B} rows, {len(settings)} settings, {len(generators)} generators")
    temperature = np.array([s.temperature for s in settings])
    top_k = np.array([s.top_k for s in settings], dtype=np.int64)
    top_p = np.array([s.top_p for s in settings])
    min_p = np.array([s.min_p for s in settings])
    adjustments = Adjustments.of(settings, logits.shape[1], recent, generated) if any(s.adjusts for s in settings) else None
    u = np.array([0.0 if s.greedy else g.random() for s, g in zip(settings, generators)])
    return pick(logits, temperature, top_k, top_p, u, min_p, adjustments)
