"""Samples while training: a few lines of text at two or three temperatures after each evaluation,
with a novelty figure, the share of a sample's 20-character substrings that do not occur in the
training text. A model that starts to memorise its corpus shows it here (novelty falls) before the
validation loss turns.

- `Novelty` indexes the training text once per run: a sorted array of 64-bit hashes of its
  n-grams of ids, kept in a temporary file and looked up with `np.searchsorted`, in memory on the
  first hash of each block of `BLOCK`, then in the one block read from the file. Hashing is
  vectorized over chunks of the text (a memory-mapped corpus is read a chunk at a time). The index
  never holds more than `BUDGET` bytes, whatever the corpus: a text of up to `BUDGET // 8`
  characters is indexed whole and its novelty is exact; a longer one is indexed in evenly spaced
  pieces totalling that many characters, and it says so (`whole`, `indexed_chars`, `describe()`):
  an n-gram outside the pieces then counts as novel, so the figure is novelty against that sample
  of the text, an upper bound of the true one. Training holds only 1 / `BLOCK` of the index in
  memory (the whole of it while building), so samples add little to a run's peak.
- `samples` runs the network being trained as the engine does (its ONNX graph, built from the
  Keras weights, on ONNX Runtime, one character at a time with the state carried) and picks with
  model/runtime/sampling.py, so a row at temperature t with seed s is what `chargen sample --temperature t
  --seed s` prints for an empty prompt. It uses one ONNX Runtime thread: training has the others.
- `format_samples` turns the rows into the run's log lines.

Hash collisions: two different n-grams share a hash with probability about 2^-64 (each id is mixed
by splitmix64 before a polynomial hash mod 2^64), so a sample's n-gram is counted as seen when it
was not with probability about (indexed n-grams) / 2^64, under 1e-12 within the budget.
"""

from __future__ import annotations

import math
import tempfile
import time
import weakref
from typing import TYPE_CHECKING, Sequence

import numpy as np

from model.runtime.onnx_step import OrtStep
from model.runtime.sampling import SamplingSettings, next_ids
from model.records.vocab import Vocab

if TYPE_CHECKING:
    import keras

N_GRAM = 20  # characters per substring compared with the training text
BUDGET = 64 << 20  # bytes of the index at most, 8 per n-gram: a text of up to 8 Mi characters is indexed whole
BLOCK = 512  # hashes read from the index's file per lookup (4 KiB); memory keeps the first of each block
PIECE = 1 << 18  # characters per piece when only part of a longer text fits: 32 pieces within the budget
CHUNK = 1 << 20  # characters hashed at a time: a build's scratch is about 24 bytes per character of a chunk
TEMPERATURES = (0.5, 0.8, 1.0)
LENGTH = 200  # characters per sample (chargen sample's default)
SEED = 0  # the same draws at every evaluation: the samples differ only by what the model learned

U64 = np.uint64
MULTIPLIER = U64(0x9E3779B97F4A7C15)  # odd, so multiplying by it mod 2^64 loses nothing
HASH_BYTES = np.dtype(U64).itemsize  # the index's bytes per n-gram


