"""Constraints on generated text: a regex, a grammar (llama.cpp's GBNF) or a JSON schema, compiled to
an automaton over the model's characters, and each stream's state in it.

Every step of a character model picks exactly one character, so a constraint is an exact mask over
the vocabulary at each step: no token boundaries, no partial UTF-8. `compile_constraint` turns a
pattern into a `Constraint` (cached, bounded); `Constraint.start()` gives a stream its `Matcher`,
which says which characters may come next (`allowed`), whether the text so far is a complete match
(`accepting`), and takes the character picked (`advance`) together with the run of characters the
constraint then forces (only one character possible, repeatedly), which the engine can feed to the
network in one call.

The compiling is llguidance's (guidance-ai's Rust library, no torch): regexes (Rust's `regex`
syntax, which Python's `re` shares for everything but lookaround and backreferences, which it
refuses), Lark-like grammars (GBNF is translated by its own `gbnf_to_lark`) and JSON schemas, each to
a lexer built lazily from regex derivatives and an Earley parser, with limits on the work of the
build and of each step ("fuel"). outlines-core was the other candidate: it compiles a regex or a JSON
schema (through a regex) into a full index of states by tokens up front, which is what it is good at
for large BPE vocabularies, but it has no grammars at all (GBNF would have had to be written here),
and building the whole DFA up front is where patterns explode: `(a|b){1000}` is a thousand states
before the first character, and `[a-c]*a[a-c]{20}` (a DFA of about a million states) did not finish
within any bound a request could be given, where llguidance answers at once, as it builds states
only as the text reaches them (xgrammar, the third, needs torch). A vocabulary of single characters
is a valid tokenizer for llguidance (each character is the token of its UTF-8 bytes). What is
written here: the tokenizer, the bounded check that a
constraint admits a text of the model's characters (and which missing characters it needs), the
forced runs, and the cache; and beside it, model.runtime.regex_table: a regex whose automaton is
small is also built into a table of states (numbered, as llguidance's are not), so the engine steps
all the rows of a regex in a few array operations instead of two calls into a matcher a row
(outlines-core numbers its states, but builds them all at once with no bound on their number).

JSON is written as Python's `json.dumps` writes it by default (", " between items, ": " after keys,
no other whitespace): a character model learns one layout, and a fixed one lets the schema force
the punctuation.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from model.records.vocab import Vocab
from model.runtime import regex_table
from model.runtime.regex_table import RegexTable

KINDS = ("regex", "grammar", "json_schema")
MAX_SOURCE_CHARS = 65_536  # the longest pattern, grammar or schema (its JSON text) accepted
# Compiled constraints kept (by kind, source and vocabulary). A compiled constraint's lexer, shared by
# all its streams, grows as texts reach new states, up to LIMITS' max_lexer_states (llguidance puts
# a state at one to two kilobytes): this many of them bound a worker's memory for constraints.
CACHE_SIZE = 32
# What one compile may cost: the search for a text the constraint admits (each node one mask), and
# llguidance's own limits on the grammar, the lexer and each step.
SEARCH_WALKS = 16  # random walks first (they find a text fast where one exists)...
SEARCH_NODES = 1_000  # ...then a depth-first search (it proves that none exists where none does)
SEARCH_DEPTH = 256  # characters
SEARCH_SECONDS = 1.0  # a backstop only: the search gives up (the answer is unknown, not an error)
LIMITS = dict(max_grammar_size=100_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=10_000, max_items_in_row=2_000)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_EOS = b"<|end|>"  # the tokenizer's end token (llguidance needs one); never sampled, never allowed


class ConstraintError(ValueError):
    """A constraint that cannot be used, with a message fit for a client (HTTP 422): malformed (where),
    too big or too slow to compile, needing characters the vocabulary lacks (named), admitting no
    text at all, or one llguidance fails on (it panics on a few valid regexes, such as `(\\w|é)|\\w`).
    `reason` says which in one word: "malformed", "too_large", "too_complex", "missing_chars",
    "empty" or "unsupported"."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------------- tokenizer


