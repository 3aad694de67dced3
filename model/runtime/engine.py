"""Fast incremental generation for one stream or many stepped together (continuous batching).

Each stream keeps its recurrent state in a batch slot of the network step (`model.runtime.network_step`),
so every character costs one step of the recurrence, never a re-run over a window. Streams join
(`start`, which runs the prompt through the network in one call) and leave (finish, `cancel`)
between steps; every `step` picks the next character of each given stream from its slot's
prediction (`model.runtime.sampling.pick`, all rows at once) and advances them together in one step of
the network. This module does the slots: which stream holds which slot (the ones stepped are
moved to the front), each slot's sampling settings, and the uniform draws taken ahead from each
stream's generator (64 at a time: the same numbers, in the same order, as one generator.random()
per pick), so a step makes no Python call per stream to sample. The text a stream emits is its
own business (`model.runtime.streams`): character by character for a request with stop sequences or
logprobs. A request with neither has nothing to check per character, so its slot keeps the ids
picked for it (UnreadIds) and the stream takes them as text when its text is read, when the slot's
row is full and at max_chars: a step of such streams does no Python per stream, and its Deltas are
made only if the caller reads them.

Streams whose settings adjust the logits (penalties, biases; model.runtime.sampling) have per-slot arrays
beside the others: the biases, how often each character was generated, and a ring buffer of each
slot's last repetition_window characters (its prompt's included) with their counts; a step updates
them for all rows with a few indexed operations. Requests that ask for none of this cost nothing
for it.

A prompt is read from the prompt cache (`model.runtime.prompt_cache`, when the engine has one): the state
after its longest cached prefix, then the rest fed in one call; the state at the prompt's end (and
at the positions the request names, such as a chat's turn ends) is kept for the next. A prompt to
be scored (`prompt_logprobs`) is fed from the start in calls of PROMPT_CHUNK characters, each giving
the prediction at every position; `max_chars` 0 reads (and scores) the prompt and generates nothing.
A long prompt can be read ahead in pieces (`reading`, then `read_more` a piece at a time between
steps, then `start(request, reading)`), so that a long chat transcript does not hold every running
stream for the whole of its reading; it gives the same state bit for bit.

A stream's log-probabilities can differ by ~1e-6 depending on its batch (float32 products of a
batch and of a single row round differently); the sampler works in float64 so that this flips a
pick only when a draw lands within ~1e-6 of a boundary. Same seed and same batch composition:
same text, always. An int8 graph (model.int8.onnx) depends on the batch far more: ONNX Runtime's
dynamic quantization gives each call's activations one scale for all its rows, so a stream's
log-probabilities move with the streams it steps beside (README.md, "Precision"), and so
can its sampled text; alone, or beside the same streams, it is the same.

A request with a constraint (model.runtime.constraints) carries its matcher on its stream; the
engine keeps each constrained slot's mask (SlotConstraints: `blocked`, the characters that cannot
continue the match and are not its end) and removes them from the constrained rows' logits before the sampler's
adjustments and filters (so the draw is still one number per pick). After the pick the stream's
place in its constraint advances by the character. A regex with a table (model.runtime.regex_table)
keeps its place as a state number: all the rows of a table advance at once in a few
indexed operations, and their masks are rows of the table's. Any other constraint has llguidance's
matcher, two or three calls a row, the masks of all of them unpacked at once into `allowed` (the
characters that continue the match) and `accepting` (the text so far is already a complete match,
where every character may be picked); the matcher's own fields are left as they
were until it settles again. With BESIDE_ROWS rows of matchers or more, that work runs in a thread
beside the engine's while ONNX Runtime steps the network (it lets go of the GIL; the matchers need
nothing from the step), so it costs the step little of its time; what needs the network (a forced
run) waits for the step. A constrained stream with nothing else to check (no stop sequences, no
logprobs) keeps its picks in its slot as an unchecked stream does: only the rows with something to
do (a forced character, a match that ends, a checked stream) are looked at one by one. A run of
characters the constraint then forces (one possible character, repeatedly) at least
FORCED_RUN_CALL long is fed to the network in one prompt call and emitted with the picked one,
counting toward max_chars and taking no draw; a shorter one is picked a character a step, each the
only one allowed, with a draw each as usual.

A constrained stream ends with "stop" when its match is complete and no character of the
vocabulary extends it, and, at a complete match that could go on, when the model picks a character
that cannot continue it (accept-and-stop: the characters outside the continuations together stand
for "end here"; the one picked is not emitted). It ends at a dead end (a grammar or schema that
could go on only with characters the vocabulary lacks; a regex's masks never lead there) with
"stop" too, marked incomplete, and at max_chars with "length", incomplete unless its text happens
to be a complete match. The logprobs and rank sums of a constrained stream are those of the masked
distribution (the allowed characters' softmax); a forced character's is 0. Streams without a
constraint cost nothing for any of this.

The engine is not thread-safe: exactly one thread calls it (the thread beside is its own).
"""

from __future__ import annotations

import operator
import os
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.runtime import network_step
from model.runtime.constraints import forget, single_bytes
from model.runtime.prompt_cache import PromptCache
from model.runtime.sampling import MAX_REPETITION_WINDOW, Adjustments, SamplingSettings, log_softmax, mask_out, pick
from model.runtime.state import PROMPT_CHUNK, State
from model.runtime.streams import CharLogprob, Delta, Deltas, GenerationRequest, PromptScore, Stream, whole_number
from model.records.vocab import Vocab

if TYPE_CHECKING:
    from model.runtime.artifact import Artifact

__all__ = ["CharLogprob", "Delta", "Deltas", "Engine", "EngineFull", "GenerationRequest", "PromptScore", "Stream"]

