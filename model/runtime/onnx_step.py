"""The network step on ONNX Runtime: the artifact's `model.onnx` (model/runtime/graph.py) run one
character at a time over a batch of slots, and over a whole prompt in one call.

How a step is arranged:
  - Each slot's state lives in buffers allocated up front, in the graph's layout (layers,
    max_batch, units); the logits in (max_batch, 1, V), bound as the graph's output, so a step
    writes each row's prediction where the engine reads it.
  - Rows 0..n-1 of a (layers, max_batch, units) buffer are not one block of memory, so a step
    works on a copy of them that is: two staging buffers, read and written in turn, where the rows
    stay while the engine steps the same n rows (the usual case); they go back to the state
    buffers when anything else touches the state (copying them in and out at every step cost
    time at large batches).
  - The inputs and outputs of a step of n rows are bound once (IOBinding, kept per n): a step
    allocates nothing and converts nothing (run() with numpy arrays was slower at small batches).
  - A prompt is one call over its whole length (up to PROMPT_CHUNK positions a call): the
    recurrent operators loop in C++. It runs outside the slots, from a given State or the zero
    state, and its State goes into a slot with `restore` (or into the engine's prompt cache); the
    graph predicts at every position, which `predict` returns for scoring.
  - ORT's threads do not spin-wait for work: spinning threads collapse when other work shares the
    cores (the HTTP threads, other workers, a training run). Prompts, and steps with too little
    work for two threads (`min_rows_per_thread`, from the network's size and the graph's precision), run on one thread;
    larger steps use `threads`. bench/README.md ("Threads per step") has the figures for all of these.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model.runtime.state import PROMPT_CHUNK, State

log = logging.getLogger(__name__)

F32 = np.float32
# A step goes on several threads only when it has at least this much work (floating-point
# operations: rows x flops_per_char), per precision of the graph: with less, waking the threads
# costs about what they save, so a small network needs many rows and a large one few; an int8 graph
# does the same work in less time, so it needs more (bench/README.md, "Threads per step" and its int8
# section, has the measurements; bench/threads.py makes them for both graphs).
THREADED_STEP_FLOPS = {"float32": 30e6, "int8": 120e6}
# Prompts run on one thread in both precisions (the recurrence is sequential: a prompt of one
# stream has one row of work per position); bench/threads.py times a long prompt on one and two.
DEVICES = ("cpu", "cuda")
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def providers(device: str) -> list[str]:
    """ONNX Runtime's execution providers for `device`; for "cuda" without onnxruntime-gpu, the
    CPU's, with a warning that says what to install."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    log.warning("device 'cuda' was asked for, but this ONNX Runtime (%s) has no CUDAExecutionProvider (it has %s): "
                "running on the CPU. For the GPU: pip uninstall onnxruntime && pip install onnxruntime-gpu",
                ort.__version__, ", ".join(available))
    return ["CPUExecutionProvider"]


