"""Fast incremental generation for one stream or many stepped together (continuous batching).

The Keras network is copied once into float32 arrays and run by compiled kernels (`model.kernels`):
each stream keeps its recurrent state in a batch slot and every character costs one step of the
recurrence, never a re-run over a window. Streams join (`start`) and leave (finish, `cancel`)
between steps; every `step` advances the given streams together with one matrix product per layer.

How a step is arranged (the matrix products are the real work; the rest is kept off their way):
  - The first layer's input projection embedding @ kernel + bias is a (gates, V) lookup table.
  - State is feature-major, one column per slot, so a block of streams times a weight matrix is a
    single BLAS call in its fastest orientation, and the gate arithmetic is one fused, vectorized
    pass over contiguous columns (see model/kernels.py).
  - A prompt is one kernel call that runs the same step through its positions (no Python per
    character; a 200-character prompt takes about 17 ms here).
  - The rows are cut into one block per core. One kernel call, which holds no GIL, samples a
    block's next characters (model.sampling's compiled core, in float64) and steps it through the
    network; the last block runs on the calling thread, the others on helper threads. Blocks start
    at multiples of 8 rows, where OpenBLAS's kernels run best. The calling thread turns the picks
    into text while the helpers finish, and waits for them on flags their kernels set.
  - BLAS runs single-threaded inside the engine: multi-threaded BLAS is faster on an idle machine
    but its spin-waiting threads collapse when anything else wants the cores (a step 10-20x slower
    beside a training run).
  - Each slot takes its stream's uniform draws 64 at a time (the same numbers, in the same order,
    as one generator.random() per pick), so a step makes no Python call per stream to sample.

Float32 products of a batch and of a single row round differently (BLAS picks different kernels), so
a stream's log-probabilities can differ by ~1e-6 depending on its batch; the sampler works in
float64 so that this flips a pick only when a draw lands within ~1e-6 of a boundary. Same seed and
same batch composition: same text, always.

The first engine of a process compiles the kernels (about 10 s), or loads them from numba's cache
(`model/__pycache__`, or $NUMBA_CACHE_DIR) in well under a second.

The engine is not thread-safe: exactly one thread calls it.
"""

from __future__ import annotations

import operator
import os
import secrets
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import keras
import numpy as np
from threadpoolctl import ThreadpoolController

from model import kernels
from model.artifact import Artifact
from model.network import config_of
from model.sampling import SamplingSettings, log_softmax
from model.vocab import Vocab

F32 = np.float32
_NONE_F, _NONE_I = np.zeros(0), np.zeros(0, np.int64)  # sampling arrays of a step that does not sample
DRAWS_AHEAD = 64  # uniform draws taken from a stream's generator at a time
HELPER_SPINS = 20_000  # looks (each a sched_yield, ~1 us) for the helpers' blocks before sleeping on them

# ---------------------------------------------------------------- requests, streams, deltas