DRAWS_AHEAD = 64  # uniform draws taken from a stream's generator at a time
UNREAD = 256  # ids a slot keeps for a stream without checks before the stream takes them
# A forced run at least this long is fed to the network in one prompt call; a shorter one is picked
# a character a step (the mask allows one): a prompt call of one row costs about as much as a step
# of the whole batch, so it pays for long runs only.
FORCED_RUN_CALL = 8
# The matcher's work one stream of llguidance's may take, all its steps together (a regex's table costs
# nothing to step). An ambiguous grammar's steps grow with the text, to tens of milliseconds a row,
# and every other stream of the batch waits for them: past this the stream ends where it is,
# incomplete unless its text is a whole match, its `constraint_error` saying why. A JSON schema's
# stream of a few thousand characters takes a few tens of milliseconds.
CONSTRAINT_SECONDS = 0.5
# Rows of llguidance's matchers (not a regex's table) advance in a thread beside the network's step from this many rows;
# fewer take less time (a few microseconds a row) than handing them over costs (bench/README.md,
# "Constrained generation")
BESIDE_ROWS = 8

_slot_of = operator.attrgetter("_slot")


class _Beside:
    """Runs one call in a thread of its own while the engine's thread waits in ONNX Runtime (which
    lets go of the GIL while the network steps): the constrained rows' matchers advance during the
    network's step instead of after it. Two locks hand the call over and back (no Python-level
    condition variables: a hand-over costs microseconds). The thread starts on first use in each
    process (threads do not survive a fork) and ends when the engine is dropped."""

    def __init__(self):
        self._pid = None

    def start(self, fn, *args) -> None:
        if self._pid != os.getpid():
            self._go, self._done, self._box = threading.Lock(), threading.Lock(), [None, None]
            self._go.acquire()
            self._done.acquire()
            threading.Thread(target=_beside, args=(self._go, self._done, self._box), daemon=True,
                             name="chargen-constraints").start()
            weakref.finalize(self, _stop, self._go, self._box)
            self._pid = os.getpid()
        self._box[0] = (fn, args)
        self._go.release()

    def result(self):
        """What the call returned (or raised), once it is done."""
        self._done.acquire()
        out, self._box[1] = self._box[1], None
        if isinstance(out, _Raised):
            raise out.error
        return out


def _stop(go: threading.Lock, box: list) -> None:
    box[0] = None  # no call: the thread ends
    go.release()


@dataclass
class _Raised:
    error: BaseException


def _beside(go: threading.Lock, done: threading.Lock, box: list) -> None:
    while True:
        go.acquire()
        job, box[0] = box[0], None
        if job is None:
            return
        fn, args = job
        try:
            box[1] = fn(*args)
        except BaseException as e:  # raised again in the engine's thread
            box[1] = _Raised(e)
        del fn, args, job
        done.release()


class EngineFull(RuntimeError):
    """Every batch slot is taken; try again when a stream finishes."""


# A prompt longer than this is worth reading ahead in pieces of this many characters, between steps
# (Engine.reading): about 15 ms of the shipped int8 network's time, 60 ms of float32's.
READ_PIECE = 512


@dataclass
class PromptReading:
    """A prompt being read ahead of its stream's start: its ids, where the reading has got to and the
    state there (from the prompt cache's longest prefix on)."""

    request: GenerationRequest
    ids: np.ndarray
    dropped: int
    boundaries: list[int]  # where the request's cache_at positions fall in ids
    done: int = 0  # ids read so far
    state: State | None = None  # the state after ids[:done] (None: nothing read)
    cached: int = 0  # of them, resumed from the prompt cache

    @property
    def finished(self) -> bool:
        return self.done == len(self.ids)


class SlotSampling:
    """For max_batch slots, each slot's sampling settings as the sampler reads them, and a block of
    uniform draws taken ahead from its stream's generator. It counts the active slots that are
    greedy or use min-p, top-k or top-p, so that a step whose rows use none of them skips the
    sampler's checks for them; and how many steps at least until some slot has used its draws."""

    def __init__(self, max_batch: int):
        B = max_batch
        self.temperature = np.zeros(B)
        self.top_k = np.zeros(B, np.int64)
        self.top_p = np.ones(B)
        self.min_p = np.zeros(B)
        self.samples = np.zeros(B, np.int64)  # 1: not greedy, takes a draw per pick (int64: added to next_draw without a cast)
        self.draws = np.zeros((B, DRAWS_AHEAD))
        self.next_draw = np.zeros(B, np.int64)  # a greedy slot's, and a free slot's, stay 0
        self.greedy = self.min_ps = self.filters = 0  # active slots that are greedy, use min-p, use top-k or top-p
        self.quiet = 0  # steps before any slot can have used its draws (a slot takes at most one a step)
        self._rows = np.arange(B)

    def arrays(self) -> list[np.ndarray]:
        return [self.temperature, self.top_k, self.top_p, self.min_p, self.samples, self.draws, self.next_draw]

    def set(self, slot: int, settings: SamplingSettings) -> None:
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = settings.temperature, settings.top_k, settings.top_p
        self.min_p[slot] = settings.min_p
        self.samples[slot] = not settings.greedy
        self.next_draw[slot] = 0 if settings.greedy else DRAWS_AHEAD  # none drawn yet; a greedy slot draws none
        self.quiet = 0
        self._count(settings, 1)

    def free(self, last: int, settings: SamplingSettings) -> None:
        """A stream with these settings left; the last active slot, `last`, is free now."""
        self.next_draw[last] = 0
        self._count(settings, -1)

    def _count(self, settings: SamplingSettings, by: int) -> None:
        self.greedy += by * settings.greedy
        self.min_ps += by * (settings.min_p > 0)
        self.filters += by * settings.filters

    def pick(self, logits: np.ndarray, ordered: list[Stream], adjustments: Adjustments | None) -> np.ndarray:
        """The next ids (n,) of the streams in slots 0..n-1 (model.runtime.sampling.pick)."""
        n = len(ordered)
        filters = self.filters > 0
        return pick(logits, self.temperature[:n], self.top_k[:n] if filters else None, self.top_p[:n] if filters else None,
                    self._uniforms(ordered), self.min_p[:n] if self.min_ps else None, adjustments, self.greedy > 0)

    def _uniforms(self, ordered: list[Stream]) -> np.ndarray:
        """The next draw of every sampling stream in slots 0..n-1 (a greedy one's is stale: pick ignores it)."""
        n = len(ordered)
        taken = self.next_draw[:n]
        self.quiet -= 1
        if self.quiet < 0:
            for b in np.flatnonzero(taken == DRAWS_AHEAD).tolist():  # some stream has used its draws
                self.draws[b] = ordered[b]._rng.random(DRAWS_AHEAD)
                taken[b] = 0
            self.quiet = DRAWS_AHEAD - int(self.next_draw.max()) - 1  # over every slot: one not stepped now may be stepped next
        u = self.draws[self._rows[:n], taken]
        taken += self.samples[:n]
        return u


