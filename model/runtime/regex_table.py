"""A regex as a table over the model's characters: every state of its automaton numbered, and for
each state the state each character leads to, which characters continue a match and whether the
text so far is one. With the table, a step advances all of a batch's rows of one regex in a few
indexed array operations (model.runtime.engine), instead of two calls into llguidance's matcher a
row; llguidance still checks and compiles every regex first (model.runtime.constraints), and serves
the ones the table does not take.

The table is built up front from Brzozowski derivatives (the derivative of a regex by a character
is the regex of what may follow it; the distinct derivatives, with alternatives kept as sets, are
the automaton's states), one derivative per class of characters the regex cannot tell apart. It
is built only for a pattern in the common part of the regex syntax (literals, escapes of
punctuation, `\\n \\t \\r \\f \\v`, `.`, classes with ranges and negation, `\\d \\w \\s` and their
negations, groups, `(?:...)` and named groups, `|`, `* + ? {m} {m,} {m,n}` and their lazy forms,
which match the same texts), and only while it stays small (MAX_CELLS, MAX_SECONDS): a pattern
whose automaton explodes (`[a-c]*a[a-c]{20}`) or uses anything else (anchors, flags, `\\p{..}`,
classes inside classes) is left to llguidance, which builds its states lazily as texts reach them.
The two give the same masks (tests/test_constraints.py walks both side by side).

What each class of the regex means (`[...]`, `\\w` and the like) is llguidance's, asked character by
character, where it is not plain (a set of characters and ranges): the two cannot disagree on what
`\\w` is. Characters the vocabulary lacks are left out of every class, so a state from which only
such characters go on is no state at all: a regex stream meets no dead end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The most cells (states x characters) a table may have; more, and llguidance's matcher serves the
# pattern. A table takes 6 bytes a cell (next, allowed, blocked): with constraints.CACHE_SIZE tables cached,
# 50 MB at most.
MAX_CELLS = 262_144
MAX_SECONDS = 0.25  # the most a table's build may add to a compile
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
_CLASS_ESCAPES = set("dwsDWS")  # evaluated by llguidance: Unicode's classes, as the regex syntax defines them


class Unsupported(Exception):
    """The pattern is outside what the table takes (syntax, or too many states): llguidance serves it."""


@dataclass(frozen=True, eq=False)
class RegexTable:
    """States 0..S-1 (0 the start). `next[s, c]` is the state character c leads to from s (-1: it
    cannot continue a match), `allowed` is `next >= 0`, `accepting[s]` whether reaching s completes
    a match, `count[s]` how many characters continue from s, `forced[s]` how many characters follow
    from s with no choice (one character allowed and s not a complete match), one after another."""

    next: np.ndarray  # (S, V) int32
    allowed: np.ndarray  # (S, V) bool
    accepting: np.ndarray  # (S,) bool
    count: np.ndarray  # (S,) int64
    forced: np.ndarray  # (S,) int64
    blocked: np.ndarray  # (S, V) bool: what the sampler removes at s (neither allowed nor, at a complete match, the end)
    special: np.ndarray  # (S,) bool: fewer than two characters allowed (a forced character, or a match nothing extends)

    @property
    def states(self) -> int:
        return len(self.accepting)

    def only(self, state: int) -> int:
        """The one character allowed at `state` (forced[state] > 0)."""
        return int(np.flatnonzero(self.allowed[state])[0])


def build(pattern: str, chars: tuple[str, ...], class_mask: Callable[[str], int]) -> RegexTable:
    """The table of `pattern` (a regex llguidance has already accepted) over `chars`.
    `class_mask(source)` is the set of character ids (a bit each) matching one class written in
    the regex's syntax (`[a-z\\d]`, `\\w`), as llguidance reads it. Raises Unsupported."""
    deadline = time.monotonic() + MAX_SECONDS
    max_states = MAX_CELLS // max(1, len(chars))
    nodes = _Nodes()
    root = _Parser(pattern, chars, class_mask, nodes, deadline).parse()
    representative, class_of = _classes(nodes.sets, len(chars))  # one character of each class, and each character's class
    state_of = {root: 0} if root != EMPTY else {}
    order = [root] if root != EMPTY else []
    rows: list[list[int]] = []
    for node in order:  # grows as new states are found
        row = []
        for ch in representative:
            child = nodes.derive(node, ch)
            if child == EMPTY:
                row.append(-1)
                continue
            s = state_of.get(child)
            if s is None:
                if len(order) >= max_states:
                    raise Unsupported(f"more than {max_states} states")
                s = state_of[child] = len(order)
                order.append(child)
            row.append(s)
        rows.append(row)
        if time.monotonic() > deadline:
            raise Unsupported(f"took more than {MAX_SECONDS} s")
    S = len(order)
    by_class = np.array(rows, np.int32).reshape(S, len(representative))
    nxt = by_class[:, class_of] if S else np.zeros((0, len(chars)), np.int32)
    allowed = nxt >= 0
    accepting = np.array([nodes.nullable(n) for n in order], bool)
    count = allowed.sum(axis=1)
    forced = np.array(_forced_lengths(((count == 1) & ~accepting).tolist(), nxt.max(axis=1).tolist()), np.int64)
    blocked = ~(allowed | accepting[:, None])
    special = count < 2
    for a in (nxt, allowed, accepting, count, forced, blocked, special):
        a.setflags(write=False)
    return RegexTable(nxt, allowed, accepting, count, forced, blocked, special)