class _Chars:
    """A vocabulary of single characters as llguidance's tokenizer: token i is chars[i]'s UTF-8 bytes,
    then the end token."""

    def __init__(self, chars: list[str]):
        self.tokens = [c.encode() for c in chars] + [_EOS]
        self.eos_token_id = len(chars)
        self.bos_token_id = None
        self.special_token_ids = [len(chars)]
        self._index = {c: i for i, c in enumerate(chars)}

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return [self._index[c] for c in text if c in self._index]


_tokenizers: OrderedDict[tuple[str, ...], llguidance.LLTokenizer] = OrderedDict()


def _tokenizer(chars: tuple[str, ...]) -> llguidance.LLTokenizer:
    with _lock:
        tok = _tokenizers.get(chars)
        if tok is None:
            tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Chars(list(chars))), slices=[])
            _tokenizers[chars] = tok
            while len(_tokenizers) > 16:
                _tokenizers.popitem(last=False)
        return tok


# ------------------------------------------------------------------------------------- constraint


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled constraint over one vocabulary; `start()` gives each stream its own Matcher."""

    kind: str  # "regex" | "grammar" | "json_schema"
    source: str  # canonical text (a JSON schema: compact, keys in their order)
    chars: tuple[str, ...]  # the vocabulary's characters, by id
    _grammar: str = field(repr=False)  # llguidance's grammar text
    _tokenizer: llguidance.LLTokenizer = field(repr=False)
    # A matcher at the start, never advanced: each stream's is a copy (a copy shares the compiled
    # grammar; a new matcher would compile it again). Made when the first stream needs it: a regex
    # with a table never does.
    _root: llguidance.LLMatcher | None = field(default=None, repr=False)
    # A regex's table (model.runtime.regex_table), where it has one: its streams step with it
    _table: RegexTable | None = field(default=None, repr=False)

    def start(self) -> Matcher | TableMatcher:
        return Matcher(self) if self._table is None else TableMatcher(self, 0)

    def _matcher(self) -> llguidance.LLMatcher:
        if self._root is None:  # two threads may both make one: either serves
            limits = llguidance.LLParserLimits(**LIMITS)
            object.__setattr__(self, "_root", llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0, limits=limits))
        return self._root.deep_copy()

    def matches(self, text: str) -> bool:
        """Whether `text` is a complete match (the checker the tests use beside Python's own)."""
        m = self._run(text)
        return m is not None and m.accepting

    def is_prefix(self, text: str) -> bool:
        """Whether `text` can be continued into a match (or is one)."""
        return self._run(text) is not None

    def _run(self, text: str) -> Matcher | TableMatcher | None:
        index = {c: i for i, c in enumerate(self.chars)}
        if any(c not in index for c in text):
            return None
        m = self.start()
        for c in text:
            if not m.allowed[index[c]]:
                return None
            m.advance(index[c], 0)
        return m


class Matcher:
    """One stream's place in its constraint: which characters may come next (`allowed`, (V,) bool),
    whether the text so far is a complete match (`accepting`). When neither holds, the stream is at a
    dead end (the constraint goes on only with characters the vocabulary lacks). These are the state's
    at the matcher's last `_settle`: the engine steps the usual character with the raw matcher and
    keeps the mask in its own arrays, settling the matcher where a character is forced or the
    stream ends."""

    __slots__ = ("constraint", "_m", "_ids", "allowed", "accepting", "error", "_forced")

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self._m = constraint._matcher()
        self._ids = {c: i for i, c in enumerate(constraint.chars)}
        self._settle()

    @property
    def forced_length(self) -> int:
        """How many characters are known to be forced from here."""
        return len(self._forced)

    def copy(self) -> Matcher:
        other = Matcher.__new__(Matcher)
        other.constraint, other._m, other._ids = self.constraint, self._m.deep_copy(), self._ids
        other.allowed, other.accepting, other.error, other._forced = self.allowed.copy(), self.accepting, self.error, list(self._forced)
        return other

    def forced(self, limit: int) -> list[int]:
        """Consume the run of characters forced from here (at most `limit`), returning their ids."""
        run: list[int] = []
        while self._forced and len(run) < limit:
            take = self._forced[: limit - len(run)]
            self._m.consume_tokens(take)  # a refusal (a limit reached) leaves the matcher in error: a dead end
            run += take
            self._settle()
        return run

    def advance(self, char_id: int, limit: int, min_run: int = 1) -> list[int]:
        """Take the picked character (one of `allowed`), then the forced run after it (at most
        `limit` characters) when at least `min_run` characters are known to be forced; returns the
        forced run's ids (empty: the next character is picked, forced or not)."""
        self._m.consume_token(char_id)  # a refusal (a limit reached) leaves the matcher in error: a dead end
        self._settle()
        return self.forced(limit) if len(self._forced) >= min_run else []

    def give_up(self, why: str) -> None:
        """End here: nothing may follow (a whole match stays one), `error` says why."""
        self.allowed[:] = False
        self._forced = []
        self.error = why

    def _settle(self) -> None:
        """Work out allowed, accepting and the forced run at the current state.

        llguidance's mask assumes the bytes it forces will be fed first (a tokenizer with byte
        tokens could always do so), so while it forces bytes the mask is not the next character's:
        the forced bytes are read instead, and only a whole character of the vocabulary is allowed."""
        m, V = self._m, len(self.constraint.chars)
        self.allowed = np.zeros(V, bool)
        self.accepting = False
        self._forced = []
        self.error = ""
        forced = m.compute_ff_bytes()
        if _failed(m):  # a limit on the work was reached (now or before): a dead end
            self.error = _first_line(m.get_error()) or "a limit on the constraint's work was reached"
            return
        if forced:
            self.accepting = False
            text, whole = _whole_chars(forced)
            ids = self._ids
            for c in text:
                if c not in ids:
                    break
                self._forced.append(ids[c])
            if self._forced:
                self.allowed[self._forced[0]] = True
            elif not text and not whole:  # forced bytes end inside a character: try each character
                for i in range(V):
                    if m.validate_tokens([i]) == 1:
                        self.allowed[i] = True
            return
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")
        if _failed(m):
            self.error = _first_line(m.get_error()) or "a limit on the constraint's work was reached"
            return
        self.allowed[:] = bits[:V].astype(bool)
        self.accepting = m.is_accepting()
        if not self.accepting and self.allowed.sum() == 1:  # one character possible: forced too
            self._forced = [int(np.flatnonzero(self.allowed)[0])]


class TableMatcher:
    """Matcher's interface over a regex's table: the stream's place is a state number. The engine
    steps a table stream's state in its own arrays (all rows of a table at once) and sets `state`
    here only where the matcher must settle (a forced run)."""

    __slots__ = ("constraint", "table", "state", "allowed", "accepting", "error")
    _m = None  # no llguidance matcher

    def __init__(self, constraint: Constraint, state: int):
        self.constraint, self.table, self.state, self.error = constraint, constraint._table, state, ""
        self._settle()

    @property
    def forced_length(self) -> int:
        return int(self.table.forced[self.state])

    def copy(self) -> TableMatcher:
        return TableMatcher(self.constraint, self.state)

    def forced(self, limit: int) -> list[int]:
        run: list[int] = []
        table, s = self.table, self.state
        while table.forced[s] and len(run) < limit:
            i = table.only(s)
            run.append(i)
            s = int(table.next[s, i])
        self.state = s
        self._settle()
        return run

    def advance(self, char_id: int, limit: int, min_run: int = 1) -> list[int]:
        s = int(self.table.next[self.state, char_id])
        if s < 0:
            raise ValueError(f"character id {char_id} cannot continue the match")
        self.state = s
        self._settle()
        return self.forced(limit) if self.forced_length >= min_run else []

    def _settle(self) -> None:
        self.allowed = self.table.allowed[self.state]
        self.accepting = bool(self.table.accepting[self.state])


def single_bytes(chars) -> np.ndarray | None:
    """Where every character is one UTF-8 byte, which bytes are characters ((256,) bool); None
    otherwise. With such a vocabulary, llguidance's mask is the next character's unless the first
    byte it forces is not a character: its mask is then the one after that byte (it assumes the byte
    will be fed first, as a tokenizer with byte tokens could), and at a dead end it allows the end
    token. Matcher._settle reads the forced bytes instead; the engine's step need only look at the
    first of them."""
    if any(len(c.encode()) != 1 for c in chars):
        return None
    known = np.zeros(256, bool)
    known[[ord(c) for c in chars]] = True
    return known


def _failed(m: llguidance.LLMatcher) -> bool:
    """Whether the matcher stopped on a limit or an internal error (an end of the text it allows,
    which llguidance also reports as an error, is not one)."""
    if not m.is_error():
        return False
    ends = ("NoExtension", "NoExtensionBias", "EndOfSentence")
    return m.stop_reason() not in ends and m.get_error().strip().split("\n")[0] not in ends


def _whole_chars(data: bytes) -> tuple[str, bool]:
    """The whole UTF-8 characters at the start of `data`, and whether that is all of it."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), cut == len(data)
        except UnicodeDecodeError:
            continue
    return "", False


def _first_line(message: str) -> str:
    """llguidance's message without its debugging dump; a regex parse error as "at character N: why"."""
    message = message.strip().split("\n<state>")[0].strip()
    if "regex parse error:" in message:
        lines = message.split("regex parse error:", 1)[1].split("\n")
        why = next((line.split("error:", 1)[1].strip() for line in lines if line.strip().startswith("error:")), "")
        caret = next((line for line in lines if line.strip() and set(line.strip()) <= {"^"}), "")
        where = f" at character {len(caret) - len(caret.lstrip()) - 3}" if caret else ""
        return f"invalid regex{where}: {why}" if why else message.split("\n")[0]
    return message.split("\n")[0]


# ------------------------------------------------------------------------------------- compiling

_lock = threading.Lock()
_cache: OrderedDict[tuple, Constraint] = OrderedDict()


def canonical(kind: str, source) -> str:
    """The text a constraint is cached by: the pattern or grammar itself, a JSON schema's compact
    JSON (keys in their order, which is the order its properties are written in)."""
    if kind not in KINDS:
        raise ConstraintError(f"constraint kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "json_schema":
        if isinstance(source, str):
            if len(source) > MAX_SOURCE_CHARS:
                raise ConstraintError(f"json_schema is too long: {len(source)} characters, at most {MAX_SOURCE_CHARS}", "too_large")
            try:
                source = json.loads(source)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
        if source is False:
            raise ConstraintError("json_schema false allows no value: nothing can be generated")
        if source is True:
            source = {}  # JSON Schema's true: any value, as the empty schema
        if not isinstance(source, dict):
            raise ConstraintError(f"json_schema must be a JSON object, got {type(source).__name__}")
        try:
            # keys in the schema's order: the properties are written in it
            text = json.dumps(source, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise ConstraintError(f"json_schema cannot be written as JSON: {e}") from None
    else:
        if not isinstance(source, str):
            raise ConstraintError(f"{kind} must be a string, got {type(source).__name__}")
        text = source
    if len(text) > MAX_SOURCE_CHARS:
        raise ConstraintError(f"{kind} is too long: {len(text)} characters, at most {MAX_SOURCE_CHARS}", "too_large")
    if kind == "regex" and not text:
        raise ConstraintError("regex is empty")
    return text


def forget(constraint: Constraint) -> None:
    """Drop a compiled constraint from the cache: its streams share its lexer, and one that reached a
    limit leaves the next ones stuck, so the next request compiles it afresh."""
    with _lock:
        for key in [k for k, v in _cache.items() if v is constraint]:
            del _cache[key]


def clear_cache() -> None:
    """Forget every compiled constraint (the benchmark's compile times start from nothing)."""
    with _lock:
        _cache.clear()


def compile_constraint(kind: str, source, vocab: Vocab) -> Constraint:
    """`source` (a regex; a GBNF grammar; a JSON schema as a dict or its JSON text) compiled over the
    vocabulary's characters. Raises ConstraintError with the reason when it is malformed, too big,
    needs characters the vocabulary lacks or admits no text. Cached (by kind, canonical source and
    vocabulary), so a pattern used again costs a dictionary look-up."""
    text = canonical(kind, source)
    chars = tuple(vocab.chars)
    key = (kind, text, chars)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    try:
        constraint = _compile(kind, text, chars)
    except BaseException as e:  # a Rust panic in llguidance comes as pyo3's PanicException, a BaseException
        if type(e).__name__ != "PanicException":
            raise
        raise ConstraintError(f"{kind} could not be compiled: llguidance, the library that compiles constraints, failed on it "
                              f"({_first_line(str(e))}); written another way, it may compile", "unsupported") from None
    with _lock:
        _cache[key] = constraint
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return constraint


def _grammar(kind: str, text: str, chars: tuple[str, ...]) -> str:
    """llguidance's grammar for the constraint. A regex is intersected with the vocabulary's
    characters (one lexeme, `pattern & [chars]*`), so its masks never lead where only characters the
    vocabulary lacks go on: a regex stream meets no dead end."""
    try:
        if kind == "regex":
            alone = llguidance.LLMatcher.grammar_from_regex(text)
            error = llguidance.LLMatcher.validate_grammar(alone)
            if error and not error.startswith("WARNING"):
                raise ConstraintError(f"regex is malformed: {_first_line(error)}")
            have = "".join(f"\\x{{{ord(c):x}}}" for c in chars)
            return llguidance.LLMatcher.grammar_from_lark(
                f"start: PATTERN\nPATTERN: /(?:{llguidance.regex_to_lark(text, '')})/ & /[{have}]*/\n")
        if kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=JSON_LAYOUT)
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(_gbnf_unicode_escapes(text)))
    except RecursionError:
        raise ConstraintError(f"{kind} is nested too deeply", "too_large") from None
    except ConstraintError:
        raise
    except Exception as e:  # the GBNF translator raises whatever its parser meets
        raise ConstraintError(f"{kind} is malformed: {e}") from None


_GBNF_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)