# ---------------------------------------------------------------- hashing n-grams


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer of each id (uint64, in place): unrelated 64-bit values for nearby ids."""
    x += U64(0x632BE59BD9B4E019)  # so id 0 does not map to 0
    x ^= x >> U64(30)
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x


def _hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """The hash of each n-gram of `ids` (T,), (T - n + 1,) uint64: sum_j mix(ids[i + j]) *
    MULTIPLIER^(n - 1 - j) mod 2^64, by Horner's rule over whole arrays (n passes, no loop per
    character)."""
    mixed = _mix(np.asarray(ids).astype(U64))
    m = len(mixed) - n + 1
    h = mixed[:m].copy()
    for j in range(1, n):
        h *= MULTIPLIER
        h += mixed[j : j + m]
    return h


def _pieces(length: int, cap: int, piece: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of the text to index: all of it up to `cap` characters, else
    cap // piece pieces of `piece` characters (one of `cap` if piece > cap), evenly spaced from the
    start to the end, never overlapping."""
    if length <= cap:
        return [(0, length)]
    size = min(piece, cap)
    k = cap // size
    if k == 1:
        return [(0, size)]
    return [(i * (length - size) // (k - 1), i * (length - size) // (k - 1) + size) for i in range(k)]


class Novelty:
    """The n-grams of a training text, to tell how much of a sample is new. Built once per run.

    The index: 8 bytes per indexed n-gram (one per indexed character, less n - 1 per piece), at
    most `budget` bytes however long the text, in an unnamed temporary file (tempfile's directory)
    closed with the object. Memory: 8 bytes per `block` n-grams once built; while building, the
    whole index plus a chunk's scratch. `train_ids` may be a read-only memory map; it is read
    `chunk` characters at a time (chunks overlap by n - 1), only the pieces when the whole does not
    fit. A page of the map read stays resident until the caller gives it back.
    """

    def __init__(self, train_ids: np.ndarray, *, n: int = N_GRAM, budget: int = BUDGET, block: int = BLOCK,
                 piece: int = PIECE, chunk: int = CHUNK):
        if n < 1 or budget < HASH_BYTES or block < 1 or piece < 1 or chunk < 1:
            raise ValueError(f"n, block, piece and chunk must be positive and the budget at least 8 bytes, got n={n}, "
                             f"budget={budget}, block={block}, piece={piece}, chunk={chunk}")
        started = time.perf_counter()
        self.n = n
        self.budget = budget
        self.training_chars = len(train_ids)
        cap = budget // HASH_BYTES  # characters: that many have at most that many n-grams, so they fit
        self.ranges = ranges = _pieces(self.training_chars, cap, piece)  # [start, stop) of each piece indexed
        self.indexed_chars = sum(stop - start for start, stop in ranges)
        self.whole = self.indexed_chars == self.training_chars
        hashes = np.empty(sum(max(0, stop - start - n + 1) for start, stop in ranges), U64)
        filled = 0
        for start, stop in ranges:
            for first in range(start, stop - n + 1, chunk):  # n-grams starting at first..last-1
                last = min(first + chunk, stop - n + 1)
                hashes[filled : filled + last - first] = _hashes(train_ids[first : last + n - 1], n)
                filled += last - first
        hashes.sort()  # in place; duplicates stay (searching finds them all the same; removing them would need a copy)
        self.count = len(hashes)  # n-grams indexed
        self.block = block
        self.fences = hashes[::block].copy()  # the first hash of each block: (ceil(count / block),)
        self._file = tempfile.TemporaryFile(prefix="chargen-novelty-")  # unnamed: nothing is left behind
        weakref.finalize(self, self._file.close)
        hashes.tofile(self._file)
        self._file.flush()
        self.build_seconds = time.perf_counter() - started

    @property
    def nbytes(self) -> int:
        """The index's size (in its file)."""
        return self.count * HASH_BYTES

    @property
    def resident_bytes(self) -> int:
        """What the index keeps in memory."""
        return self.fences.nbytes

    def _read(self, first: int, count: int) -> np.ndarray:
        """`count` hashes of the index from the `first`th (fewer at its end)."""
        self._file.seek(first * HASH_BYTES)
        return np.frombuffer(self._file.read(count * HASH_BYTES), U64)

    def sorted_hashes(self) -> np.ndarray:
        """The whole index, read from its file: to inspect it (a run never needs it)."""
        return self._read(0, self.count)

    def describe(self) -> str:
        """What the figure is measured against, for the run's log."""
        what = f"novelty: the share of a sample's {self.n}-character substrings not in the training text"
        size = f"an index of {self.nbytes / 2**20:.1f} MiB on disk, at most {self.budget / 2**20:g} MiB"
        if self.whole:
            return f"{what} (all {self.training_chars:,} characters; {size})"
        where = "the first" if len(self.ranges) == 1 else f"{len(self.ranges)} evenly spaced pieces,"
        return (f"{what}, measured against {self.count:,} of its {max(0, self.training_chars - self.n + 1):,} "
                f"{self.n}-grams ({where} {self.indexed_chars:,} of its {self.training_chars:,} characters; {size}): "
                f"an upper bound")

    def novelty(self, ids: np.ndarray | Sequence[int]) -> float | None:
        """The share of the n-grams of `ids` (a sample's character ids) not in the index; None for
        a sample shorter than n."""
        ids = np.asarray(ids)
        if len(ids) < self.n:
            return None
        h = _hashes(ids, self.n)
        # A hash in the index is in the last block whose first hash is at most it (if a later block
        # starts with the same hash, that block holds it too); -1: below every hash indexed.
        blocks = np.searchsorted(self.fences, h, side="right") - 1
        seen = np.zeros(len(h), bool)
        for b in np.unique(blocks[blocks >= 0]):
            rows = self._read(int(b) * self.block, self.block)  # sorted
            mine = blocks == b
            at = np.minimum(np.searchsorted(rows, h[mine]), len(rows) - 1)
            seen[mine] = rows[at] == h[mine]
        return float(np.count_nonzero(~seen)) / len(h)


# ---------------------------------------------------------------- sampling


def samples(model: keras.Model, vocab: Vocab, *, temperatures: Sequence[float] = TEMPERATURES, length: int = LENGTH,
            seed: int = SEED, prime: str | None = None, novelty: Novelty | None = None) -> list[dict]:
    """`length` characters from the network `model` (model.training.network.build_model's) at each
    temperature, each from the zero state after `prime` (None: a newline, or the first vocabulary
    character when there is none, as `chargen sample` starts for an empty prompt). Row i has its own
    generator seeded with `seed + i`: the same draws at every evaluation, so a row changes only with
    what the model learned, and other draws for each temperature (with one seed for all, the rows
    agree wherever the prediction is confident, and an untrained network's rows are one text).
    Rows {"temperature", "text", "novelty"} (novelty None without a Novelty, or for a sample
    shorter than its n); the prime is not part of the text."""
    from model.training.onnx_graph import build_graph  # here, for speed: `chargen train` checks its corpus before onnx loads

    settings = [SamplingSettings(temperature=float(t)) for t in temperatures]
    if not settings or length < 0:
        raise ValueError(f"need at least one temperature and length >= 0, got {len(settings)} and {length}")
    if prime is None:
        prime_ids = np.array([vocab.index.get("\n", 0)], np.int64)
    else:
        prime_ids = vocab.encode(prime).ids.astype(np.int64)
        if not len(prime_ids):
            raise ValueError(f"prime {prime!r} has no character of the vocabulary")
    step = OrtStep(build_graph(model).SerializeToString(), max_batch=len(settings), threads=1)
    if step.vocab_size != len(vocab):
        raise ValueError(f"the network predicts {step.vocab_size} characters but the vocabulary has {len(vocab)}")
    k = len(settings)
    state = step.prompt(prime_ids)
    for slot in range(k):
        step.restore(slot, state)
    generators = [np.random.default_rng(seed + i) for i in range(len(settings))]
    out = np.zeros((k, length), np.int64)
    for i in range(length):
        out[:, i] = next_ids(step.logits[:k], settings, generators)  # (k,)
        if i + 1 < length:
            step.advance(k, out[:, i])
    return [{"temperature": s.temperature, "text": vocab.decode(row),
             "novelty": None if novelty is None else novelty.novelty(row)} for s, row in zip(settings, out)]


# How a sample's characters that would act on a terminal rather than show are written in the log: a
# newline as ⏎, the other C0 controls (ESC's colour and title sequences, the bell) and DEL as their
# Unicode control pictures (␛, ␇, ␡), C1 controls and the bidirectional overrides as \u escapes.
_SHOWN = {10: "⏎", 127: "␡", **{c: chr(0x2400 + c) for c in range(32) if c not in (9, 10)},
          **{c: f"\\u{c:04x}" for c in [*range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}}


def format_samples(rows: Sequence[dict], width: int | None = 160) -> str:
    """The run's log lines for `samples`' rows: one per temperature, newlines shown as ⏎ and the
    characters that would act on a terminal as pictures or escapes (_SHOWN), cut to
    `width` characters of text (None: all of it). The percentage is rounded down: 100% only when no
    n-gram was seen."""
    lines = []
    for row in rows:
        score = "novelty  n/a" if row.get("novelty") is None else f"novelty {math.floor(100 * row['novelty']):3d}%"
        text = row["text"].translate(_SHOWN)
        if width is not None and len(text) > width:
            text = text[: width - 1] + "…"
        lines.append(f"  T={row['temperature']:g} {score}: {text}")
    return "\n".join(lines)