class SlotAdjustments:
    """The per-slot inputs of model.runtime.sampling's adjustments for max_batch slots, and their update
    after each step (one indexed add per count, no Python per stream)."""

    def __init__(self, max_batch: int, vocab_size: int):
        B, V = max_batch, vocab_size
        self.bias = np.zeros((B, V))
        self.repetition = np.ones(B)
        self.presence = np.zeros(B)
        self.frequency = np.zeros(B)
        self.generated = np.zeros((B, V), np.int32)
        self.recent = np.zeros((B, V), np.int32)
        self.window = np.zeros(B, np.int64)  # 0 where the repetition penalty is off: no ring kept
        self.ring = np.zeros((B, MAX_REPETITION_WINDOW), np.int32)  # slot b's character t at ring[b, t % MAX_REPETITION_WINDOW]
        self.seen = np.zeros(B, np.int64)  # characters put in the slot's ring so far
        self._rows = np.arange(B)

    def arrays(self) -> list[np.ndarray]:
        return [self.bias, self.repetition, self.presence, self.frequency, self.generated, self.recent,
                self.window, self.ring, self.seen]

    def set(self, slot: int, settings: SamplingSettings, prompt_ids: np.ndarray) -> None:
        """A new stream's settings, its counts from zero, its window filled from the prompt's end."""
        self.bias[slot] = 0.0
        for i, value in settings.logit_bias:
            if i < self.bias.shape[1]:  # an id beyond the vocabulary names no character
                self.bias[slot, i] = value
        self.presence[slot], self.frequency[slot] = settings.presence_penalty, settings.frequency_penalty
        self.generated[slot] = 0
        self.recent[slot] = 0
        w = settings.repetition_window if settings.repeats else 0
        self.repetition[slot], self.window[slot] = (settings.repetition_penalty if w else 1.0), w
        last = prompt_ids[max(0, len(prompt_ids) - w):] if w else prompt_ids[:0]
        self.ring[slot, : len(last)] = last
        self.seen[slot] = len(last)
        np.add.at(self.recent[slot], last, 1)

    def extend(self, slot: int, ids: list[int]) -> None:
        """Slot `slot` produced ids (a constraint's forced run) besides its step's pick."""
        for i in ids:
            self.generated[slot, i] += 1
            w = self.window[slot]
            if w:
                t = self.seen[slot]
                if t >= w:
                    self.recent[slot, self.ring[slot, (t - w) % MAX_REPETITION_WINDOW]] -= 1
                self.ring[slot, t % MAX_REPETITION_WINDOW] = i
                self.recent[slot, i] += 1
                self.seen[slot] += 1

    def view(self, n: int) -> Adjustments:
        return Adjustments(self.bias[:n], self.repetition[:n], self.recent[:n], self.presence[:n], self.frequency[:n],
                           self.generated[:n])

    def record(self, n: int, ids: np.ndarray) -> None:
        """Slots 0..n-1 produced ids (n,)."""
        rows = self._rows[:n]
        self.generated[rows, ids] += 1
        windowed = np.flatnonzero(self.window[:n])
        if len(windowed):
            new, w, t = ids[windowed], self.window[windowed], self.seen[windowed]
            full = t >= w  # the window's oldest character leaves it
            leaving = self.ring[windowed, (t - w) % MAX_REPETITION_WINDOW]
            self.recent[windowed[full], leaving[full]] -= 1
            self.ring[windowed, t % MAX_REPETITION_WINDOW] = new
            self.recent[windowed, new] += 1
            self.seen[windowed] += 1


class UnreadIds:
    """For max_batch slots, the ids picked for each slot's unchecked stream (no stop sequences, no
    logprobs) that the stream has not taken yet: the first count[b] of row b. The stream takes them
    when its text is read, and at the latest when its count reaches due[b] (a full row, or its
    max_chars). No slot reaches its due count for at least `quiet` more steps, so most steps look
    for none."""

    def __init__(self, max_batch: int):
        B = max_batch
        self.ids = np.zeros((B, UNREAD), np.int32)
        self.count = np.zeros(B, np.int64)
        self.counting = np.zeros(B, np.int64)  # 1 for an unchecked stream's slot, 0 for a checked one's (its count stays 0)
        self.due = np.zeros(B, np.int64)
        self.left = np.zeros(B, np.int64)  # characters the stream may generate after the ones it has taken
        self.quiet = 0
        self._rows = np.arange(B)

    def arrays(self) -> list[np.ndarray]:
        return [self.ids, self.count, self.counting, self.due, self.left]

    def set(self, slot: int, request: GenerationRequest) -> None:
        unchecked = not request.checked
        self.count[slot], self.counting[slot], self.left[slot] = 0, unchecked, request.max_chars
        self.due[slot] = min(UNREAD, request.max_chars) if unchecked else UNREAD
        self.quiet = min(self.quiet, int(self.due[slot]))

    def record(self, n: int, ids: np.ndarray) -> list[int]:
        """Slots 0..n-1 produced ids (n,); returns the unchecked ones now due."""
        count = self.count[:n]
        self.ids[self._rows[:n], count] = ids  # a checked slot's row is written at 0 and never read
        count += self.counting[:n]
        self.quiet -= 1
        return np.flatnonzero(count >= self.due[:n]).tolist() if self.quiet <= 0 else []

    def take(self, slot: int) -> list[int]:
        """The slot's unread ids, now read."""
        taken = self.ids[slot, : self.count[slot]].tolist()
        self.left[slot] -= len(taken)
        self.count[slot], self.due[slot] = 0, min(UNREAD, self.left[slot])
        return taken

    def rebase(self, slot: int, left: int) -> None:
        """The slot's stream, with no ids unread, may generate `left` more characters (it was given
        some directly: a forced run)."""
        self.left[slot] = left
        self.due[slot] = min(UNREAD, left)
        self.quiet = min(self.quiet, int(self.due[slot]))

    def settle(self, active: int) -> None:
        """After a step: if some slot was due, how long until the next is (slots 0..active-1)."""
        if self.quiet <= 0:
            self.quiet = int((self.due[:active] - self.count[:active]).min()) if active else UNREAD