def _gbnf_unicode_escapes(grammar: str) -> str:
    """GBNF's \\uXXXX and \\UXXXXXXXX escapes as llguidance's translator reads them (it writes \\u0041
    as \\u41, which its own parser refuses): an ASCII character as \\xHH, any other as itself.
    Escapes are read in pairs from the left, so an escaped backslash before a u is left alone."""
    def one(m: re.Match) -> str:
        code = m.group(1)
        if len(code) == 1:
            return m.group(0)
        cp = int(code[1:], 16)
        if cp < 0x80:
            return f"\\x{cp:02x}"
        return m.group(0) if 0xD800 <= cp < 0xE000 or cp > 0x10FFFF else chr(cp)

    return _GBNF_ESCAPE.sub(one, grammar)


def _compile(kind: str, text: str, chars: tuple[str, ...]) -> Constraint:
    grammar = _grammar(kind, text, chars)
    limits = llguidance.LLParserLimits(**LIMITS)
    tok = _tokenizer(chars)
    error = llguidance.LLMatcher.validate_grammar(grammar, tok, limits=limits)
    if error and not error.startswith("WARNING"):
        reason = _first_line(error)
        if reason.startswith("invalid regex"):
            raise ConstraintError(f"{kind} is malformed: {reason}")
        big = any(w in reason.lower() for w in ("too many", "too large", "too big", "limit", "fuel"))
        raise ConstraintError(f"{kind} is {'too big' if big else 'malformed'}: {reason}", "too_large" if big else "malformed")
    constraint = Constraint(kind, text, chars, grammar, tok, _table=_table(text, chars) if kind == "regex" else None)
    try:
        found = _admits_text(constraint)
    except ConstraintError as e:
        raise ConstraintError(f"{kind} is too complex: {e}", "too_complex") from None
    if found is False:
        missing = _missing_chars(kind, text, chars)
        if missing:
            raise ConstraintError(f"{kind} needs characters the model's vocabulary lacks: "
                                  + ", ".join(repr(c) for c in missing), "missing_chars")
        raise ConstraintError(f"{kind} admits no text made of the model's characters", "empty")
    return constraint


