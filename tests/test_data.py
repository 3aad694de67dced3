"""Corpus reading, the train/validation split, training windows and validation streams."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from model.data import (MIN_CORPUS_CHARS, CorpusError, decode_corpus, epoch_windows, random_windows,
                        read_corpus, split_ids, streams)


def test_read_corpus_normalizes_newlines_and_hashes_the_bytes(tmp_path):
    data = ("line one\r\nline two\rline three\n" * 20).encode()
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbf" + data)  # with a byte-order mark
    corpus = read_corpus(path)
    assert corpus.name == "c.txt"
    assert "\r" not in corpus.text and not corpus.text.startswith("\ufeff")
    assert corpus.text.startswith("line one\nline two\nline three\n")
    assert corpus.sha256 == hashlib.sha256(b"\xef\xbb\xbf" + data).hexdigest()
    assert corpus.size_bytes == len(data) + 3
    assert corpus.describe() == {"name": "c.txt", "size_bytes": len(data) + 3, "chars": len(corpus.text),
                                 "sha256": corpus.sha256}


@pytest.mark.parametrize("data, problem", [
    (b"", "empty"),
    (b"caf\xe9 au lait " * 40, "not UTF-8 text (byte 0xe9 at offset 3 is invalid); convert it first, e.g. `iconv"),
    ("text".encode("utf-16") * 100, "UTF-16 byte-order mark; convert it first, e.g. `iconv -f utf-16"),
    (b"text\x00with nul " * 40, "a binary file, not text (a NUL byte at offset 4)"),
    (bytes(range(1, 256)) * 4, "a binary file, not text (10% of its bytes are control codes)"),  # no NUL, not UTF-8
    (b"\x01\x02\x03 valid UTF-8 but mostly control codes " * 20, "a binary file, not text"),
    (b"short", f"only 5 characters; at least {MIN_CORPUS_CHARS}"),
])
def test_bad_corpora_give_clear_errors(tmp_path, data, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(CorpusError) as e:
        read_corpus(path)
    assert problem in str(e.value) and "bad.txt" in str(e.value)
    if "binary" in problem:
        assert "iconv" not in str(e.value)


def test_text_with_escape_codes_tabs_and_form_feeds_is_text(tmp_path):
    path = tmp_path / "log.txt"
    path.write_bytes(b"\x1b[1mbold\x1b[0m\tcolumn\x0cpage\r\n" * 30)
    assert read_corpus(path).text.startswith("\x1b[1mbold\x1b[0m\tcolumn\x0cpage\n")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_corpus(tmp_path / "absent.txt")
    with pytest.raises(CorpusError, match="is a directory"):
        read_corpus(tmp_path)


def test_decode_corpus_counts_characters_not_bytes():
    corpus = decode_corpus(("é" * MIN_CORPUS_CHARS).encode(), "accents")
    assert len(corpus.text) == MIN_CORPUS_CHARS and corpus.size_bytes == 2 * MIN_CORPUS_CHARS


@pytest.mark.parametrize("n, fraction", [(1000, 0.1), (1001, 0.1), (997, 0.25), (200, 0.5)])
def test_split_keeps_the_last_part_for_validation(n, fraction):
    ids = np.arange(n, dtype=np.int32)
    split = split_ids(ids, fraction)
    assert len(split.train) + len(split.validation) == n
    assert abs(len(split.validation) - n * fraction) <= 1
    # contiguous: the first part trains, the last part validates, nothing shared or lost
    assert split.train.tolist() == list(range(len(split.train)))
    assert split.validation.tolist() == list(range(len(split.train), n))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_refuses_impossible_fractions(fraction):
    with pytest.raises(ValueError, match="validation fraction"):
        split_ids(np.arange(10), fraction)


def test_windows_are_true_next_character_targets():
    ids = np.arange(500, dtype=np.int32)  # position == value, so offsets are visible
    x, y = random_windows(ids, seq_len=20, count=64, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (64, 20)
    assert (np.diff(x, axis=1) == 1).all()  # each window is a contiguous run of the text
    assert (y == x + 1).all()  # the target at every position is the character that follows it
    assert x.min() >= 0 and y.max() <= 499


def test_epoch_windows_cover_the_text_once_in_whole_batches():
    ids = np.arange(10_000, dtype=np.int32) % 50
    x, y = epoch_windows(ids, seq_len=100, batch_size=16, seed=1, epoch=0)
    assert x.shape == (96, 100)  # 10,000 // 100 = 100 windows, rounded down to whole batches of 16
    # tiny texts still give one batch
    x, _ = epoch_windows(ids[:300], seq_len=100, batch_size=16, seed=1, epoch=0)
    assert x.shape == (16, 100)


def test_epoch_windows_are_reproducible_from_seed_and_epoch():
    ids = np.arange(5_000, dtype=np.int32)
    a = epoch_windows(ids, 50, 8, seed=7, epoch=3)
    b = epoch_windows(ids, 50, 8, seed=7, epoch=3)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    other_epoch = epoch_windows(ids, 50, 8, seed=7, epoch=4)[0]
    other_seed = epoch_windows(ids, 50, 8, seed=8, epoch=3)[0]
    assert not (a[0] == other_epoch).all()
    assert not (a[0] == other_seed).all()


def test_streams_are_contiguous_rows():
    ids = np.arange(10_000, dtype=np.int32)
    rows = streams(ids, n_streams=8)
    assert rows.shape == (8, 1250)
    assert rows.reshape(-1).tolist() == list(range(10_000))
    # short texts use fewer, longer streams (at least min_len characters of context each)
    assert streams(ids[:1000], n_streams=8, min_len=512).shape == (1, 1000)
    assert streams(ids[:10], n_streams=8).shape == (1, 10)