def make_session(graph: str | bytes, threads: int, chosen: list[str]) -> ort.InferenceSession:
    """An ONNX Runtime session of `graph` (a path or its bytes) as the engine runs it: `threads`
    intra-op threads that do not spin, one operator at a time, every graph optimization."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=chosen)


class OrtStep:
    """A chargen ONNX graph as a NetworkStep over `max_batch` slots."""

    def __init__(self, graph: str | Path | bytes, max_batch: int, threads: int | None = None, device: str = "cpu"):
        chosen = providers(device)
        source = graph if isinstance(graph, bytes) else str(graph)
        self.threads = max(1, min(threads or _cores(), _cores()))
        self._small = make_session(source, 1, chosen)  # prompts, and steps of fewer than min_rows_per_thread rows
        self._large = make_session(source, self.threads, chosen) if self.threads > 1 else self._small
        if device == "cuda" and "CUDAExecutionProvider" in chosen and "CUDAExecutionProvider" not in self._small.get_providers():
            log.warning("device 'cuda': ONNX Runtime could not start its CUDA provider (see its log above): running on the CPU")
        self.device = "cuda" if "CUDAExecutionProvider" in self._small.get_providers() else "cpu"
        inputs = {i.name: i.shape for i in self._small.get_inputs()}
        self.names = [n for n in ("h", "c") if n in inputs]  # the recurrent states; c for an LSTM only
        self.depth, _, self.units = inputs["h"]
        self.vocab_size = self._small.get_outputs()[0].shape[-1]
        about = self._small.get_modelmeta().custom_metadata_map  # model.runtime.graph.metadata
        self.cell, self.embedding = about["cell"], int(about["embedding"])
        self.precision = about.get("precision", "float32")
        self.min_rows_per_thread = max(1, math.ceil(THREADED_STEP_FLOPS[self.precision] / self.flops_per_char()))
        self.max_batch = B = max_batch
        L, H, V = self.depth, self.units, self.vocab_size
        self._states = [np.zeros((L, B, H), F32) for _ in self.names]
        self._logits = np.zeros((B, 1, V), F32)
        self._logit_rows = self._logits[:, 0]
        self._ids = np.zeros((B, 1), np.int64)
        # Rows 0..n-1 of each state as one block of memory, twice: a step reads one and writes the
        # other. While the engine steps the same n rows, their state stays there (`_resident`).
        self._staging = [(np.zeros(L * B * H, F32), np.zeros(L * B * H, F32)) for _ in self.names]
        self._resident = 0  # rows 0..resident-1 of the state are in staging[.][_current], not _states
        self._current = 0
        self._bindings: dict[tuple[int, int], tuple] = {}
        self._outputs = ["logits"] + [f"{n}_out" for n in self.names]

    @property
    def logits(self) -> np.ndarray:
        """(max_batch, V): each slot's prediction for its next character (a view)."""
        return self._logit_rows

    def consume(self, slot: int, ids: np.ndarray) -> None:
        self.restore(slot, self.prompt(ids))

    def prompt(self, ids: np.ndarray, state: State | None = None) -> State:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        for start in range(0, len(ids), PROMPT_CHUNK):  # one call for any prompt up to PROMPT_CHUNK
            _, state = self._run(ids[start : start + PROMPT_CHUNK], state, every=False)
        return state

    def predict(self, ids: np.ndarray, state: State | None = None) -> tuple[np.ndarray, State]:
        if len(ids) > PROMPT_CHUNK:
            raise ValueError(f"predict() takes at most {PROMPT_CHUNK} ids at a time, got {len(ids)}")
        return self._run(np.ascontiguousarray(ids, dtype=np.int64), state, every=True)

    def _run(self, ids: np.ndarray, state: State | None, every: bool) -> tuple[np.ndarray | None, State]:
        """One runtime call over ids (T,) from `state` (the graph predicts at every position)."""
        if state is None:
            arrays = [np.zeros((self.depth, 1, self.units), F32) for _ in self.names]
        else:
            arrays = state.arrays
        logits, *after = self._small.run(self._outputs, {"ids": ids[None], **dict(zip(self.names, arrays))})
        return (logits[0] if every else None), State(tuple(after), logits[0, -1].copy())

    def restore(self, slot: int, state: State) -> None:
        self._store()
        for buffer, array in zip(self._states, state.arrays):
            buffer[:, slot] = array[:, 0]
        self._logits[slot, 0] = state.logits

    def state(self, slot: int) -> State:
        self._store()
        return State(tuple(buffer[:, slot : slot + 1].copy() for buffer in self._states), self._logits[slot, 0].copy())

    def advance(self, n: int, ids: np.ndarray) -> None:
        if self._resident != n:
            self._store()
            for state, staged in zip(self._states, self._staged(n, self._current)):
                staged[...] = state[:, :n]
            self._resident = n
        session, binding = self._binding(n, self._current)
        self._ids[:n, 0] = ids
        session.run_with_iobinding(binding)
        self._current ^= 1

    def _staged(self, n: int, which: int) -> list[np.ndarray]:
        """Each state's rows 0..n-1 in staging buffer `which`, as (layers, n, units)."""
        size = self.depth * n * self.units
        return [pair[which][:size].reshape(self.depth, n, self.units) for pair in self._staging]

    def _store(self) -> None:
        """Put the resident rows' state back into the state buffers (before anything else reads or
        writes them)."""
        if self._resident:
            n = self._resident
            for state, staged in zip(self._states, self._staged(n, self._current)):
                state[:, :n] = staged
            self._resident = 0

    def _binding(self, n: int, which: int) -> tuple:
        """The session for n rows and its binding of ids, logits and the states (read from staging
        buffer `which`, written to the other), made once."""
        key = (n, which)
        if key not in self._bindings:
            session = self._small if n < self.min_rows_per_thread else self._large
            value = ort.OrtValue.ortvalue_from_numpy  # on the CPU: wraps the array's memory, no copy
            binding = session.io_binding()
            binding.bind_ortvalue_input("ids", value(self._ids[:n]))
            binding.bind_ortvalue_output("logits", value(self._logits[:n]))
            for name, read, written in zip(self.names, self._staged(n, which), self._staged(n, 1 - which)):
                binding.bind_ortvalue_input(name, value(read))
                binding.bind_ortvalue_output(f"{name}_out", value(written))
            self._bindings[key] = (session, binding)
        return self._bindings[key]

    def swap(self, i: int, j: int) -> None:
        self._store()
        for state in self._states:
            state[:, [i, j]] = state[:, [j, i]]
        self._logits[[i, j]] = self._logits[[j, i]]

    def copy(self, src: int, dst: int) -> None:
        self._store()
        for state in self._states:
            state[:, dst] = state[:, src]
        self._logits[dst] = self._logits[src]

    def flops_per_char(self) -> int:
        """2 x the multiply-adds of the matrix products in one step: each layer's input product (the
        first layer's input is the embedding) and recurrent product, and the output layer."""
        H, V, L, E = self.units, self.vocab_size, self.depth, self.embedding
        G = GATES[self.cell] * H
        return 2 * (G * (E + H) + (L - 1) * G * 2 * H + H * V)

    def bytes_per_slot(self) -> int:
        return sum(state[:, 0].nbytes * 3 for state in self._states) + self._logits[0].nbytes
