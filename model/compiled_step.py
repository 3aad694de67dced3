"""The network step on our compiled kernels (`model.kernels`): the Keras network copied once into
float32 arrays, each slot's state in buffers allocated up front, a batch split over threads.

How a step is arranged (the matrix products are the real work; the rest is kept off their way):
  - The first layer's input projection embedding @ kernel + bias is a (gates, V) lookup table.
  - State is feature-major, one column per slot, so a block of streams times a weight matrix is a
    single BLAS call in its fastest orientation, and the gate arithmetic is one fused, vectorized
    pass over contiguous columns (see model/kernels.py).
  - A prompt is one kernel call that runs the same step through its positions (no Python per
    character).
  - The rows are cut into one block per core. One kernel call, which holds no GIL, samples a
    block's next characters (model.sampling's compiled core) and steps it through the network;
    the last block runs on the calling thread, the others on helper threads. Blocks start at
    multiples of 8 rows, where OpenBLAS's kernels run best. `advance` returns once every block has
    picked, so the engine turns the picks into text while the helpers finish; `wait` then waits
    for them on flags their kernels set.
  - BLAS runs single-threaded from `advance` to `wait` and in `consume`: multi-threaded BLAS is
    faster on an idle machine, but its spin-waiting threads collapse when anything else wants the
    cores (a step 10-20x slower beside a training run).

The first step of a process compiles the kernels (seconds), or loads them from numba's cache
(`model/__pycache__`, or $NUMBA_CACHE_DIR) in well under a second; the constructor does it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

import keras
import numpy as np
from threadpoolctl import ThreadpoolController

from model import kernels
from model.network import config_of
from model.network_step import Sampling

F32 = np.float32
_NO_SAMPLING = Sampling(np.zeros(0), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))  # of a step that does not sample
MIN_ROWS_PER_THREAD = 8  # below this a hand-off to a helper thread costs more than it saves
HELPER_SPINS = 20_000  # looks (each a sched_yield, ~1 us) for the helpers' blocks before sleeping on them


class Shape(NamedTuple):
    """The sizes every kernel takes first."""

    cell: int  # kernels.LSTM, GRU or RNN
    layers: int
    units: int
    vocab_size: int
    max_batch: int


class Buffers(NamedTuple):
    """The weights and the per-slot buffers, flattened, in the order every kernel takes them."""

    blob: np.ndarray  # every weight, float32; `offsets` says where each piece starts
    offsets: np.ndarray
    S: np.ndarray  # (L*H, B) [h_1; ...; h_L], one column per slot
    C: np.ndarray  # (L*H, B) LSTM cell states ((1, 1) for the other cells)
    Z: np.ndarray  # (G, B) pre-activations (scratch)
    R: np.ndarray  # (G, B) the GRU's recurrent product (scratch; (1, 1) for the other cells)
    logits: np.ndarray  # (V, B)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_pool: tuple[int, ThreadPoolExecutor] | None = None


def _workers() -> ThreadPoolExecutor:
    """Helper threads shared by all steps of the process (the calling thread works on the last
    block of rows itself). Made again after a fork: a forked child (a gunicorn worker) has none of
    its parent's threads."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max(1, _cores() - 1), thread_name_prefix="chargen-engine"))
    return _pool[1]


class _SingleThreadedBlas:
    """Between `limit` and `restore`, numpy's and scipy's BLAS run on one thread. The products are
    small, and BLAS threads that spin-wait for each other collapse when other work shares the cores
    (a (128, 512) x (512, 1024) product measured 10x slower beside a training run); the step splits
    a batch over threads itself instead."""

    def __init__(self):
        self._libs = ThreadpoolController().select(user_api="blas").lib_controllers
        self._saved: list[int] = []

    def limit(self) -> None:
        self._saved = [lib.get_num_threads() for lib in self._libs]
        for lib in self._libs:
            lib.set_num_threads(1)

    def restore(self) -> None:
        for lib, n in zip(self._libs, self._saved):
            lib.set_num_threads(n)


