"""Fast incremental generation for one stream or many stepped together (continuous batching).

The Keras network is copied once into numpy float32 arrays and run by hand: each stream keeps its
recurrent state in a batch slot and every character costs one step of the recurrence, never a
re-run over a window. Streams join (`start`) and leave (finish, `cancel`) between steps; every
`step` advances the given streams together with one matrix product per layer.

How the arithmetic is arranged (the matrix products are the real work; everything else is kept to
a few passes over preallocated buffers with `out=`, no temporaries):
  - The first layer's input projection embedding @ kernel + bias is a (V, gates) lookup table.
  - Gate columns are reordered and scaled by -1 (sigmoid gates) or -2 (tanh gates) when the weights
    are copied. Scaling by a power of two is exact, and then every gate is 1 / (1 + exp(z)):
    sigmoid(x) = 1 / (1 + exp(-x)) and tanh(x) = 2 / (1 + exp(-2x)) - 1. numpy's float32 exp is
    vectorized where its tanh is not, and one call covers all gates of a layer.
  - States of all layers sit side by side in one row per slot, [h_1 | h_2 | ... | h_L], so layer l
    reads its input and its own previous state as one contiguous [h_{l-1}, h_l] block and does one
    product with the stacked [kernel; recurrent_kernel] (LSTM and SimpleRNN; the GRU's reset gate
    acts between the two products, so it keeps them apart).
  - A prompt is consumed layer by layer: the input projections of all its positions are one matrix
    product per layer, then only the recurrence itself steps through the positions.
  - BLAS runs single-threaded inside the engine: multi-threaded BLAS is faster on an idle machine
    but its spin-waiting threads collapse when anything else wants the cores (a step 10-20x slower
    beside a training run). Batches of 48 streams or more are instead cut into one block of rows
    per core; a block's network step runs on a helper thread while the next block is sampled
    (numpy releases the GIL in its loops and BLAS calls).

Float32 products of a batch and of a single row round differently (BLAS picks different kernels), so
a stream's log-probabilities can differ by ~1e-6 depending on its batch; the sampler works in
float64 so that this flips a pick only when a draw lands within ~1e-6 of a boundary. Same seed and
same batch composition: same text, always.

The engine is not thread-safe: exactly one thread calls it.
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import keras
import numpy as np
from threadpoolctl import ThreadpoolController

from model.artifact import Artifact
from model.network import config_of
from model.sampling import SamplingSettings, log_softmax, next_ids
from model.vocab import Vocab

F32 = np.float32

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


@dataclass
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
        # An empty prompt starts from the zero state as if after a newline (after the first
        # vocabulary character when the vocabulary has no newline).
        self._empty_prompt = np.array([self.vocab.index.get("\n", 0)], dtype=np.int64)

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
        stream._slot = len(self._slots)
        self._slots.append(stream)
        try:
            with self._blas:
                self.network.consume(stream._slot, ids)
        except BaseException:
            self._release(stream)
            raise
        return stream

    def step(self, streams: list[Stream]) -> list[Delta]:
        """Advance every given unfinished stream by one character in one batched step."""
        batch, seen = [], set()
        for s in streams:
            if not isinstance(s, Stream) or s._engine is not self:
                raise ValueError("step() was given a stream this engine did not start")
            if s.finish_reason is not None:
                continue
            if id(s) in seen:
                raise ValueError("step() was given the same stream twice")
            seen.add(id(s))
            batch.append(s)
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
        for s in ordered:
            if s.finish_reason is not None:
                self._release(s)
        if batch != ordered:
            by_stream = {id(d.stream): d for d in deltas}
            deltas = [by_stream[id(s)] for s in batch]
        return deltas

    def _step_blocks(self, ordered: list[Stream], deltas: list[Delta], jobs: list) -> None:
        """Blocks of rows go through sampling, text bookkeeping and the network step in turn; a
        block's network step runs on a helper thread while the next block is sampled."""
        blocks = self.network.blocks(len(ordered))
        for k, rows in enumerate(blocks):
            group, logits = ordered[rows], self.network.logits[rows]  # (n, V)
            ids = next_ids(logits, [s.request.sampling for s in group], [s._rng for s in group])
            for s, row, i in zip(group, logits, ids.tolist()):
                lp = self._logprob(row, i, s.request.logprobs) if s.request.logprobs else None
                deltas.append(self._emit(s, self.vocab.chars[i], lp))
            if any(s.finish_reason is None for s in group):
                if k < len(blocks) - 1:
                    jobs.append(_workers().submit(self.network.advance, ids, rows))
                else:
                    self.network.advance(ids, rows)

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
        ordered = sorted(batch, key=lambda s: s._slot)
        for i, s in enumerate(ordered):
            j = s._slot
            if j != i:  # j > i always; slot i holds a stream outside the batch
                other = self._slots[i]
                self.network.swap(i, j)
                self._slots[i], self._slots[j] = s, other
                s._slot, other._slot = i, j
        return ordered

    def _release(self, s: Stream) -> None:
        slot, last = s._slot, len(self._slots) - 1
        if slot != last:
            moved = self._slots[last]
            self.network.copy(last, slot)
            self._slots[slot] = moved
            moved._slot = slot
        self._slots.pop()
        s._slot = -1


