"""Corpus text -> train/validation id arrays -> batches of windows for truncated BPTT."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.vocab import normalize_newlines

MIN_CORPUS_CHARS = 200  # below this there is nothing to learn and nothing to validate on


class CorpusError(ValueError):
    """A corpus file that cannot be trained on; the message says why."""


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str  # newlines normalized
    sha256: str  # of the file's bytes as read
    size_bytes: int

    def describe(self) -> dict:
        return {"name": self.name, "size_bytes": self.size_bytes, "chars": len(self.text), "sha256": self.sha256}


def decode_corpus(data: bytes, name: str) -> Corpus:
    if not data:
        raise CorpusError(f"{name}: the file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} is invalid); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    text = normalize_newlines(text.removeprefix("\ufeff"))
    if "\x00" in text:
        raise CorpusError(f"{name}: contains NUL characters; this looks like a binary file, not text")
    if len(text) < MIN_CORPUS_CHARS:
        raise CorpusError(f"{name}: only {len(text)} characters; at least {MIN_CORPUS_CHARS} are needed to train")
    return Corpus(name=name, text=text, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def read_corpus(path: str | Path) -> Corpus:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if path.is_dir():
        raise CorpusError(f"{path}: is a directory, expected a text file")
    return decode_corpus(path.read_bytes(), path.name)


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # (N_train,) int32
    validation: np.ndarray  # (N_val,) int32
    validation_fraction: float


def split_ids(ids: np.ndarray, validation_fraction: float) -> Split:
    """The conventional char-rnn / nanoGPT split: the first part trains, the last part validates."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation fraction must be between 0 and 1, got {validation_fraction}")
    n_train = int(len(ids) * (1.0 - validation_fraction))
    return Split(ids[:n_train], ids[n_train:], validation_fraction)


def random_windows(ids: np.ndarray, seq_len: int, count: int, rng: np.random.Generator):
    """`count` windows at random offsets: inputs (count, seq_len) and next-char targets (count, seq_len)."""
    starts = rng.integers(0, len(ids) - seq_len, size=count)
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (count, seq_len + 1)
    windows = ids[index]
    return windows[:, :-1], windows[:, 1:]


def epoch_windows(ids: np.ndarray, seq_len: int, batch_size: int, seed: int, epoch: int):
    """One epoch: as many windows as cover the training text once, drawn with a per-epoch seed so a
    resumed run sees exactly the batches the uninterrupted one would have."""
    count = max(batch_size, (len(ids) // seq_len) // batch_size * batch_size)
    rng = np.random.default_rng([seed, epoch])
    return random_windows(ids, seq_len, count, rng)


def streams(ids: np.ndarray, n_streams: int, min_len: int = 512) -> np.ndarray:
    """Cut a text into at most `n_streams` contiguous equal rows (B, T) of at least `min_len`
    characters where the text allows, dropping the remainder at the end. Each row is scored as one
    long stream with the recurrent state carried through it."""
    n_streams = max(1, min(n_streams, len(ids) // min_len))
    length = len(ids) // n_streams
    return ids[: n_streams * length].reshape(n_streams, length)

