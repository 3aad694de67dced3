"""The character vocabulary: encode, decode, unknown characters, to and from JSON.

Rule for characters the model never saw (the same everywhere: prompts, `chargen evaluate`, the API):
a character outside the vocabulary is replaced by its unaccented base form when the vocabulary has
that (é -> e, ﬁ -> f), otherwise it is dropped. Callers are told how many characters were dropped.
Newlines are normalized first (\\r\\n and \\r become \\n), as `chargen prepare` does for corpora.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass

import numpy as np

from model.records.files import parse_json


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # (T,) int32
    dropped: int  # characters outside the vocabulary with no known base form


class Vocab:
    def __init__(self, chars: list[str] | str):
        chars = list(chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"vocabulary entries must be single characters, got {c!r}")
            if "\ud800" <= c <= "\udfff":  # JSON's "\ud800" is one; no UTF-8 text holds one, nor can encode it
                raise ValueError(f"vocabulary entry {i} is {c!r}, a lone surrogate (half of a UTF-16 pair), "
                                 "not a character")
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary has duplicate characters")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, char: str) -> bool:
        return char in self.index

    def encode(self, text: str) -> Encoded:
        """Ids of `text` under the unknown-character rule in the module docstring."""
        ids, dropped = [], 0
        for c in normalize_newlines(text):
            i = self.index.get(c)
            if i is None:
                base = unicodedata.normalize("NFKD", c)[:1]
                i = self.index.get(base)
            if i is None:
                dropped += 1
            else:
                ids.append(i)
        return Encoded(np.asarray(ids, dtype=np.int32), dropped)

    def encode_exact(self, text: str) -> np.ndarray:
        """Ids of a text made only of known characters (a training corpus)."""
        try:
            return np.fromiter((self.index[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    # ---------------------------------------------------------------- JSON

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars}, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        data = parse_json(text)
        if not isinstance(data, dict) or not isinstance(data.get("chars"), list):
            raise ValueError('expected a JSON object {"chars": [...]}')
        return cls(data["chars"])