@dataclass
class GenerationRequest:
    prompt: str
    max_chars: int = 200
    sampling: SamplingSettings = SamplingSettings()
    seed: int | None = None  # None: the engine draws one; the one used is Stream.seed
    stop: tuple[str, ...] = ()  # ends *before* the first occurrence; the stop text is not emitted
    logprobs: int = 0  # 0: none; k > 0: per emitted char its logprob and the top-k alternatives

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not _whole(self.max_chars) or self.max_chars < 1:
            raise ValueError(f"max_chars must be a whole number >= 1, got {self.max_chars!r}")
        if not isinstance(self.sampling, SamplingSettings):
            raise ValueError(f"sampling must be a SamplingSettings, got {type(self.sampling).__name__}")
        if self.seed is not None and (not _whole(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if isinstance(self.stop, str):
            raise ValueError("stop must be a list of strings, not a single string")
        self.stop = tuple(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop sequences must be non-empty strings, got {s!r}")
        if not _whole(self.logprobs) or self.logprobs < 0:
            raise ValueError(f"logprobs must be a whole number >= 0, got {self.logprobs!r}")


_slot_of = operator.attrgetter("_slot")


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class CharLogprob:
    char: str
    logprob: float  # natural log of the probability the model gave it (raw model distribution)
    top: list[tuple[str, float]]  # the k most likely characters and their logprobs (raw model distribution)


class Stream:
    """One generation in progress."""

    def __init__(self, engine: "Engine", request: GenerationRequest, seed: int, prompt_chars: int, dropped_chars: int):
        self.request = request
        self.seed = seed
        self.prompt_chars = prompt_chars  # prompt characters actually fed
        self.dropped_chars = dropped_chars  # prompt characters outside the vocabulary that were dropped
        self.finish_reason: str | None = None  # "length" | "stop" | "cancelled" once finished
        self.generated = 0  # characters sampled so far (emitted, held back, or part of a stop sequence)
        self._engine = engine
        self._slot = -1
        self._rng = np.random.default_rng(seed)
        self._emitted: list[str] = []
        self._held = ""  # generated characters that may begin a stop sequence
        self._held_logprobs: list[CharLogprob] = []
        self._stop_prefixes = {s[:k] for s in request.stop for k in range(1, len(s))}
        self._longest_prefix = max((len(s) for s in request.stop), default=1) - 1

    @property
    def text(self) -> str:
        """Text emitted so far (never contains a stop sequence)."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    def __repr__(self) -> str:
        return f"<Stream seed={self.seed} generated={self.generated} finish_reason={self.finish_reason}>"


@dataclass(slots=True)
class Delta:
    stream: Stream
    text: str  # newly emitted characters ("" while a possible stop sequence is held back)
    logprobs: list[CharLogprob] = field(default_factory=list)  # one per character of text
    finish_reason: str | None = None  # set on the step that finishes the stream


class EngineFull(RuntimeError):
    """Every batch slot is taken; try again when a stream finishes."""


# ---------------------------------------------------------------- the engine


class Engine:
    def __init__(self, artifact: Artifact, max_batch: int = 128, threads: int | None = None):
        """`threads`: most threads one step uses (default: one per core)."""
        if not _whole(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        if threads is not None and (not _whole(threads) or threads < 1):
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
        self.vocab: Vocab = artifact.vocab
        self.max_batch = int(max_batch)
        self.network = Network(artifact.model, self.max_batch, threads)
        self._blas = _SingleThreadedBlas()
        if self.network.vocab_size != len(self.vocab):
            raise ValueError(f"the network predicts {self.network.vocab_size} characters but the vocabulary has {len(self.vocab)}")
        self._slots: list[Stream] = []  # slot i holds _slots[i]; active streams always fill 0..active-1
        self._slot_range = list(range(self.max_batch))
        # set by each block's kernel call: its characters are picked; its state and logits are written
        self._picked = np.zeros(self.network.threads, np.int64)
        self._done = np.zeros(self.network.threads, np.int64)
        # Each slot's sampling settings and a block of uniform draws taken ahead from its stream's
        # generator (the same numbers, in the same order, as one generator.random() per pick).
        self._temperature = np.zeros(self.max_batch)
        self._top_k = np.zeros(self.max_batch, np.int64)
        self._top_p = np.ones(self.max_batch)
        self._draws = np.zeros((self.max_batch, DRAWS_AHEAD))
        self._next_draw = np.zeros(self.max_batch, np.int64)
        self._logprobs = np.zeros(self.max_batch, np.int64)  # the logprobs each slot's request asks for
        # An empty prompt starts from the zero state as if after a newline (after the first
        # vocabulary character when the vocabulary has no newline).
        self._empty_prompt = np.array([self.vocab.index.get("\n", 0)], dtype=np.int64)
        self._compile()

    def _compile(self) -> None:
        """Compile (or load from numba's cache) every kernel a request will use, now rather than on
        the first request: run slot 0 through a prompt and a sampled step, then clear it."""
        sampling = (np.ones(1), np.zeros(1, np.int64), np.ones(1), np.zeros(1))
        with self._blas:
            self.network.consume(0, self._empty_prompt)
            self.network.advance(slice(0, 1), np.empty(1, np.int64), sampling)
        self.network.reset()

    @property
    def active(self) -> int:
        return len(self._slots)

    def start(self, request: GenerationRequest) -> Stream:
        """Consume the prompt in one pass and take a batch slot."""
        if not isinstance(request, GenerationRequest):
            raise ValueError(f"expected a GenerationRequest, got {type(request).__name__}")
        if request.logprobs > len(self.vocab):
            raise ValueError(f"logprobs must be at most {len(self.vocab)} (the vocabulary size), got {request.logprobs}")
        if self.active >= self.max_batch:
            raise EngineFull(f"all {self.max_batch} generation slots are busy")
        encoded = self.vocab.encode(request.prompt)
        ids = encoded.ids if len(encoded.ids) else self._empty_prompt
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        stream = Stream(self, request, int(seed), len(encoded.ids), encoded.dropped)
        stream._slot = slot = len(self._slots)
        self._slots.append(stream)
        settings = request.sampling
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = settings.temperature, settings.top_k, settings.top_p
        self._next_draw[slot] = DRAWS_AHEAD  # none drawn yet
        self._logprobs[slot] = request.logprobs
        try:
            with self._blas:
                self.network.consume(stream._slot, ids)
        except BaseException:
            self._release(stream)
            raise
        return stream

    def step(self, streams: list[Stream]) -> list[Delta]:
        """Advance every given unfinished stream by one character in one batched step."""
        for s in streams:
            if s.__class__ is not Stream or s._engine is not self:
                raise ValueError("step() was given a stream this engine did not start")
        batch = [s for s in streams if s.finish_reason is None]
        if len(set(map(id, batch))) != len(batch):
            raise ValueError("step() was given the same stream twice")
        if not batch:
            return []
        ordered = self._to_front(batch)  # ordered[i] holds slot i
        deltas: list[Delta] = []
        jobs = []
        with self._blas:
            try:
                self._step_blocks(ordered, deltas, jobs)
            finally:
                wait(jobs)  # never leave a helper thread writing into the state
            for job in jobs:
                job.result()  # raise what failed there
        for d in deltas:
            if d.finish_reason is not None:
                self._release(d.stream)
        if batch != ordered:
            by_stream = {id(d.stream): d for d in deltas}
            deltas = [by_stream[id(s)] for s in batch]
        return deltas

    def _step_blocks(self, ordered: list[Stream], deltas: list[Delta], jobs: list) -> None:
        """Sample and step every block of rows (a helper thread's blocks first, the calling thread's
        last), then turn the picks into text while the helpers finish."""
        n = len(ordered)
        ids = np.empty(n, np.int64)
        u = self._uniforms(ordered)
        wanted = np.flatnonzero(self._logprobs[:n])
        saved = self.network.logits[wanted]  # a copy: logprobs read the logits, which the step overwrites
        blocks = self.network.blocks(n)
        picked, done = self._picked[: len(blocks)], self._done[: len(blocks)]
        picked[:], done[:] = 0, 0
        for k, rows in enumerate(blocks):
            sampling = (self._temperature[rows], self._top_k[rows], self._top_p[rows], u[rows])
            flags = (picked[k : k + 1], done[k : k + 1])
            if k < len(blocks) - 1:
                jobs.append(_workers().submit(self.network.advance, rows, ids[rows], sampling, flags))
            else:
                self.network.advance(rows, ids[rows], sampling, flags)
        self._await(picked, jobs)  # long since: a helper picks before its step
        picked = ids.tolist()
        lps = {b: self._logprob(row, picked[b], self._logprobs[b]) for b, row in zip(wanted.tolist(), saved)}
        chars = self.vocab.chars
        for b, (s, i) in enumerate(zip(ordered, picked)):
            request = s.request
            if request.stop or request.logprobs:
                deltas.append(self._emit(s, chars[i], lps.get(b)))
            else:  # the common case, inline: the character is the text
                s.generated += 1
                s._emitted.append(chars[i])
                if s.generated >= request.max_chars:
                    s.finish_reason = "length"
                deltas.append(Delta(s, chars[i], [], s.finish_reason))
        self._await(done, jobs)
        jobs.clear()  # the helpers' work is all written; their threads finish on their own

    @staticmethod
    def _await(flags: np.ndarray, jobs: list) -> None:
        """Until every flag is 1: spin (yielding the core) on the flags the kernels set, which takes
        microseconds where waking a sleeping thread takes 30-100 here; if that takes too long, wait
        on the helper threads themselves (and raise what failed there)."""
        if not kernels.wait_done(flags, HELPER_SPINS):
            wait(jobs)
            for job in jobs:
                job.result()

    def _uniforms(self, ordered: list[Stream]) -> np.ndarray:
        """The next draw of every sampling (non-greedy) stream in slots 0..n-1."""
        n = len(ordered)
        sampling = self._temperature[:n] > 0
        taken = self._next_draw[:n]
        for b in np.flatnonzero(sampling & (taken == DRAWS_AHEAD)).tolist():
            self._draws[b] = ordered[b]._rng.random(DRAWS_AHEAD)
            taken[b] = 0
        u = self._draws[np.arange(n), np.minimum(taken, DRAWS_AHEAD - 1)]
        taken += sampling
        return u

    def cancel(self, stream: Stream) -> None:
        """finish_reason = "cancelled"; frees the slot at once (held-back text is discarded)."""
        if stream._engine is not self:
            raise ValueError("cancel() was given a stream this engine did not start")
        if stream.finish_reason is None:
            stream.finish_reason = "cancelled"
            self._release(stream)

    def generate(self, request: GenerationRequest) -> Stream:
        """Run one stream to completion."""
        stream = self.start(request)
        try:
            while stream.finish_reason is None:
                self.step([stream])
        finally:
            if stream.finish_reason is None:
                self.cancel(stream)
        return stream

    # ------------------------------------------------------------ text, stops, logprobs

    def _emit(self, s: Stream, char: str, lp: CharLogprob | None) -> Delta:
        s.generated += 1
        request = s.request
        finish = "length" if s.generated >= request.max_chars else None
        if not request.stop:
            text, lps = char, [lp] if lp else []
        else:
            held, lps = s._held + char, s._held_logprobs + ([lp] if lp else [])
            # Any stop sequence completed now ends at this character and starts inside `held`
            # (held is the longest suffix that could begin one); the earliest start is the longest.
            hit = max((len(stop) for stop in request.stop if held.endswith(stop)), default=0)
            if hit:
                keep, finish = 0, "stop"
                held = held[:-hit]
                text, lps = held, lps[: len(held)] if lp else []
            else:
                keep = 0 if finish else self._held_length(s, held)
                cut = len(held) - keep
                text, s._held = held[:cut], held[cut:]
                lps, s._held_logprobs = (lps[:cut], lps[cut:]) if lp else ([], [])
            if keep == 0:
                s._held, s._held_logprobs = "", []
        if text:
            s._emitted.append(text)
        s.finish_reason = finish
        return Delta(s, text, lps, finish)

    @staticmethod
    def _held_length(s: Stream, text: str) -> int:
        for k in range(min(len(text), s._longest_prefix), 0, -1):
            if text[-k:] in s._stop_prefixes:
                return k
        return 0

    def _logprob(self, logits: np.ndarray, chosen: int, k: int) -> CharLogprob:
        logp = log_softmax(logits)
        top = np.argsort(-logp, kind="stable")[:k]
        chars = self.vocab.chars
        return CharLogprob(chars[chosen], float(logp[chosen]), [(chars[i], float(logp[i])) for i in top])

    # ------------------------------------------------------------ slots

    def _to_front(self, batch: list[Stream]) -> list[Stream]:
        """Move the batch's streams into slots 0..n-1 (keeping their order) so a step works on
        contiguous rows; usually they are there already."""
        ordered = sorted(batch, key=_slot_of)
        if [s._slot for s in ordered] == self._slot_range[: len(ordered)]:
            return ordered
        for i, s in enumerate(ordered):
            j = s._slot
            if j != i:  # j > i always; slot i holds a stream outside the batch
                other = self._slots[i]
                self.network.swap(i, j)
                for a in self._per_slot():
                    a[[i, j]] = a[[j, i]]
                self._slots[i], self._slots[j] = s, other
                s._slot, other._slot = i, j
        return ordered

    def _per_slot(self) -> list[np.ndarray]:
        return [self._temperature, self._top_k, self._top_p, self._draws, self._next_draw, self._logprobs]

    def _release(self, s: Stream) -> None:
        slot, last = s._slot, len(self._slots) - 1
        if slot != last:
            moved = self._slots[last]
            self.network.copy(last, slot)
            for a in self._per_slot():
                a[slot] = a[last]
            self._slots[slot] = moved
            moved._slot = slot
        self._slots.pop()
        s._slot = -1


# ---------------------------------------------------------------- the network in numpy

MIN_ROWS_PER_THREAD = 8  # below this a hand-off to a helper thread (~50 us here) costs more than it saves


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_pool: tuple[int, ThreadPoolExecutor] | None = None


def _workers() -> ThreadPoolExecutor:
    """Helper threads shared by all engines of the process (the calling thread works on the first
    block of rows itself). Made again after a fork: a forked child (a gunicorn worker) has none of
    its parent's threads."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max(1, _cores() - 1), thread_name_prefix="chargen-engine"))
    return _pool[1]


class _SingleThreadedBlas:
    """Inside `with`, numpy's BLAS runs on one thread. The engine's products are small, and BLAS
    threads that spin-wait for each other collapse when other work shares the cores (measured: a
    (128, 512) x (512, 1024) product 10x slower beside a training run); the engine splits a batch
    over threads itself instead."""

    def __init__(self):
        self._libs = ThreadpoolController().select(user_api="blas").lib_controllers
        self._saved: list[int] = []

    def __enter__(self):
        self._saved = [lib.get_num_threads() for lib in self._libs]
        for lib in self._libs:
            lib.set_num_threads(1)

    def __exit__(self, *exc):
        for lib, n in zip(self._libs, self._saved):
            lib.set_num_threads(n)


class Network:
    """The artifact's network as one float32 blob of weights plus per-slot state buffers, stepped by
    the compiled kernels in `model.kernels` (see there for the layout: one column per batch slot).

    Every operation of a step works column by column, so a batch is cut into blocks of columns that
    run on separate threads: a kernel call holds no GIL from its start to its end.
    """

    def __init__(self, model: keras.Model, max_batch: int, threads: int | None = None):
        config = config_of(model)
        self.cell, self.units, self.depth = config.cell, config.units, config.layers
        self.code = kernels.CELL_CODES[self.cell]
        embedding = _numpy(model.get_layer("embedding").embeddings).astype(np.float64)  # (V, E)
        dense = model.get_layer("logits")
        self.vocab_size = V = embedding.shape[0]
        H, L, B = self.units, self.depth, max_batch
        self.gates = G = kernels.gates_of(self.code) * H
        pieces: list[np.ndarray] = []
        offsets: list[int] = []
        size = 0

        def put(array) -> int:
            nonlocal size
            at, flat = size, np.ascontiguousarray(array, dtype=F32).ravel()
            pieces.append(flat)
            size += flat.size
            return at

        table = None
        for i in range(L):
            layer = model.get_layer(f"rnn_{i + 1}")
            _check_layer(layer, self.cell)
            kernel, recurrent, bias = (_numpy(v).astype(np.float64) for v in (layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias))
            candidate_bias = np.zeros(H)
            if self.cell == "gru":  # bias (2, 3H) = [input; recurrent]: the z and r parts always add up
                candidate_bias = bias[1, 2 * H :]
                bias = bias[0] + np.r_[bias[1, : 2 * H], np.zeros(H)]
            if i == 0:  # the input projection of every character, once: (V, G)
                table = embedding @ kernel + bias
                weights = recurrent.T  # (G, H)
            else:
                weights = np.concatenate([kernel, recurrent]).T  # (G, 2H)
            offsets += [put(weights), put(bias), put(candidate_bias)]
        offsets += [put(table.T), put(_numpy(dense.kernel).T), put(_numpy(dense.bias))]  # (G, V), (V, H), (V,)
        self.blob = np.concatenate(pieces)
        self.offsets = np.array(offsets, np.int64)
        self.max_batch = B
        self.S = np.zeros((L * H, B), F32)  # [h_1; ...; h_L], one column per slot
        self.C = np.zeros((L * H, B), F32) if self.cell == "lstm" else np.zeros((1, 1), F32)
        self.Z = np.zeros((G, B), F32)
        self.R = np.zeros((G, B), F32) if self.cell == "gru" else np.zeros((1, 1), F32)
        self.logits_T = np.zeros((V, B), F32)
        self.threads = min(threads or _cores(), _cores())

    @property
    def logits(self) -> np.ndarray:
        """(max_batch, V): each slot's prediction for its next character (a view)."""
        return self.logits_T.T

    def _args(self):
        return (self.blob, self.offsets, self.S.ravel(), self.C.ravel(), self.Z.ravel(), self.R.ravel(), self.logits_T.ravel())

    def consume(self, slot: int, ids: np.ndarray) -> None:
        """Reset `slot` to the zero state and run it through the prompt `ids` (T,), leaving the
        prediction for the character after the prompt in logits[slot]."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        kernels.consume(self.code, self.depth, self.units, self.vocab_size, self.max_batch, slot, ids, *self._args())

    def blocks(self, n: int) -> list[slice]:
        """Rows 0..n-1 cut into one block per thread, of at least MIN_ROWS_PER_THREAD rows and
        starting at multiples of 8 (OpenBLAS takes 10% longer per row on a block of 60 than of 64).
        The helpers' blocks come first and take any extra 8 rows; the last block, the calling
        thread's, takes the n % 8 rows left over."""
        k = min(self.threads, n // MIN_ROWS_PER_THREAD) or 1
        units, extra = divmod(n // 8, k)  # whole groups of 8 rows per block, and those left over
        bounds = [0]
        for i in range(k - 1):
            bounds.append(bounds[-1] + 8 * (units + (i < extra)))
        return [slice(a, b) for a, b in zip(bounds, bounds[1:] + [n])]

    def advance(self, rows: slice, ids: np.ndarray, sampling: tuple | None = None, flags: tuple | None = None) -> None:
        """Feed character ids[b] to slot rows.start + b; logits[rows] become the next predictions.
        With `sampling` (temperature, top_k, top_p, u: one per row, as model.sampling.pick takes
        them), ids is an output: the characters are first picked from logits[rows]. `flags`
        (picked, done): int64 (1,) arrays the kernel sets to 1 as it gets there."""
        sample = sampling is not None
        temperature, top_k, top_p, u = sampling if sample else (_NONE_F, _NONE_I, _NONE_F, _NONE_F)
        picked, done = flags if flags is not None else (np.zeros(1, np.int64), np.zeros(1, np.int64))
        kernels.advance(self.code, self.depth, self.units, self.vocab_size, self.max_batch, rows.start, ids, *self._args(),
                        sample, temperature, top_k, top_p, u, picked, done)

    def _per_slot(self) -> list[np.ndarray]:
        return [self.S, self.logits_T] + ([self.C] if self.cell == "lstm" else [])

    def reset(self) -> None:
        for a in self._per_slot() + [self.Z, self.R]:
            a[:] = 0

    def swap(self, i: int, j: int) -> None:
        for a in self._per_slot():
            a[:, [i, j]] = a[:, [j, i]]

    def copy(self, src: int, dst: int) -> None:
        for a in self._per_slot():
            a[:, dst] = a[:, src]

    def flops_per_char(self) -> int:
        """2 x the multiply-adds of the matrix products in one step (the first layer's input
        projection is a table lookup and is not counted, nor is element-wise work)."""
        H, V, L = self.units, self.vocab_size, self.depth
        return 2 * (self.gates * H * (1 + 2 * (L - 1)) + H * V)

    def bytes_per_slot(self) -> int:
        """State and scratch buffers preallocated for each batch slot."""
        scratch = [self.Z] + ([self.R] if self.cell == "gru" else [])
        return sum(a[:, 0].nbytes for a in self._per_slot() + scratch)


def _numpy(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _check_layer(layer, cell: str) -> None:
    want = {"activation": "tanh", "recurrent_activation": "sigmoid"}
    for name, expected in want.items():
        fn = getattr(layer.cell, name, None)
        if fn is not None and keras.activations.serialize(fn) != expected:
            raise ValueError(f"{layer.name}: the engine supports {name}={expected} only")
    if not layer.cell.use_bias:
        raise ValueError(f"{layer.name}: the engine supports use_bias=True only")
    if layer.go_backwards:
        raise ValueError(f"{layer.name}: the engine does not support go_backwards")
    if cell == "gru" and not layer.cell.reset_after:
        raise ValueError(f"{layer.name}: the engine supports GRU with reset_after=True only")