class SlotConstraints:
    """For max_batch slots, each constrained slot's place in its constraint and its mask (made when
    the first constrained stream starts). A regex with a table keeps its place as a state number
    (`states`, its table in `tables`); any other constraint as llguidance's matcher (`matchers`),
    its mask in `allowed` (the characters that continue the match) and `accepting` (the text so
    far is a complete match). `blocked`, for every constrained slot, is what the sampler removes:
    neither a continuation nor, at a complete match, the end."""

    def __init__(self, max_batch: int, vocab_size: int):
        B, V = max_batch, vocab_size
        self.allowed = np.ones((B, V), bool)
        self.accepting = np.zeros(B, bool)
        self.blocked = np.zeros((B, V), bool)
        self.matchers = np.empty(B, object)  # None: a table's slot
        self.tabled = np.zeros(B, bool)
        self.tables = np.empty(B, object)
        self.states = np.zeros(B, np.int32)
        self.spent = np.zeros(B)  # seconds of llguidance's work for the slot's stream so far
        # llguidance's masks, a bit per token (the characters, then its end token) in 32-bit words
        self.mask_buffer = np.zeros((B, (V + 1 + 31) // 32 * 4), np.uint8)
        self.active_tables: dict[int, list] = {}  # id -> [table, active slots with it]
        self.guided = 0  # active slots with llguidance's matchers

    def arrays(self) -> list[np.ndarray]:
        return [self.allowed, self.accepting, self.blocked, self.matchers, self.tabled, self.tables, self.states, self.spent]

    def set(self, slot: int, matcher) -> None:
        """A new constrained stream in `slot`, at its matcher's start."""
        self.set_masks(slot, matcher.allowed, matcher.accepting)
        self.matchers[slot] = matcher._m
        self.tabled[slot] = matcher._m is None
        self.spent[slot] = 0.0
        if matcher._m is None:
            self.tables[slot], self.states[slot] = matcher.table, matcher.state
            self.active_tables.setdefault(id(matcher.table), [matcher.table, 0])[1] += 1
        else:
            self.guided += 1

    def free(self, last: int, matcher) -> None:
        """A stream has left (with `matcher`, or None when it had no constraint) and slot `last`, the
        last active one, is free (what it held moved to the stream's slot if it was another's)."""
        self.matchers[last] = self.tables[last] = None  # no finished stream's matcher kept alive
        if matcher is None:
            return
        if matcher._m is not None:
            self.guided -= 1
        else:
            entry = self.active_tables[id(matcher.table)]
            entry[1] -= 1
            if not entry[1]:
                del self.active_tables[id(matcher.table)]

    def set_masks(self, at, allowed: np.ndarray, accepting) -> None:
        """Slots `at` (a slot, a slice or a list) continue their matches with `allowed` (V,) or
        (k, V) bool, and are complete matches where `accepting`."""
        self.allowed[at], self.accepting[at] = allowed, accepting
        self.blocked[at] = ~(allowed | np.asarray(accepting)[..., None])

    def accepts(self, b: int) -> bool:
        """Whether slot b's text is a complete match."""
        return bool(self.tables[b].accepting[self.states[b]] if self.tabled[b] else self.accepting[b])


class Engine:
    def __init__(self, artifact: Artifact, max_batch: int = 128, threads: int | None = None, device: str = "cpu",
                 prompt_cache_bytes: int = 0):
        """`threads`: most threads one step uses (default: one per core); `device`: "cpu" or "cuda"
        (the CPU, with a warning, where ONNX Runtime has no CUDA); `prompt_cache_bytes`: the size
        of the prompt cache (0: none)."""
        if not whole_number(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        if not whole_number(prompt_cache_bytes) or prompt_cache_bytes < 0:
            raise ValueError(f"prompt_cache_bytes must be a whole number >= 0, got {prompt_cache_bytes!r}")
        if threads is not None and (not whole_number(threads) or threads < 1):
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
        self.vocab: Vocab = artifact.vocab
        self.max_batch = int(max_batch)
        self.network = network_step.load(artifact, self.max_batch, threads, device)
        if self.network.vocab_size != len(self.vocab):
            raise ValueError(f"the network predicts {self.network.vocab_size} characters but the vocabulary has {len(self.vocab)}")
        self._slots: list[Stream] = []  # slot i holds _slots[i]; active streams always fill 0..active-1
        self._slot_range = list(range(self.max_batch))
        self._sampling = SlotSampling(self.max_batch)
        self._logprobs = np.zeros(self.max_batch, np.int64)  # the logprobs each slot's request asks for
        self._wanting = 0  # active slots whose requests ask for logprobs
        self._adjustments: SlotAdjustments | None = None  # made when the first request that adjusts logits starts
        self._adjusting = 0  # active slots whose settings adjust logits
        self._ranked = np.zeros(self.max_batch, bool)  # the slot's request keeps the sum of its logprobs (rank)
        self._logprob_sum = np.zeros(self.max_batch)
        self._ranking = 0
        self._unread = UnreadIds(self.max_batch)
        self._checking = 0  # active slots whose streams check each character (stop sequences, logprobs)
        self._constrained = np.zeros(self.max_batch, bool)  # the slot's request has a constraint
        self._places: SlotConstraints | None = None  # made when the first constrained stream starts
        self._beside = _Beside()
        self._single_bytes = single_bytes(self.vocab.chars)  # a constrained step need only look at the first forced byte
        self._constraining = 0
        self.cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes else None
        # An empty prompt starts from the zero state as if after a newline (after the first
        # vocabulary character when the vocabulary has no newline): the model's start.
        self.start_id = self.vocab.index.get("\n", 0)
        self._empty_prompt = np.array([self.start_id], dtype=np.int64)
        self._after_empty: State | None = None

    @property
    def active(self) -> int:
        return len(self._slots)

    @property
    def streams(self) -> list[Stream]:
        """The running streams in slot order: the order in which step() takes them fastest."""
        return list(self._slots)

    def reading(self, request: GenerationRequest) -> PromptReading | None:
        """A reading ahead of the request's prompt, begun from its longest cached prefix (it may be
        finished already), where the prompt is longer than READ_PIECE and nothing asks for its
        scores; None otherwise (start reads it at once)."""
        if request.prompt_logprobs is not None:
            return None
        ids, dropped, boundaries = self._encode(request)
        if len(ids) <= READ_PIECE:
            return None
        reading = PromptReading(request, ids, dropped, boundaries)
        if self.cache is not None:  # looked up once: start() goes on from here
            reading.done, reading.state = self.cache.longest(ids)
            reading.cached = reading.done
        return reading

    def read_more(self, reading: PromptReading) -> None:
        """Read the next piece of the prompt (at most READ_PIECE characters, stopping at a cache_at
        position), keeping the state there in the prompt cache at those positions and at the end."""
        ids, cache = reading.ids, self.cache
        if reading.finished:
            return
        end = min(len(ids), reading.done + READ_PIECE, *[b for b in reading.boundaries if b > reading.done])
        reading.state = self.network.prompt(ids[reading.done:end], reading.state)
        reading.done = end
        if cache is not None and (end in reading.boundaries or end == len(ids)):
            cache.put(ids[:end], reading.state)

    def start(self, request: GenerationRequest, reading: PromptReading | None = None) -> Stream:
        """Read the prompt (from the prompt cache where it can, or on from `reading`, this
        request's) and take a batch slot; with max_chars 0 the stream is finished when this returns."""
        if reading is not None and reading.request is not request:
            raise ValueError("start() was given another request's reading")
        if not isinstance(request, GenerationRequest):
            raise ValueError(f"expected a GenerationRequest, got {type(request).__name__}")
        if max(request.logprobs, request.prompt_logprobs or 0) > len(self.vocab):
            raise ValueError(f"logprobs must be at most {len(self.vocab)} (the vocabulary size), got {request.logprobs}")
        if request.constraint is not None and request.constraint.chars != tuple(self.vocab.chars):
            raise ValueError("the request's constraint was compiled for another vocabulary")
        if self.active >= self.max_batch:
            raise EngineFull(f"all {self.max_batch} generation slots are busy")
        ids, dropped, boundaries = self._encode(request) if reading is None else (reading.ids, reading.dropped, reading.boundaries)
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        stream = Stream(request, int(seed), len(ids), dropped, owner=self)
        stream._slot = slot = len(self._slots)
        self._slots.append(stream)
        settings = request.sampling
        self._sampling.set(slot, settings)
        self._logprobs[slot] = request.logprobs
        self._wanting += request.logprobs > 0
        self._ranked[slot], self._logprob_sum[slot] = request.rank, 0.0
        self._ranking += request.rank
        self._unread.set(slot, request)
        self._checking += request.checked
        if settings.adjusts and self._adjustments is None:
            self._adjustments = SlotAdjustments(self.max_batch, len(self.vocab))
        if self._adjustments is not None:  # a slot's arrays are always its own stream's (neutral when it adjusts nothing)
            self._adjustments.set(slot, settings, ids)
        self._adjusting += settings.adjusts
        self._constrained[slot] = stream._matcher is not None
        if stream._matcher is not None:
            if self._places is None:
                self._places = SlotConstraints(self.max_batch, len(self.vocab))
            self._places.set(slot, stream._matcher)
            self._constraining += 1
        try:
            self.network.restore(slot, self._read(request, stream, ids, boundaries, reading))
        except BaseException:
            self._release(stream)
            raise
        if request.max_chars == 0:
            stream.finish_reason = "length"
            stream.incomplete = stream._matcher is not None and not stream._matcher.accepting
            self._release(stream)
        elif stream._matcher is not None and not stream._matcher.allowed.any() and not stream._matcher.accepting:
            # a constraint nothing can begin (a compile refuses those)
            stream.finish_reason, stream.incomplete = "stop", True
            self._release(stream)
        return stream

    def _encode(self, request: GenerationRequest) -> tuple[np.ndarray, int, list[int]]:
        """The prompt's ids, how many of its characters were dropped, and where (in ids) the
        request's cache_at positions fall. A prompt with cache_at is encoded piece by piece, with
        or without a cache, so its ids never depend on whether the engine has one."""
        if not request.cache_at:
            encoded = self.vocab.encode(request.prompt)
            return encoded.ids, encoded.dropped, []
        cuts = [0, *request.cache_at, len(request.prompt)]
        pieces = [self.vocab.encode(request.prompt[a:b]) for a, b in zip(cuts, cuts[1:])]
        ends = np.cumsum([len(p.ids) for p in pieces]).tolist()
        return np.concatenate([p.ids for p in pieces]), sum(p.dropped for p in pieces), ends[:-1]

    def _read(self, request: GenerationRequest, stream: Stream, ids: np.ndarray, boundaries: list[int],
              reading: PromptReading | None = None) -> State:
        """The state after the prompt: fed whole when it is scored, else resumed from its longest
        cached prefix (or where `reading` has got to); the cache keeps the states at its end and at
        the boundaries."""
        network, cache = self.network, self.cache
        if not len(ids):
            if self._after_empty is None:
                self._after_empty = network.prompt(self._empty_prompt)
            if request.prompt_logprobs is not None:
                stream.prompt_score = PromptScore([], np.zeros(0), np.zeros((0, 0), np.int64), np.zeros((0, 0)), self.vocab.chars)
            return self._after_empty
        if request.prompt_logprobs is not None:
            state, stream.prompt_score = self._score(ids, request.prompt_logprobs)
            if cache is not None:
                cache.put(ids, state)
            return state
        if cache is None and reading is None:
            return network.prompt(ids)
        hashes = cache.hashes(ids) if cache is not None else None
        if reading is not None:
            start, state, stream.cached_chars = reading.done, reading.state, reading.cached
        else:
            start, state = cache.longest(ids, hashes)
            stream.cached_chars = start
        for end in [b for b in boundaries if b > start] + [len(ids)]:
            if end > start:
                state = network.prompt(ids[start:end], state)
                if cache is not None:
                    cache.put(ids[:end], state, hashes)
                start = end
        return state

    def _score(self, ids: np.ndarray, k: int) -> tuple[State, PromptScore]:
        """Feed ids from the zero state in calls of PROMPT_CHUNK, taking each character's logprob
        from the prediction before it (and the k most likely alternatives)."""
        T = len(ids)
        logprobs, top_ids, top_logprobs = np.full(T, np.nan), np.zeros((T, k), np.int64), np.zeros((T, k))
        state = None
        for start in range(0, T, PROMPT_CHUNK):
            chunk = ids[start : start + PROMPT_CHUNK]
            logits, state = self.network.predict(chunk, state)  # row t predicts ids[start + t + 1]
            following = ids[start + 1 : start + 1 + len(chunk)]
            m = len(following)
            logp = log_softmax(logits[:m])  # (m, V) float64
            logprobs[start + 1 : start + 1 + m] = logp[np.arange(m), following]
            if k:
                order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
                top_ids[start + 1 : start + 1 + m] = order
                top_logprobs[start + 1 : start + 1 + m] = np.take_along_axis(logp, order, axis=1)
        chars = self.vocab.chars
        return state, PromptScore([chars[i] for i in ids.tolist()], logprobs, top_ids, top_logprobs, chars)

    def step(self, streams: list[Stream]) -> Deltas:
        """Advance every given unfinished stream by one character in one batched step; returns a
        Delta per stepped stream, in the order given."""
        if streams and streams == self._slots[: len(streams)]:  # slots 0..n-1 in order, all checked at once
            ordered, order = list(streams), None  # a copy: the Deltas read it later
        else:
            for s in streams:
                if s.__class__ is not Stream or s._owner is not self:
                    raise ValueError("step() was given a stream this engine did not start")
            batch = [s for s in streams if s.finish_reason is None]
            if len(set(map(id, batch))) != len(batch):
                raise ValueError("step() was given the same stream twice")
            if not batch:
                return Deltas([], np.zeros(0, np.int64), self.vocab.chars, {})
            ordered = self._to_front(batch)  # ordered[i] holds slot i
            order = [s._slot for s in batch]
        n = len(ordered)
        logits = self.network.logits[:n]
        adjustments = self._adjustments.view(n) if self._adjusting else None
        constrained = np.flatnonzero(self._constrained[:n]) if self._constraining else ()
        if len(constrained):  # what is sampled from, logprobs included
            blocked = self._places.blocked
            logits = mask_out(logits.astype(np.float64), constrained, blocked[:n] if len(constrained) == n else blocked[constrained])
        ids = self._sampling.pick(logits, ordered, adjustments)
        if self._adjusting:
            self._adjustments.record(n, ids)
        chars = self.vocab.chars
        # from the logits the characters were picked from, before the step replaces them
        if self._ranking:
            rows = np.flatnonzero(self._ranked[:n])
            self._logprob_sum[rows] += log_softmax(logits[rows])[np.arange(len(rows)), ids[rows]]
        if self._wanting:
            lps = {b: self._logprob(logits[b], int(ids[b]), self._logprobs[b]) for b in np.flatnonzero(self._logprobs[:n]).tolist()}
        made: dict[int, Delta] = {}  # the rows whose Deltas the step makes (and whose streams may finish)
        settle: list[int] = []
        due = self._unread.record(n, ids)  # before the constrained rows: one that ends takes its text back (_catch_up)
        if len(constrained) and len(constrained) - np.count_nonzero(self._places.tabled[constrained]) >= BESIDE_ROWS:  # their matchers advance while the network steps
            self._beside.start(self._advance, constrained, ordered, ids, lps if self._wanting else {})
            try:
                self.network.advance(n, ids)
            finally:
                made, settle = self._beside.result()
        else:
            self.network.advance(n, ids)
            if len(constrained):
                made, settle = self._advance(constrained, ordered, ids, lps if self._wanting else {})
        for b in settle:  # a forced run, a dead end or a limit reached: the matcher's own step
            made[b] = self._follow(b, ordered[b], int(ids[b]), lps.get(b) if self._wanting else None)
        if self._checking:
            checked = self._unread.counting[:n] == 0
            for b in np.flatnonzero(checked & ~self._constrained[:n]).tolist():  # stop sequences, logprobs
                made[b] = ordered[b].emit(chars[ids[b]], lps.get(b) if self._wanting else None)
        for b in due:  # unchecked streams whose slots are full or at max_chars
            if b in made:  # a constrained row, taken care of
                continue
            s = ordered[b]
            self._flush(s)
            if s.finish_reason is not None:
                if s._matcher is not None:
                    s.incomplete = not self._places.accepts(b)
                made[b] = Delta(s, chars[ids[b]], [], s.finish_reason)
        if made:
            for b in sorted(b for b, d in made.items() if d.finish_reason is not None):
                self._release(ordered[b])
        self._unread.settle(self.active)
        return Deltas(ordered, ids, chars, made, order)

    def _advance(self, rows: np.ndarray, ordered: list[Stream], ids: np.ndarray, lps: dict) -> tuple[dict, list[int]]:
        """The constrained streams in slots `rows` picked ids[rows]: advance their matchers (in the
        thread beside, while the network steps: nothing here touches the network). Returns the
        Deltas it made, by row, and the rows whose matchers must settle (`_follow`, after the
        network's step): a character refused (a limit reached), bytes forced where the vocabulary
        has characters of several bytes, or a forced run long enough for one prompt call. A regex
        with a table steps all its rows at once in the table's arrays; a row of llguidance's
        matcher costs two calls into it, the masks of all such rows unpacked at once. Only the
        rows with something to do are then looked at one by one (`_look`); the picks of the others
        wait in their slots as an unchecked stream's do."""
        made: dict[int, Delta] = {}
        settle: list[int] = []
        if self._places.guided:
            tabled = self._places.tabled[rows]
            tables, guided = rows[tabled], rows[~tabled]
        else:
            tables, guided = rows, rows[:0]
        if len(tables):
            self._step_tables(tables, ordered, ids, lps, made, settle)
        if len(guided):
            self._step_guided(guided, ordered, ids, lps, made, settle)
        return made, settle

    def _step_tables(self, rows: np.ndarray, ordered: list[Stream], ids: np.ndarray, lps: dict, made: dict, settle: list) -> None:
        """Rows of regexes with tables: each one's next state, all rows of a table at once, in a
        few indexed operations; a pick that leads nowhere is the model's "end here" at a complete
        match (the mask allows every character there)."""
        places = self._places
        if len(places.active_tables) == 1:  # usually one table
            groups = [(rows, next(iter(places.active_tables.values()))[0])]
        else:
            by_table: dict[int, tuple] = {}
            for b, table in zip(rows.tolist(), places.tables[rows].tolist()):
                by_table.setdefault(id(table), (table, []))[1].append(b)
            groups = [(np.array(r), table) for table, r in by_table.values()]
        counting = self._unread.counting
        for r, table in groups:
            at = slice(r[0], r[0] + len(r)) if r[-1] - r[0] == len(r) - 1 else r  # usually rows 0..k-1
            new = table.next[places.states[at], ids[at]]  # (k,)
            if new.min() < 0:
                self._end_here(r[new < 0].tolist(), ordered, made)
                keep = new >= 0
                r, new = r[keep], new[keep]
                at = r
            places.states[at] = new
            places.blocked[at] = table.blocked[new]
            look = table.special[new]
            if self._checking:
                look |= counting[at] == 0
            if look.any():
                for j in np.flatnonzero(look).tolist():
                    b, state = int(r[j]), int(new[j])
                    count, accepting = int(table.count[state]), bool(table.accepting[state])
                    self._look(b, ordered[b], int(ids[b]), lps, made, settle, count, accepting,
                               count == 1 and not accepting and table.forced[state] >= FORCED_RUN_CALL)

    def _step_guided(self, rows: np.ndarray, ordered: list[Stream], ids: np.ndarray, lps: dict, made: dict, settle: list) -> None:
        """Rows of llguidance's matchers: consume each pick, its mask written into one buffer and
        all unpacked at once; a row the matcher refuses, or whose mask is not the next character's
        (constraints.single_bytes), settles."""
        places = self._places
        if places.accepting[rows].any():  # at a complete match, the model may have picked "end here"
            going = places.allowed[rows, ids[rows]]
            self._end_here(rows[~going].tolist(), ordered, made)
            rows = rows[going]
        moving = []
        picks = ids.tolist()
        known, buffer, width = self._single_bytes, places.mask_buffer, places.mask_buffer.shape[1]
        at, spent, clock = buffer.ctypes.data, places.spent, time.perf_counter
        for b, matcher in zip(rows.tolist(), places.matchers[rows].tolist()):
            began = clock()
            if matcher.consume_token(picks[b]):
                forced = matcher.compute_ff_bytes()
                if not forced or (known is not None and known[forced[0]]):
                    matcher.unsafe_compute_mask_ptr(at + len(moving) * width, width)  # the mask's bits, into the buffer's next row
                    spent[b] += clock() - began
                    if spent[b] <= CONSTRAINT_SECONDS:
                        moving.append(b)
                        continue
            settle.append(b)
        if not moving:
            return
        k, V = len(moving), len(self.vocab)
        bits = np.unpackbits(buffer[:k], axis=1, count=V + 1, bitorder="little").view(bool)  # (k, V + 1): the characters, then the end token
        allowed, accepting = bits[:, :V], bits[:, V]  # the end token: a complete match, or a dead end (below)
        counts = np.count_nonzero(allowed, axis=1)
        for j in np.flatnonzero(counts == 0).tolist():  # llguidance allows the end token where nothing else goes
            accepting[j] = places.matchers[moving[j]].is_accepting()
        places.set_masks(slice(moving[0], moving[0] + k) if moving[-1] - moving[0] == k - 1 else moving, allowed, accepting)
        look = counts < 2
        if self._checking:
            look |= self._unread.counting[moving] == 0
        single = known is not None
        for j in np.flatnonzero(look).tolist():
            b, count, accepts = moving[j], int(counts[j]), bool(accepting[j])
            self._look(b, ordered[b], picks[b], lps, made, settle, count, accepts,
                       count == 1 and not accepts and single and len(places.matchers[b].compute_ff_bytes()) >= FORCED_RUN_CALL)

    def _end_here(self, rows: list[int], ordered: list[Stream], made: dict) -> None:
        """At a complete match, these rows picked a character that cannot continue it: the model
        chose to end there. The streams end with "stop", the character not emitted."""
        for b in rows:
            s = ordered[b]
            self._catch_up(b, s)
            s.incomplete = False
            made[b] = s.end("stop")

    def _look(self, b: int, s: Stream, i: int, lps: dict, made: dict, settle: list, count: int, accepting: bool, long: bool) -> None:
        """A constrained row with something to do after its pick `i`: `count` characters may come
        next (one and no end: forced, and `long` when the run is long enough for one prompt call;
        none: the match is complete, or a dead end), or it checks its characters (stop sequences,
        logprobs)."""
        stuck = False
        if count < 2:
            if long:
                settle.append(b)
                return
            stuck = count == 0
            if not stuck and self._unread.counting[b]:  # a short forced run: the mask has it
                return
            self._catch_up(b, s)
        delta = s.emit(self.vocab.chars[i], lps.get(b))
        made[b] = delta if delta.finish_reason is None and not stuck else self._emitted(s, delta, accepting, stuck)

    def _catch_up(self, b: int, s: Stream) -> None:
        """An unchecked stream about to be given characters directly this step (it ends, or a forced
        run follows): its text up to this step's pick, which record() put in its slot and which
        the caller gives it now."""
        if self._unread.counting[b]:
            self._unread.count[b] -= 1
            self._flush(s)

    def _follow(self, b: int, s: Stream, picked: int, logprob: CharLogprob | None) -> Delta:
        """After the stream's matcher took `picked`: settle it (forced run, dead end, a limit reached),
        feed a long forced run to the network in one call, emit, and end where the constraint says
        (the module docstring)."""
        m, chars, places = s._matcher, self.vocab.chars, self._places
        self._catch_up(b, s)
        began = time.perf_counter()
        if places.tabled[b]:
            m.state = int(places.states[b])
        m._settle()
        if m.error:  # a limit of the constraint's shared lexer: compile it afresh next time
            forget(s.request.constraint)
        elif not places.tabled[b] and places.spent[b] > CONSTRAINT_SECONDS:
            m.give_up(f"the constraint's work for this text passed its bound ({CONSTRAINT_SECONDS:g} s): the text ends here")
        run = m.forced(s.request.max_chars - s._generated - 1) if m.forced_length >= FORCED_RUN_CALL else []
        if places.tabled[b]:
            places.states[b] = m.state
        else:
            places.spent[b] += time.perf_counter() - began
        s.constraint_error = m.error or None
        if run:
            network = self.network
            network.restore(b, network.prompt(np.asarray(run, np.int64), network.state(b)))
            if self._adjustments is not None:
                self._adjustments.extend(b, run)
        lps = None
        if logprob is not None:
            lps = [logprob] + [CharLogprob(chars[i], 0.0, [(chars[i], 0.0)]) for i in run]
        places.set_masks(b, m.allowed, m.accepting)
        delta = self._emitted(s, s.emit_run([chars[picked]] + [chars[i] for i in run], lps), m.accepting, not m.allowed.any())
        if self._unread.counting[b] and s.finish_reason is None:
            self._unread.rebase(b, s.request.max_chars - s._generated)
        return delta

    def _emitted(self, s: Stream, delta: Delta, accepting: bool, stuck: bool) -> Delta:
        """A constrained stream's Delta, ended where the constraint says: `stuck` (no character of
        the vocabulary goes on) at a complete match (`accepting`) or at a dead end."""
        if delta.finish_reason == "stop":  # a stop sequence: the text is the generated text cut before it
            s.incomplete = not s.request.constraint.matches(s.text)
        elif delta.finish_reason == "length":
            s.incomplete = not accepting
        elif stuck:
            s.incomplete = not accepting
            end = s.end("stop")
            delta = Delta(s, delta.text + end.text, delta.logprobs + end.logprobs, "stop")
        return delta

    def _flush(self, s: Stream) -> None:
        """Give an unchecked stream the characters its slot holds for it."""
        if self._unread.count[s._slot]:
            chars = self.vocab.chars
            s.take("".join([chars[i] for i in self._unread.take(s._slot)]))

    def _logprob(self, logits: np.ndarray, chosen: int, k: int) -> CharLogprob:
        logp = log_softmax(logits)
        top = np.argsort(-logp, kind="stable")[:k]
        chars = self.vocab.chars
        # a constraint's disallowed characters (-inf) are no alternatives
        return CharLogprob(chars[chosen], float(logp[chosen]), [(chars[i], float(logp[i])) for i in top if logp[i] > -np.inf])

    def cancel(self, stream: Stream) -> None:
        """finish_reason = "cancelled"; frees the slot at once (held-back text is discarded)."""
        if stream._owner is not self:
            raise ValueError("cancel() was given a stream this engine did not start")
        if stream.finish_reason is None:
            stream.finish_reason = "cancelled"
            self._release(stream)
            if stream._matcher is not None:
                stream.incomplete = not stream.request.constraint.matches(stream.text)

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
        arrays = [*self._sampling.arrays(), self._logprobs, self._ranked, self._logprob_sum, self._constrained, *self._unread.arrays()]
        if self._places is not None:
            arrays += self._places.arrays()
        return arrays if self._adjustments is None else arrays + self._adjustments.arrays()

    def _release(self, s: Stream) -> None:
        self._flush(s)
        slot, last = s._slot, len(self._slots) - 1
        if s.request.rank:
            s.logprob_sum = float(self._logprob_sum[slot])
        if slot != last:
            moved = self._slots[last]
            self.network.copy(last, slot)
            for a in self._per_slot():
                a[slot] = a[last]
            self._slots[slot] = moved
            moved._slot = slot
        self._slots.pop()
        self._sampling.free(last, s.request.sampling)
        self._wanting -= s.request.logprobs > 0
        self._adjusting -= s.request.sampling.adjusts
        self._ranking -= s.request.rank
        self._checking -= s.request.checked
        self._constraining -= s._matcher is not None
        if self._places is not None:
            self._places.free(last, s._matcher)
        s._slot = -1
