"""What a generation is asked for, and the text it produces: requests, streams, deltas.

A Stream turns the characters the engine picks for it into emitted text, one `emit` per character:
it counts them against max_chars, holds back any tail that could begin a stop sequence until that
is decided, ends before the first stop sequence completed (the stop text is never emitted), and
keeps each held character's logprob beside it. A request with no stop sequences and no logprobs
has nothing to check per character: the engine keeps its characters and hands them over in bulk
(`take`, when its text is read, when it finishes, or every so many steps), and a step's Deltas are
made only when they are read, so a step costs no Python per stream for it. Nothing here knows about
slots, batches or networks.

A request may also ask for its prompt to be scored (`prompt_logprobs`: each prompt character's
logprob given the characters before it, in a PromptScore), for nothing to be generated
(max_chars 0: the prompt is read, and scored if asked, and the stream ends at once), and for the
sum of its generated characters' logprobs (`rank`: best_of picks the choices with the highest mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.runtime.constraints import Constraint
from model.runtime.sampling import SamplingSettings


def whole_number(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class GenerationRequest:
    """One generation, already validated where it came from (the HTTP schemas, the command line):
    the checks here are cheap assertions for code that builds requests, not user-facing
    validation, and there are no defaults for what a user sets."""

    prompt: str
    max_chars: int
    sampling: SamplingSettings
    seed: int | None = None  # None: the engine draws one; the one used is Stream.seed
    stop: tuple[str, ...] = ()  # ends *before* the first occurrence; the stop text is not emitted
    logprobs: int = 0  # 0: none; k > 0: per emitted char its logprob and the top-k alternatives
    prompt_logprobs: int | None = None  # None: the prompt is not scored; k >= 0: scored, with k alternatives per char
    cache_at: tuple[int, ...] = ()  # prompt positions (in characters) whose states the prompt cache should keep too
    rank: bool = False  # keep Stream.logprob_sum, the sum of the generated characters' logprobs
    constraint: Constraint | None = None  # the text must match it (model.runtime.constraints); Stream.incomplete says if it does not yet

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not whole_number(self.max_chars) or self.max_chars < 0:
            raise ValueError(f"max_chars must be a whole number >= 0, got {self.max_chars!r}")
        if not isinstance(self.sampling, SamplingSettings):
            raise ValueError(f"sampling must be a SamplingSettings, got {type(self.sampling).__name__}")
        if self.seed is not None and (not whole_number(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if isinstance(self.stop, str):
            raise ValueError("stop must be a list of strings, not a single string")
        self.stop = tuple(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop sequences must be non-empty strings, got {s!r}")
        if not whole_number(self.logprobs) or self.logprobs < 0:
            raise ValueError(f"logprobs must be a whole number >= 0, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not whole_number(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise ValueError(f"prompt_logprobs must be None or a whole number >= 0, got {self.prompt_logprobs!r}")
        self.cache_at = tuple(self.cache_at)
        if any(not whole_number(b) or not 0 < b < len(self.prompt) for b in self.cache_at) or list(self.cache_at) != sorted(set(self.cache_at)):
            raise ValueError(f"cache_at must be increasing positions inside the prompt, got {self.cache_at!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be a Constraint (compile_constraint), got {type(self.constraint).__name__}")

    @property
    def checked(self) -> bool:
        """Each generated character is checked (stop sequences) or reported (logprobs) as it comes. A
        constraint alone is not: the engine checks every pick against it, and keeps the picks of
        a stream with nothing else to check like any unchecked stream's."""
        return bool(self.stop or self.logprobs)


@dataclass
class CharLogprob:
    char: str
    logprob: float  # natural log of the probability the model gave it (raw model distribution)
    top: list[tuple[str, float]]  # the k most likely characters and their logprobs (raw model distribution)


