"""The prompt-state cache: the recurrent state after a prompt, kept so that a later prompt that
starts with it resumes there and feeds only the rest (llama.cpp's cache_prompt, for a recurrent
network: an entry is the state of a few kilobytes and its key, whatever the prompt's length).

Keys are a prompt's character ids. `longest(ids)` finds the longest cached prefix of `ids`: every
prefix of `ids` has a 64-bit polynomial hash, computed for all of them at once with numpy (a running
sum of id * B^-t, mod 2^64), so a lookup is one dictionary probe per distinct cached length and a
comparison of the one candidate's ids (no hash collision can give a wrong state). Entries are kept
least recently used first and evicted beyond `max_bytes` (states, predictions and keys counted).

Exactness: feeding a prefix and then the rest from its state gives bit for bit the state of
feeding the whole in one call (ONNX Runtime's recurrent operators run position by position; tested
in tests/test_prompt_cache.py), so a cached prompt changes no text.

Not thread-safe: the engine that owns it is used by one thread.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np

from model.runtime.state import State

MIN_CHARS = 16  # shorter prompts cost one runtime call either way: not worth an entry
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2^64
_INVERSE = np.uint64(pow(int(_BASE), -1, 2**64))


@dataclass
class CacheStats:
    hits: int = 0  # prompts that resumed from a cached prefix
    misses: int = 0  # prompts that found none
    chars_saved: int = 0  # prompt characters not fed thanks to the cache
    stored: int = 0  # entries added


class PromptCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[int, int], tuple[np.ndarray, State, int]] = OrderedDict()  # (length, hash) -> (ids, state, bytes)
        self._lengths: Counter[int] = Counter()  # how many entries have each length
        self._powers = np.ones(1, np.uint64)  # _INVERSE ** t

    def __len__(self) -> int:
        return len(self._entries)

    def hashes(self, ids: np.ndarray) -> np.ndarray:
        """(T,) uint64: hashes[t - 1] is the hash of ids[:t]."""
        T = len(ids)
        if len(self._powers) < T:
            self._powers = np.cumprod(np.full(max(T, 2 * len(self._powers)), _INVERSE, np.uint64), dtype=np.uint64) * _BASE
        with np.errstate(over="ignore"):
            return np.cumsum((ids.astype(np.uint64) + np.uint64(1)) * self._powers[:T], dtype=np.uint64)

    def longest(self, ids: np.ndarray, hashes: np.ndarray | None = None) -> tuple[int, State | None]:
        """The longest cached prefix of `ids`: its length and state, or (0, None). Counts a hit or a
        miss (a prompt shorter than MIN_CHARS is neither: such prompts are not looked up)."""
        if len(ids) < MIN_CHARS:
            return 0, None
        if hashes is None:
            hashes = self.hashes(ids)
        for length in sorted((n for n in self._lengths if n <= len(ids)), reverse=True):
            key = (length, int(hashes[length - 1]))
            entry = self._entries.get(key)
            if entry is not None and np.array_equal(entry[0], ids[:length]):
                self._entries.move_to_end(key)
                self.stats.hits += 1
                self.stats.chars_saved += length
                return length, entry[1]
        self.stats.misses += 1
        return 0, None

    def put(self, ids: np.ndarray, state: State, hashes: np.ndarray | None = None) -> None:
        """Keep `state` as the state after `ids` (a prefix's hashes may be given: those of a longer text)."""
        length = len(ids)
        if length < MIN_CHARS:
            return
        if hashes is None:
            hashes = self.hashes(ids)
        key = (length, int(hashes[length - 1]))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        kept = ids.astype(np.uint8 if ids.max(initial=0) < 256 else np.uint16 if ids.max() < 65536 else np.int32)
        size = kept.nbytes + state.nbytes
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            (old_length, _), (_, _, old_size) = self._entries.popitem(last=False)
            self._forget(old_length, old_size)
        self._entries[key] = (kept, state, size)
        self._lengths[length] += 1
        self.bytes += size
        self.stats.stored += 1

    def _forget(self, length: int, size: int) -> None:
        self.bytes -= size
        self._lengths[length] -= 1
        if not self._lengths[length]:
            del self._lengths[length]

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.bytes = 0
