"""Fast incremental generation for one stream or many stepped together (continuous batching).

Each stream keeps its recurrent state in a batch slot of the network step (`model.network_step`),
so every character costs one step of the recurrence, never a re-run over a window. Streams join
(`start`, which runs the prompt through the network in one call) and leave (finish, `cancel`)
between steps; every `step` picks the next character of each given stream from its slot's
prediction (`model.sampling.pick`, all rows at once) and advances them together in one step of
the network. This module does the slots: which stream holds which slot (the ones stepped are
moved to the front), each slot's sampling settings, and the uniform draws taken ahead from each
stream's generator (64 at a time: the same numbers, in the same order, as one generator.random()
per pick), so a step makes no Python call per stream to sample. The text a stream emits is its
own business (`model.streams`).

A stream's log-probabilities can differ by ~1e-6 depending on its batch (float32 products of a
batch and of a single row round differently); the sampler works in float64 so that this flips a
pick only when a draw lands within ~1e-6 of a boundary. Same seed and same batch composition:
same text, always.

The engine is not thread-safe: exactly one thread calls it.
"""

from __future__ import annotations

import operator
import secrets
from typing import TYPE_CHECKING

import numpy as np

from model import network_step
from model.sampling import log_softmax, pick
from model.streams import CharLogprob, Delta, GenerationRequest, Stream, whole_number
from model.vocab import Vocab

if TYPE_CHECKING:
    from model.artifact import Artifact

__all__ = ["CharLogprob", "Delta", "Engine", "EngineFull", "GenerationRequest", "Stream"]

DRAWS_AHEAD = 64  # uniform draws taken from a stream's generator at a time

_slot_of = operator.attrgetter("_slot")


class EngineFull(RuntimeError):
    """Every batch slot is taken; try again when a stream finishes."""


class Engine:
    def __init__(self, artifact: Artifact, max_batch: int = 128, threads: int | None = None, device: str = "cpu"):
        """`threads`: most threads one step uses (default: one per core); `device`: "cpu" or "cuda"
        (the CPU, with a warning, where ONNX Runtime has no CUDA)."""
        if not whole_number(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        if threads is not None and (not whole_number(threads) or threads < 1):
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
        self.vocab: Vocab = artifact.vocab
        self.max_batch = int(max_batch)
        self.network = network_step.load(artifact, self.max_batch, threads, device)
        if self.network.vocab_size != len(self.vocab):
            raise ValueError(f"the network predicts {self.network.vocab_size} characters but the vocabulary has {len(self.vocab)}")
        self._slots: list[Stream] = []  # slot i holds _slots[i]; active streams always fill 0..active-1
        self._slot_range = list(range(self.max_batch))
        # Each slot's sampling settings, and a block of uniform draws taken ahead from its stream's generator.
        self._temperature = np.zeros(self.max_batch)
        self._top_k = np.zeros(self.max_batch, np.int64)
        self._top_p = np.ones(self.max_batch)
        self._samples = np.zeros(self.max_batch, bool)  # not greedy: takes a draw per pick
        self._draws = np.zeros((self.max_batch, DRAWS_AHEAD))
        self._next_draw = np.zeros(self.max_batch, np.int64)  # a greedy slot's stays 0
        self._rows = np.arange(self.max_batch)
        self._logprobs = np.zeros(self.max_batch, np.int64)  # the logprobs each slot's request asks for
        self._wanting = 0  # active slots whose requests ask for logprobs
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
        stream = Stream(request, int(seed), len(encoded.ids), encoded.dropped, owner=self)
        stream._slot = slot = len(self._slots)
        self._slots.append(stream)
        settings = request.sampling
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = settings.temperature, settings.top_k, settings.top_p
        self._samples[slot] = not settings.greedy
        self._next_draw[slot] = DRAWS_AHEAD if self._samples[slot] else 0  # none drawn yet; a greedy slot draws none
        self._logprobs[slot] = request.logprobs
        self._wanting += request.logprobs > 0
        try:
            self.network.consume(slot, ids)
        except BaseException:
            self._release(stream)
            raise
        return stream

    def step(self, streams: list[Stream]) -> list[Delta]:
        """Advance every given unfinished stream by one character in one batched step."""
        if streams and streams == self._slots[: len(streams)]:  # slots 0..n-1 in order, all checked at once
            batch = ordered = streams
        else:
            for s in streams:
                if s.__class__ is not Stream or s._owner is not self:
                    raise ValueError("step() was given a stream this engine did not start")
            batch = [s for s in streams if s.finish_reason is None]
            if len(set(map(id, batch))) != len(batch):
                raise ValueError("step() was given the same stream twice")
            if not batch:
                return []
            ordered = self._to_front(batch)  # ordered[i] holds slot i
        n = len(ordered)
        logits = self.network.logits[:n]
        ids = pick(logits, self._temperature[:n], self._top_k[:n], self._top_p[:n], self._uniforms(ordered))
        picked = ids.tolist()
        chars = self.vocab.chars
        if self._wanting:  # from the logits the characters were picked from, before the step replaces them
            lps = {b: self._logprob(logits[b], picked[b], self._logprobs[b]) for b in np.flatnonzero(self._logprobs[:n]).tolist()}
        self.network.advance(n, ids)
        if self._wanting:
            deltas = [s.emit(chars[i], lps.get(b)) for b, (s, i) in enumerate(zip(ordered, picked))]
        else:
            deltas = [s.emit(chars[i]) for s, i in zip(ordered, picked)]
        for d in deltas:
            if d.finish_reason is not None:
                self._release(d.stream)
        if batch is not ordered:
            by_stream = {id(d.stream): d for d in deltas}
            deltas = [by_stream[id(s)] for s in batch]
        return deltas

    def _logprob(self, logits: np.ndarray, chosen: int, k: int) -> CharLogprob:
        logp = log_softmax(logits)
        top = np.argsort(-logp, kind="stable")[:k]
        chars = self.vocab.chars
        return CharLogprob(chars[chosen], float(logp[chosen]), [(chars[i], float(logp[i])) for i in top])

    def _uniforms(self, ordered: list[Stream]) -> np.ndarray:
        """The next draw of every sampling stream in slots 0..n-1 (a greedy one's is stale: pick ignores it)."""
        n = len(ordered)
        taken = self._next_draw[:n]
        if taken.max() == DRAWS_AHEAD:  # some stream has used its draws (greedy ones take none)
            for b in np.flatnonzero(taken == DRAWS_AHEAD).tolist():
                self._draws[b] = ordered[b]._rng.random(DRAWS_AHEAD)
                taken[b] = 0
        u = self._draws[self._rows[:n], taken]
        taken += self._samples[:n]
        return u

    def cancel(self, stream: Stream) -> None:
        """finish_reason = "cancelled"; frees the slot at once (held-back text is discarded)."""
        if stream._owner is not self:
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
        return [self._temperature, self._top_k, self._top_p, self._samples, self._draws, self._next_draw, self._logprobs]

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
        self._wanting -= s.request.logprobs > 0
        s._slot = -1