def _forced_lengths(single: list[bool], after: list[int]) -> list[int]:
    """How many characters follow each state with no choice: a state with one character allowed and
    no complete match (`single`) leads to `after`. Such runs never loop (a loop of them would never
    complete a match, and every state can), so each is followed once to where it ends."""
    length = [-1] * len(single)
    for s in range(len(single)):
        path = []
        while length[s] < 0 and single[s]:
            path.append(s)
            s = after[s]
            if len(path) > len(single):
                raise Unsupported("a loop of forced states")
        n = max(length[s], 0)
        if length[s] < 0:
            length[s] = 0
        for t in reversed(path):
            n += 1
            length[t] = n
    return length


def _classes(sets: set[int], V: int) -> tuple[list[int], np.ndarray]:
    """The coarsest partition of the character ids that no set splits: a representative of each
    part, and each id's part."""
    if not sets:
        return [0], np.zeros(V, np.int64)
    width = (V + 7) // 8
    masks = np.frombuffer(b"".join(m.to_bytes(width, "little") for m in sets), np.uint8).reshape(len(sets), width)
    member = np.unpackbits(masks, axis=1, count=V, bitorder="little")  # (sets, V): which characters each set has
    _, first, class_of = np.unique(member.T, axis=0, return_index=True, return_inverse=True)
    return first.tolist(), class_of.reshape(V)


# ------------------------------------------------------------------------------------- regexes as numbered nodes

EMPTY, EPS = 0, 1  # no text; the empty text


