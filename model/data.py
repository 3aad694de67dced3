"""Corpus text -> train/validation id arrays -> batches of windows for truncated BPTT.

Reading and checking a text needs no Keras, so the command line reports a bad file at once."""

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


# Bytes that do not occur in text files (NUL and the C0 controls other than tab, newline, vertical tab,
# form feed, carriage return, backspace and escape; and DEL): more than a few and it is data, not text.
_CONTROL = bytes([*range(0x00, 0x08), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
BINARY_CONTROL_FRACTION = 0.05  # random bytes have 10% of them; text in any 8-bit encoding ~0%


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text with newlines normalized and any byte-order mark removed. Every problem is a
    CorpusError naming `name`: empty, binary (so nobody is told to convert a zip with iconv), text in
    another encoding, not UTF-8."""
    if not data:
        raise CorpusError(f"{name}: the file is empty")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CorpusError(
            f"{name}: not UTF-8 text (byte 0x{data[0]:02x} at offset 0 is invalid): it starts with a UTF-16 "
            "byte-order mark; convert it first, e.g. `iconv -f utf-16 -t utf-8`"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{name}: a binary file, not text (a NUL byte at offset {nul})")
    control = len(data) - len(data.translate(None, _CONTROL))
    if control > BINARY_CONTROL_FRACTION * len(data):
        raise CorpusError(f"{name}: a binary file, not text ({control / len(data):.0%} of its bytes are control codes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} is invalid); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    return normalize_newlines(text.removeprefix("\ufeff"))


def decode_corpus(data: bytes, name: str) -> Corpus:
    text = decode_text(data, name)
    if len(text) < MIN_CORPUS_CHARS:
        raise CorpusError(f"{name}: only {len(text)} characters; at least {MIN_CORPUS_CHARS} are needed to train")
    return Corpus(name=name, text=text, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if path.is_dir():
        raise CorpusError(f"{path}: is a directory, expected a text file")
    return path.read_bytes()


def read_corpus(path: str | Path) -> Corpus:
    return decode_corpus(read_bytes(path), Path(path).name)


def read_text(path: str | Path) -> str:
    """Any UTF-8 text file (a text to score), checked as a corpus is but of any length."""
    return decode_text(read_bytes(path), str(path))


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