class CompiledStep:
    """The artifact's network as one float32 blob of weights plus per-slot state buffers (see
    model.kernels for the layout: one column per batch slot). Every operation of a step works
    column by column, so a batch is cut into blocks of columns that run on separate threads: a
    kernel call holds no GIL from its start to its end."""

    def __init__(self, model: keras.Model, max_batch: int, threads: int | None = None):
        config = config_of(model)
        self.cell, self.units, self.depth = config.cell, config.units, config.layers
        code = kernels.CELL_CODES[self.cell]
        embedding = _numpy(model.get_layer("embedding").embeddings).astype(np.float64)  # (V, E)
        dense = model.get_layer("logits")
        self.vocab_size = V = embedding.shape[0]
        H, L, B = self.units, self.depth, max_batch
        self.gates = G = kernels.gates_of(code) * H
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
        self.max_batch = B
        self.S = np.zeros((L * H, B), F32)
        self.C = np.zeros((L * H, B), F32) if self.cell == "lstm" else np.zeros((1, 1), F32)
        self.Z = np.zeros((G, B), F32)
        self.R = np.zeros((G, B), F32) if self.cell == "gru" else np.zeros((1, 1), F32)
        self.logits_T = np.zeros((V, B), F32)
        self.shape = Shape(code, L, H, V, B)
        self.buffers = Buffers(np.concatenate(pieces), np.array(offsets, np.int64),
                               *(a.ravel() for a in (self.S, self.C, self.Z, self.R, self.logits_T)))
        self.threads = min(threads or _cores(), _cores())
        self._blas = _SingleThreadedBlas()
        # set by each block's kernel call: its characters are picked; its state and logits are written
        self._picked = np.zeros(self.threads, np.int64)
        self._done = np.zeros(self.threads, np.int64)
        self._running: tuple[np.ndarray, list] | None = None  # an advance's done flags and helper jobs
        self._compile()

    def _compile(self) -> None:
        """Compile (or load from numba's cache) every kernel a request will use, now rather than on
        the first request: run slot 0 through a prompt and a sampled step, then clear it."""
        self.consume(0, np.zeros(1, np.int64))
        self.advance(1, np.empty(1, np.int64), Sampling(np.ones(1), np.zeros(1, np.int64), np.ones(1), np.zeros(1)))
        self.wait()
        for a in self._per_slot() + [self.Z, self.R]:
            a[:] = 0

    @property
    def logits(self) -> np.ndarray:
        """(max_batch, V): each slot's prediction for its next character (a view)."""
        return self.logits_T.T

    def consume(self, slot: int, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._blas.limit()
        try:
            kernels.consume(*self.shape, slot, ids, *self.buffers)
        finally:
            self._blas.restore()

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

    def advance(self, n: int, ids: np.ndarray, sampling: Sampling | None = None) -> None:
        """See NetworkStep.advance: the helpers' blocks are handed out first, the calling thread
        runs the last one, and this returns once every block has picked its characters."""
        blocks = self.blocks(n)
        picked, done = self._picked[: len(blocks)], self._done[: len(blocks)]
        picked[:], done[:] = 0, 0
        jobs: list = []
        self._blas.limit()
        self._running = (done, jobs)  # from here on, wait() restores BLAS and collects the jobs
        temperature, top_k, top_p, u = _NO_SAMPLING if sampling is None else sampling
        for k, rows in enumerate(blocks):
            args = (*self.shape, rows.start, ids[rows], *self.buffers, sampling is not None,
                    temperature[rows], top_k[rows], top_p[rows], u[rows], picked[k : k + 1], done[k : k + 1])
            if k < len(blocks) - 1:
                jobs.append(_workers().submit(kernels.advance, *args))
            else:
                kernels.advance(*args)
        self._await(picked, jobs)  # long since: a helper picks before its step

    def wait(self) -> None:
        if self._running is None:
            return
        (done, jobs), self._running = self._running, None
        try:
            self._await(done, jobs)  # then the helpers' work is all written; their threads finish on their own
        except BaseException:
            wait(jobs)  # never leave a helper writing into the state
            raise
        finally:
            self._blas.restore()

    @staticmethod
    def _await(flags: np.ndarray, jobs: list) -> None:
        """Until every flag is 1: spin (yielding the core) on the flags the kernels set, which takes
        microseconds where waking a sleeping thread takes tens; if that takes too long, wait on the
        helper threads themselves (and raise what failed there)."""
        if not kernels.wait_done(flags, HELPER_SPINS):
            wait(jobs)
            for job in jobs:
                job.result()

    def _per_slot(self) -> list[np.ndarray]:
        return [self.S, self.logits_T] + ([self.C] if self.cell == "lstm" else [])

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