class _Nodes:
    """Regexes as numbered, shared nodes: ("set", mask) a character of the set (bit i: id i),
    ("cat", a, b), ("alt", (ids...)) sorted and without repeats, ("star", a), ("rep", a, m, n) a
    repeated m to n times (n None: unbounded). The constructors simplify (nothing, the empty text,
    nested concatenations and alternatives), which keeps the derivatives finitely many."""

    def __init__(self):
        self.ops: list[tuple] = [("empty",), ("eps",)]
        self._id: dict[tuple, int] = {op: i for i, op in enumerate(self.ops)}
        self._nullable: list[bool] = [False, True]
        self._derived: dict[tuple[int, int], int] = {}
        self.sets: set[int] = set()

    def _make(self, op: tuple, nullable: bool) -> int:
        i = self._id.get(op)
        if i is None:
            i = self._id[op] = len(self.ops)
            self.ops.append(op)
            self._nullable.append(nullable)
        return i

    def nullable(self, a: int) -> bool:
        return self._nullable[a]

    def charset(self, mask: int) -> int:
        if not mask:
            return EMPTY
        self.sets.add(mask)
        return self._make(("set", mask), False)

    def cat(self, a: int, b: int) -> int:
        if a == EMPTY or b == EMPTY:
            return EMPTY
        if a == EPS:
            return b
        if b == EPS:
            return a
        op = self.ops[a]
        if op[0] == "cat":  # (xy)z is x(yz): one form for each concatenation
            return self.cat(op[1], self.cat(op[2], b))
        return self._make(("cat", a, b), self._nullable[a] and self._nullable[b])

    def alt(self, parts) -> int:
        flat: set[int] = set()
        mask = 0
        for p in parts:
            op = self.ops[p]
            if op[0] == "alt":
                flat.update(op[1])
            elif op[0] == "set":
                mask |= op[1]
            elif p != EMPTY:
                flat.add(p)
        if mask:  # the characters of all the alternatives' sets in one set
            for p in [p for p in flat if self.ops[p][0] == "set"]:
                mask |= self.ops[p][1]
                flat.discard(p)
            flat.add(self.charset(mask))
        if not flat:
            return EMPTY
        if len(flat) == 1:
            return next(iter(flat))
        items = tuple(sorted(flat))
        return self._make(("alt", items), any(self._nullable[p] for p in items))

    def star(self, a: int) -> int:
        if a in (EMPTY, EPS):
            return EPS
        if self.ops[a][0] == "star":
            return a
        return self._make(("star", a), True)

    def rep(self, a: int, m: int, n: int | None) -> int:
        if a == EPS or n == 0:
            return EPS
        if a == EMPTY:
            return EPS if m == 0 else EMPTY
        if self._nullable[a]:  # empty rounds make up the minimum
            m = 0
        if n is None and m == 0:
            return self.star(a)
        if m == n == 1:
            return a
        return self._make(("rep", a, m, n), m == 0)

    def derive(self, a: int, ch: int) -> int:
        """The regex of what may follow character id `ch` in a match of `a`."""
        key = (a, ch)
        d = self._derived.get(key)
        if d is None:
            d = self._derived[key] = self._derive(a, ch)
        return d

    def _derive(self, a: int, ch: int) -> int:
        op = self.ops[a]
        kind = op[0]
        if kind == "set":
            return EPS if (op[1] >> ch) & 1 else EMPTY
        if kind == "cat":
            first = self.cat(self.derive(op[1], ch), op[2])
            return self.alt((first, self.derive(op[2], ch))) if self._nullable[op[1]] else first
        if kind == "alt":
            return self.alt([self.derive(p, ch) for p in op[1]])
        if kind == "star":
            return self.cat(self.derive(op[1], ch), a)
        if kind == "rep":
            _, r, m, n = op
            return self.cat(self.derive(r, ch), self.rep(r, max(m - 1, 0), None if n is None else n - 1))
        return EMPTY  # empty, eps


# ------------------------------------------------------------------------------------- the syntax taken