def _table(text: str, chars: tuple[str, ...]) -> RegexTable | None:
    """The regex's table, where regex_table takes it (else llguidance's matcher serves the regex)."""
    try:
        table = regex_table.build(text, chars, lambda source: _class_mask(source, chars))
    except (regex_table.Unsupported, RecursionError):
        return None
    return table if table.states else None  # no text at all: llguidance's search says which characters it needs


@functools.lru_cache(maxsize=256)
def _class_mask(source: str, chars: tuple[str, ...]) -> int:
    """The characters (a bit per id) that one class of the regex syntax (`\\w`, `[^\\s,]`) matches, as
    llguidance reads it."""
    m = llguidance.LLMatcher(_tokenizer(chars), llguidance.LLMatcher.grammar_from_regex(source), log_level=0)
    if m.is_error():
        raise regex_table.Unsupported(f"the class {source}: {_first_line(m.get_error())}")
    return sum(1 << i for i in range(len(chars)) if m.validate_tokens([i]) == 1)


def _admits_text(constraint: Constraint) -> bool | None:
    """Whether some text of the vocabulary's characters is a complete match: True (one was found),
    False (every way was tried and none is), None (the search stopped at its bounds: unknown).
    Seeded random walks first (a depth-first search alone loops in the first `x*` it meets), then a
    depth-first search over the characters each state allows."""
    root = constraint.start()
    if root.error:
        raise ConstraintError(root.error)
    if not root.accepting and not root.allowed.any():  # nothing at all can begin
        return False
    deadline = time.monotonic() + SEARCH_SECONDS
    rng = np.random.default_rng(0)
    for _ in range(SEARCH_WALKS):
        m = constraint.start()
        walked = len(m.forced(SEARCH_DEPTH))
        while walked < SEARCH_DEPTH and not m.accepting and m.allowed.any() and not m.error:
            choices = np.flatnonzero(m.allowed)
            walked += 1 + len(m.advance(int(choices[rng.integers(len(choices))]), SEARCH_DEPTH - walked))
        if m.error:
            raise ConstraintError(m.error)
        if m.accepting:
            return True
        if time.monotonic() > deadline:
            return None
    budget = SEARCH_NODES
    root = constraint.start()
    stack = [(root, len(root.forced(SEARCH_DEPTH)))]
    exhaustive = True
    while stack:
        m, depth = stack.pop()
        if m.error:
            raise ConstraintError(m.error)
        if m.accepting:
            return True
        if depth >= SEARCH_DEPTH:
            exhaustive = False
            continue
        for i in np.flatnonzero(m.allowed)[::-1].tolist():
            if budget <= 0 or time.monotonic() > deadline:
                return None
            budget -= 1
            child = m.copy()
            run = child.advance(i, SEARCH_DEPTH - depth)
            stack.append((child, depth + 1 + len(run)))
    return False if exhaustive else None