@dataclass
class PromptScore:
    """A prompt's characters as the model read them (after the unknown-character rule) and the
    log-probability of each given the ones before it (the raw model distribution). The first
    character is not predicted: the text starts with it (as `chargen evaluate` scores a text), so
    logprobs[0] is NaN."""

    chars: list[str]
    logprobs: np.ndarray  # (T,) float64
    top_ids: np.ndarray  # (T, k) int64: the k most likely characters at each position (row 0 unused)
    top_logprobs: np.ndarray  # (T, k) float64
    alphabet: list[str]  # the vocabulary's characters, by id (top_ids index it)

    def alternatives(self, t: int) -> list[tuple[str, float]]:
        """The most likely characters at position t >= 1, with their logprobs."""
        return [(self.alphabet[i], v) for i, v in zip(self.top_ids[t].tolist(), self.top_logprobs[t].tolist())]

    @property
    def scored(self) -> int:
        return max(len(self.chars) - 1, 0)

    @property
    def nats(self) -> float:
        """The sum of -logprob over the scored characters."""
        return float(-self.logprobs[1:].sum())


class Stream:
    """One generation in progress: its request, its seeded generator and the text it has emitted.

    `_owner`, `_slot` and `_rng` belong to the engine that runs the stream: which engine, which
    batch slot, and the generator its draws come from (seeded with `seed`). While the stream runs,
    reading `text` or `generated` asks the engine for the characters it still holds for the
    stream (`_owner._flush`): read them on the engine's thread, or once the stream has finished.
    """

    def __init__(self, request: GenerationRequest, seed: int, prompt_chars: int, dropped_chars: int, owner=None):
        self.request = request
        self.seed = seed
        self.prompt_chars = prompt_chars  # prompt characters actually fed
        self.dropped_chars = dropped_chars  # prompt characters outside the vocabulary that were dropped
        self.finish_reason: str | None = None  # "length" | "stop" | "cancelled" once finished
        # With a constraint: whether the text is not (yet) a complete match, once the stream has
        # finished (then it is a prefix of one); False without a constraint.
        self.incomplete = False
        self.constraint_error: str | None = None  # why a limit on the constraint's work ended the text there
        self._generated = 0  # characters given to the stream so far (emitted, held back, or part of a stop sequence)
        self.logprob_sum = 0.0  # of the characters sampled so far, when the request asks (rank); set when it finishes
        self.prompt_score: PromptScore | None = None  # when the request asks (prompt_logprobs)
        self.cached_chars = 0  # prompt characters resumed from the prompt cache instead of fed
        self._owner = owner
        self._slot = -1
        self._rng = np.random.default_rng(seed)
        self._emitted: list[str] = []
        self._held = ""  # generated characters that may begin a stop sequence
        self._held_logprobs: list[CharLogprob] = []
        self._matcher = request.constraint.start() if request.constraint is not None else None  # the engine advances it
        self._stop_prefixes = {s[:k] for s in request.stop for k in range(1, len(s))}
        self._longest_prefix = max((len(s) for s in request.stop), default=1) - 1

    @property
    def generated(self) -> int:
        """Characters sampled so far (emitted, held back, or part of a stop sequence)."""
        if self._slot >= 0:
            self._owner._flush(self)
        return self._generated

    @property
    def text(self) -> str:
        """Text emitted so far (never contains a stop sequence)."""
        if self._slot >= 0:
            self._owner._flush(self)
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    def emit(self, char: str, logprob: CharLogprob | None = None) -> Delta:
        """Take the next generated character (with its logprob when the request asks for them) and
        return what it releases; sets finish_reason when this character ends the stream."""
        self._generated += 1
        request = self.request
        finish = "length" if self._generated >= request.max_chars else None
        if not request.stop:  # the common case: the character is the text
            self._emitted.append(char)
            self.finish_reason = finish
            return Delta(self, char, [] if logprob is None else [logprob], finish)
        held = self._held + char
        lps = [] if logprob is None else self._held_logprobs + [logprob]
        # Any stop sequence completed now ends at this character and starts inside `held` (held is
        # the longest suffix that could begin one); the one that starts earliest is the longest.
        hit = max((len(stop) for stop in request.stop if held.endswith(stop)), default=0)
        if hit:
            finish, keep = "stop", 0
            held = held[:-hit]
        else:
            keep = 0 if finish else self._held_length(held)  # at max_chars everything held is released
        cut = len(held) - keep
        text, self._held = held[:cut], held[cut:]
        lps, self._held_logprobs = lps[:cut], lps[cut:]
        if text:
            self._emitted.append(text)
        self.finish_reason = finish
        return Delta(self, text, lps, finish)

    def emit_run(self, chars: list[str], logprobs: list[CharLogprob] | None) -> Delta:
        """emit() each character in turn (the picked one and a forced run after it) as one Delta;
        stops at the character that finishes the stream."""
        first = self.emit(chars[0], logprobs[0] if logprobs else None)
        if len(chars) == 1 or first.finish_reason:
            return first
        text, lps = [first.text], list(first.logprobs)
        for k in range(1, len(chars)):
            d = self.emit(chars[k], logprobs[k] if logprobs else None)
            text.append(d.text)
            lps += d.logprobs
            if d.finish_reason:
                break
        return Delta(self, "".join(text), lps, self.finish_reason)

    def end(self, reason: str) -> Delta:
        """Finish now (a constraint's match is complete): what is held back for a possible stop
        sequence is released, as no stop sequence completed."""
        text, lps = self._held, self._held_logprobs
        self._held, self._held_logprobs = "", []
        if text:
            self._emitted.append(text)
        self.finish_reason = reason
        return Delta(self, text, lps, reason)

    def take(self, text: str) -> None:
        """Take generated characters of a request with no stop sequences and no logprobs (nothing to
        check, or a constraint the engine has checked them against: they are its text; their Deltas
        were returned by the steps that picked them)."""
        self._generated += len(text)
        self._emitted.append(text)
        if self._generated >= self.request.max_chars:
            self.finish_reason = "length"

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins a stop sequence."""
        for k in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-k:] in self._stop_prefixes:
                return k
        return 0

    def __repr__(self) -> str:
        return f"<Stream seed={self.seed} finish_reason={self.finish_reason}>"  # reads nothing from the engine


@dataclass(slots=True)
class Delta:
    stream: Stream
    text: str  # newly emitted characters ("" while a possible stop sequence is held back)
    logprobs: list[CharLogprob] = field(default_factory=list)  # one per character of text
    finish_reason: str | None = None  # set on the step that finishes the stream


class Deltas(Sequence):
    """What one step released: a Delta per stream stepped, in the order they were given. The
    Deltas of streams that check their characters (`made`, by row) are made by the step; the
    others (the row's character, and no logprobs) when first read."""

    __slots__ = ("_streams", "_ids", "_chars", "_made", "_order", "_list")

    def __init__(self, streams: list[Stream], ids: np.ndarray, chars: list[str], made: dict[int, Delta],
                 order: list[int] | None = None):
        """streams[b] picked chars[ids[b]]; order: for each stream as given, its row (None: row order)."""
        self._streams, self._ids, self._chars, self._made, self._order = streams, ids, chars, made, order
        self._list: list[Delta] | None = None

    def _deltas(self) -> list[Delta]:
        if self._list is None:
            chars, made = self._chars, self._made
            rows = zip(self._streams, self._ids.tolist())
            if made:
                deltas = [made.get(b) or Delta(s, chars[i]) for b, (s, i) in enumerate(rows)]
            else:
                deltas = [Delta(s, chars[i]) for s, i in rows]
            self._list = deltas if self._order is None else [deltas[b] for b in self._order]
        return self._list

    def __getitem__(self, i):
        return self._deltas()[i]

    def __iter__(self):
        return iter(self._deltas())  # Sequence's own __iter__ calls __getitem__ once per item

    def __len__(self) -> int:
        return len(self._streams)

    def __eq__(self, other) -> bool:
        return self._deltas() == list(other) if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return repr(self._deltas())