# ---------------------------------------------------------------- the network in numpy

MIN_ROWS_PER_THREAD = 24  # below this a hand-off to a helper thread (~0.1 ms here) costs more than it saves


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
    """The artifact's network as float32 arrays with per-slot state buffers.

    S (max_batch, L*H) holds [h_1 | ... | h_L] per slot, C the LSTM cell states in the same layout,
    logits (max_batch, V) each slot's prediction for its next character. Every operation of a step
    is row by row, so a batch is split into blocks of rows that run on separate threads (numpy
    releases the GIL inside its loops and BLAS calls).
    """

    def __init__(self, model: keras.Model, max_batch: int, threads: int | None = None):
        config = config_of(model)
        self.cell, self.units, self.depth = config.cell, config.units, config.layers
        embedding = _numpy(model.get_layer("embedding").embeddings).astype(np.float64)  # (V, E)
        dense = model.get_layer("logits")
        self.vocab_size = embedding.shape[0]
        H, L = self.units, self.depth
        kind = {"lstm": _LSTM, "gru": _GRU, "rnn": _RNN}[self.cell]
        self.layers = [kind(model.get_layer(f"rnn_{i + 1}"), max_batch) for i in range(L)]
        first = self.layers[0]
        # The first layer's input projection of every character, once: (V, gates).
        self.table = (embedding @ first.W.astype(np.float64) + first.b.astype(np.float64)).astype(F32)
        self.dense_W = _numpy(dense.kernel).astype(F32)  # (H, V)
        self.dense_b = _numpy(dense.bias).astype(F32)
        self.S = np.zeros((max_batch, L * H), F32)
        self.C = np.zeros((max_batch, L * H), F32) if self.cell == "lstm" else None
        self.logits = np.zeros((max_batch, self.vocab_size), F32)
        self._input = np.empty((max_batch, first.gates * H), F32)
        self.threads = min(threads or _cores(), _cores())

    def h(self, layer: int, rows: slice) -> np.ndarray:
        return self.S[rows, layer * self.units : (layer + 1) * self.units]

    def c(self, layer: int, rows: slice) -> np.ndarray | None:
        return None if self.C is None else self.C[rows, layer * self.units : (layer + 1) * self.units]

    def consume(self, slot: int, ids: np.ndarray) -> None:
        """Reset `slot` to the zero state and run it through the prompt `ids` (T,), leaving the
        prediction for the character after the prompt in logits[slot]."""
        rows = slice(slot, slot + 1)
        self.S[rows] = 0
        if self.C is not None:
            self.C[rows] = 0
        x = self.table[ids]  # (T, gates): layer 1's input projection of every position
        with np.errstate(over="ignore"):  # exp overflowing to inf is how saturated gates come out 0 or 1
            for i, layer in enumerate(self.layers):
                if i > 0:
                    x = layer.project(outputs)  # (T, gates) in one product
                outputs = layer.scan(x, self.h(i, rows), self.c(i, rows), rows)  # (T, H)
        self._logits(rows)

    def blocks(self, n: int) -> list[slice]:
        """Rows 0..n-1 cut into one block per thread (at least MIN_ROWS_PER_THREAD rows each)."""
        k = min(self.threads, n // MIN_ROWS_PER_THREAD) or 1
        return [slice(n * i // k, n * (i + 1) // k) for i in range(k)]

    def advance(self, ids: np.ndarray, rows: slice) -> None:
        """Feed character ids[b] to slot rows.start + b; logits[rows] become the next predictions."""
        x = self._input[rows]
        np.take(self.table, ids, axis=0, out=x, mode="clip")  # ids are valid; "clip" skips a copy
        with np.errstate(over="ignore"):
            self.layers[0].recur(x, self.h(0, rows), self.c(0, rows), rows)
            for i in range(1, self.depth):
                # [h_{i-1} (just updated), h_i (previous)] is one contiguous block of S
                xh = self.S[rows, (i - 1) * self.units : (i + 1) * self.units]
                self.layers[i].stacked(xh, self.h(i, rows), self.c(i, rows), rows)
        self._logits(rows)

    def _logits(self, rows: slice) -> None:
        np.matmul(self.S[rows, -self.units :], self.dense_W, out=self.logits[rows])
        self.logits[rows] += self.dense_b

    def swap(self, i: int, j: int) -> None:
        for a in (self.S, self.C, self.logits):
            if a is not None:
                a[[i, j]] = a[[j, i]]

    def copy(self, src: int, dst: int) -> None:
        for a in (self.S, self.C, self.logits):
            if a is not None:
                a[dst] = a[src]

    def flops_per_char(self) -> int:
        """2 x the multiply-adds of the matrix products in one step (the first layer's input
        projection is a table lookup and is not counted, nor is element-wise work)."""
        H, V = self.units, self.vocab_size
        total = sum(layer.gates * H * (H if i == 0 else 2 * H) for i, layer in enumerate(self.layers))
        return 2 * (total + H * V)

    def bytes_per_slot(self) -> int:
        """State and scratch buffers preallocated for each batch slot."""
        per_row = self.S[0].nbytes + self.logits[0].nbytes + self._input[0].nbytes
        per_row += 0 if self.C is None else self.C[0].nbytes
        return per_row + sum(layer.bytes_per_row() for layer in self.layers)


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


class _Layer:
    """One recurrent layer. W (in, G), U (H, G), b (G,) are stored reordered and scaled so every gate
    nonlinearity is 1 / (1 + exp(z)); WU is [W; U] for the stacked product. z and t are per-slot
    scratch: a call working on `rows` touches only those rows, so blocks of rows run in parallel."""

    gates = 1
    cell = ""

    def __init__(self, layer, max_batch: int, scale: np.ndarray, order: np.ndarray | None = None):
        _check_layer(layer, self.cell)
        kernel, recurrent, bias = (_numpy(v) for v in (layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias))
        if order is not None:
            kernel, recurrent, bias = kernel[:, order], recurrent[:, order], bias[..., order]
        self.units = layer.cell.units
        self.W = (kernel * scale).astype(F32)  # (in, G)
        self.U = (recurrent * scale).astype(F32)  # (H, G)
        self.b = (bias * scale).astype(F32)  # (G,) (GRU: (2, G), folded in _GRU)
        self.WU = np.concatenate([self.W, self.U])  # (in + H, G)
        self.z = np.empty((max_batch, self.gates * self.units), F32)  # pre-activations
        self.t = np.empty((max_batch, self.units), F32)  # element-wise scratch

    def project(self, x: np.ndarray) -> np.ndarray:
        return np.matmul(x, self.W) + self.b  # (T, G)

    def scan(self, x: np.ndarray, h: np.ndarray, c: np.ndarray | None, rows: slice) -> np.ndarray:
        """Run one stream (h, c are (1, H) views updated in place) over input projections x (T, G)."""
        out = np.empty((len(x), self.units), F32)  # (T, H)
        for t in range(len(x)):
            self.recur(x[t : t + 1], h, c, rows)
            out[t] = h[0]
        return out

    def recur(self, x: np.ndarray, h: np.ndarray, c: np.ndarray | None, rows: slice) -> None:
        """x (n, G) input projections including the bias: h (and c) become the next state."""
        z = self.z[rows]
        np.matmul(h, self.U, out=z)
        z += x
        self.update(z, h, c, rows)

    def stacked(self, xh: np.ndarray, h: np.ndarray, c: np.ndarray | None, rows: slice) -> None:
        """xh (n, in + H) = [input, h]: one product with [W; U]."""
        z = self.z[rows]
        np.matmul(xh, self.WU, out=z)
        z += self.b
        self.update(z, h, c, rows)

    def update(self, z, h, c, rows) -> None:
        raise NotImplementedError

    def bytes_per_row(self) -> int:
        return self.z[0].nbytes + self.t[0].nbytes


class _LSTM(_Layer):
    gates, cell = 4, "lstm"

    def __init__(self, layer, max_batch: int):
        H = layer.cell.units
        order = np.r_[0 : 2 * H, 3 * H : 4 * H, 2 * H : 3 * H]  # Keras i, f, c, o -> i, f, o, c
        scale = np.r_[np.full(3 * H, -1.0), np.full(H, -2.0)]
        super().__init__(layer, max_batch, scale, order)

    def update(self, z, h, c, rows) -> None:
        H = self.units
        np.exp(z, out=z)
        z += 1
        np.reciprocal(z, out=z)  # i, f, o = sigmoid; the last block is (1 + tanh(g)) / 2
        i, f, o, g = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
        g *= 2
        g -= 1  # tanh(g)
        c *= f
        g *= i
        c += g  # c = f * c + i * g
        t = self.t[rows]
        np.multiply(c, -2, out=t)
        np.exp(t, out=t)
        t += 1
        np.divide(2, t, out=t)
        t -= 1  # tanh(c)
        np.multiply(o, t, out=h)


class _RNN(_Layer):
    gates, cell = 1, "rnn"

    def __init__(self, layer, max_batch: int):
        super().__init__(layer, max_batch, np.float64(-2.0))

    def update(self, z, h, c, rows) -> None:
        np.exp(z, out=z)
        z += 1
        np.divide(2, z, out=z)
        np.subtract(z, 1, out=h)  # tanh


class _GRU(_Layer):
    """Keras GRU with reset_after=True: z, r = sigmoid(x W + b_in + h U + b_rec) and
    candidate = tanh(x W_h + b_in_h + r * (h U_h + b_rec_h)); h = z * h + (1 - z) * candidate."""

    gates, cell = 3, "gru"

    def __init__(self, layer, max_batch: int):
        H = layer.cell.units
        scale = np.r_[np.full(2 * H, -1.0), np.full(H, -2.0)]
        super().__init__(layer, max_batch, scale)
        b_in, b_rec = self.b  # (2, 3H)
        self.b = b_in.copy()
        self.b[: 2 * H] += b_rec[: 2 * H]  # the z and r biases always add up
        self.b_candidate = b_rec[2 * H :].copy()  # the one that r multiplies
        self.rec = np.empty_like(self.z)
        self.WU = None

    def recur(self, x: np.ndarray, h: np.ndarray, c, rows: slice) -> None:
        H = self.units
        rec = self.rec[rows]
        np.matmul(h, self.U, out=rec)  # (n, 3H)
        zr = x[:, : 2 * H]
        zr += rec[:, : 2 * H]
        np.exp(zr, out=zr)
        zr += 1
        np.reciprocal(zr, out=zr)  # z, r
        z, r = zr[:, :H], zr[:, H:]
        cand = rec[:, 2 * H :]
        cand += self.b_candidate
        cand *= r
        cand += x[:, 2 * H :]
        np.exp(cand, out=cand)
        cand += 1
        np.divide(2, cand, out=cand)
        cand -= 1  # tanh
        d = x[:, 2 * H :]  # free now
        np.subtract(h, cand, out=d)
        d *= z
        np.add(cand, d, out=h)  # h = candidate + z * (h - candidate)

    def stacked(self, xh: np.ndarray, h: np.ndarray, c, rows: slice) -> None:
        x = self.z[rows]
        np.matmul(xh[:, : self.units], self.W, out=x)
        x += self.b
        self.recur(x, h, c, rows)

    def bytes_per_row(self) -> int:
        return super().bytes_per_row() + self.rec[0].nbytes