def _missing_chars(kind: str, text: str, chars: tuple[str, ...]) -> list[str]:
    """The characters outside the vocabulary that a constraint admitting no text of the vocabulary
    needs, at most 16: along one path of the same constraint over the vocabulary plus every
    character the source names and printable ASCII, the ones it meets where the vocabulary has none
    it could use, and the ones the source names where the path could take them."""
    have = set(chars)
    extra = sorted({c for c in text if c not in have and unicodedata.category(c)[0] != "C"}
                   | {chr(i) for i in range(32, 127) if chr(i) not in have} | ({"\n"} - have))[:512]
    wide = chars + tuple(extra)
    constraint = Constraint(kind, text, wide, _grammar(kind, text, wide), _tokenizer(wide))
    # the characters the source names outside character classes (and a grammar's comments)
    named_text = re.sub(r"\[(?:\\.|[^\]\\])*\]", "", text)
    if kind == "grammar":
        named_text = re.sub(r"#[^\n]*", "", named_text)
    m = constraint.start()
    missing: list[str] = []
    for _ in range(SEARCH_DEPTH):
        if m.accepting or not m.allowed.any():
            break
        allowed = [wide[i] for i in np.flatnonzero(m.allowed).tolist()]
        usable = [c for c in allowed if c in have]
        lacking = [c for c in allowed if c not in have]
        named = [c for c in lacking if c in named_text]
        if not usable:  # the vocabulary stops here: these are needed
            missing += [c for c in lacking if c not in missing][:4]
            pick = min(lacking, key=lambda c: (c not in named_text, c.isspace(), c))
        elif named:  # a character the source names, which the vocabulary lacks: follow it
            pick = min(named)
            if pick not in missing:
                missing.append(pick)
        else:
            pick = usable[0]
        m.advance(wide.index(pick), 0)
        if len(missing) >= 16:
            break
    return missing[:16]