class _Parser:
    """Recursive descent over the part of the regex syntax the table takes (the module docstring);
    anything else raises Unsupported. The pattern is one llguidance has accepted, so what is taken
    here is well formed there."""

    def __init__(self, text: str, chars: tuple[str, ...], class_mask: Callable[[str], int], nodes: _Nodes, deadline: float):
        self.text, self.at, self.nodes, self._class_mask, self.deadline = text, 0, nodes, class_mask, deadline
        self.index = {c: i for i, c in enumerate(chars)}
        self.all = (1 << len(chars)) - 1

    def parse(self) -> int:
        node = self._alternation()
        if self.at != len(self.text):
            raise Unsupported(f"unexpected {self.text[self.at]!r} at character {self.at}")
        return node

    def class_mask(self, source: str) -> int:
        """class_mask(source), within the build's time (each asks llguidance: a millisecond or two)."""
        if time.monotonic() > self.deadline:
            raise Unsupported(f"took more than {MAX_SECONDS} s")
        return self._class_mask(source)

    def _peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""

    def _alternation(self) -> int:
        parts = [self._concatenation()]
        while self._peek() == "|":
            self.at += 1
            parts.append(self._concatenation())
        return self.nodes.alt(parts)

    def _concatenation(self) -> int:
        items = []
        while self._peek() not in ("", "|", ")"):
            items.append(self._quantified(self._atom()))
        node = EPS
        for item in reversed(items):
            node = self.nodes.cat(item, node)
        return node

    def _quantified(self, node: int) -> int:
        while True:
            c = self._peek()
            if c == "*":
                m, n = 0, None
                self.at += 1
            elif c == "+":
                m, n = 1, None
                self.at += 1
            elif c == "?":
                m, n = 0, 1
                self.at += 1
            elif c == "{":
                m, n = self._counts()
            else:
                return node
            if self._peek() == "?":  # lazy: the same texts match
                self.at += 1
            node = self.nodes.rep(node, m, n)

    def _counts(self) -> tuple[int, int | None]:
        end = self.text.find("}", self.at)
        inside = self.text[self.at + 1 : end] if end > 0 else ""
        low, comma, high = inside.partition(",")
        if end < 0 or not low.isdigit() or (high and not high.isdigit()):
            raise Unsupported(f"repetition {{{inside}}}")
        if not comma:
            high = low
        self.at = end + 1
        m, n = int(low), (int(high) if high else None)
        if n is not None and n < m:
            raise Unsupported(f"repetition {{{inside}}}")
        return m, n

    def _atom(self) -> int:
        c = self._peek()
        if c == "(":
            self.at += 1
            if self.text.startswith("?:", self.at):
                self.at += 2
            elif self.text.startswith("?P<", self.at) or self.text.startswith("?<", self.at):
                end = self.text.find(">", self.at)
                if end < 0:
                    raise Unsupported("group name")
                self.at = end + 1
            elif self._peek() == "?":
                raise Unsupported("flags or lookaround")
            node = self._alternation()
            if self._peek() != ")":
                raise Unsupported("unclosed group")
            self.at += 1
            return node
        if c == "[":
            return self._class()
        if c == ".":
            self.at += 1
            return self.nodes.charset(self.all & ~self._bit("\n"))
        if c == "\\":
            return self._escape()
        if c in ("^", "$", "*", "+", "?", "{", ")", "|"):
            raise Unsupported(f"{c!r} at character {self.at}")
        self.at += 1
        return self.nodes.charset(self._bit(c))

    def _bit(self, c: str) -> int:
        i = self.index.get(c)
        return 0 if i is None else 1 << i

    def _escape(self) -> int:
        e = self.text[self.at + 1 : self.at + 2]
        if e in _CLASS_ESCAPES:
            self.at += 2
            return self.nodes.charset(self.class_mask("\\" + e))
        c, self.at = self._char(self.at)
        return self.nodes.charset(self._bit(c))

    def _char(self, i: int) -> tuple[str, int]:
        """The character written at i (itself, or an escape of punctuation or of n, t, r, f, v) and
        where the next one begins."""
        c = self.text[i]
        if c != "\\":
            return c, i + 1
        e = self.text[i + 1 : i + 2]
        if e in _ESCAPES:
            return _ESCAPES[e], i + 2
        if e and not e.isalnum() and e.isascii() and not e.isspace():
            return e, i + 2
        raise Unsupported(f"escape \\{e}")

    def _class(self) -> int:
        """A class `[...]`: plain characters, ranges and escapes of punctuation are read here; one
        with \\d, \\w or \\s inside is given whole to class_mask. Nested classes, set operations
        (`&&`, `--`, `~~`) and a "-" neither first, last nor in a range are not taken."""
        text, start = self.text, self.at
        i = start + 1
        negated = text.startswith("^", i)
        i += negated
        members: list[tuple[str, str]] = []  # ranges, first and last
        whole = False
        while True:
            if i >= len(text):
                raise Unsupported("unclosed class")
            if text[i] == "]" and (members or whole):  # a "]" first is itself
                break
            if text[i] == "[" or text.startswith(("&&", "--", "~~"), i):
                raise Unsupported("a class inside a class, or a set operation")
            if text[i] == "\\" and text[i + 1 : i + 2] in _CLASS_ESCAPES:
                whole = True
                i += 2
                continue
            if text[i] == "-" and members and text[i + 1 : i + 2] != "]":
                raise Unsupported("a '-' neither first, last nor in a range")
            low, i = self._char(i)
            high = low
            if text.startswith("-", i) and text[i + 1 : i + 2] not in ("]", ""):
                if text[i + 1] == "[":
                    raise Unsupported("a class inside a class")
                high, i = self._char(i + 1)
                if high < low:
                    raise Unsupported("a range backwards")
            members.append((low, high))
        self.at = i + 1
        if whole:
            return self.nodes.charset(self.class_mask(text[start : self.at]))
        mask = 0
        for ch, k in self.index.items():
            if any(low <= ch <= high for low, high in members):
                mask |= 1 << k
        return self.nodes.charset(self.all & ~mask if negated else mask)
