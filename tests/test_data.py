"""Corpus reading (whole and in chunks), finding the files of a corpus, the token file and its reuse,
the train/validation split, training windows by step and validation samples."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc

import numpy as np
import pytest

from model.training import data
from model.training.data import (MIN_CORPUS_CHARS, SOURCES, TOKENS, CorpusError, TextDecoder, TokenCorpus, Windows,
                        decode_corpus, decode_text, find_sources, prepared, read_corpus, sample_pieces, sample_text,
                        scan, split_ids, streams, write_tokens)
from model.training.prepare import KnownCorpus
from model.records.vocab import Vocab


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


# ---------------------------------------------------------------- decoding in chunks


def feed_in(data: bytes, size: int, name: str = "f.txt") -> str:
    decoder = TextDecoder(name)
    return "".join(decoder.feed(data[i : i + size]) for i in range(0, len(data), size)) + decoder.finish()


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 10_000])
def test_text_fed_in_chunks_of_any_size_is_the_whole_text(size):
    """Chunk boundaries fall inside multi-byte characters, between \\r and \\n, inside the byte-order
    mark: the text is the same as decoding the file at once."""
    data = "\ufeffé\r\nça va\r\rß – 日本語 😀\r".encode() + "x\r\ny€\n".encode() * 50 + b"end\r"
    whole = decode_text(data, "f.txt")
    assert "\r" not in whole and not whole.startswith("\ufeff") and whole.endswith("end\n")
    assert whole.startswith("é\nça va\n\nß – 日本語 😀\nx\ny€\n")
    assert feed_in(data, size) == whole


@pytest.mark.parametrize("data, size, problem", [
    (b"a" * 100 + b"\xff" + b"b" * 100, 7, "not UTF-8 text (byte 0xff at offset 100 is invalid)"),
    (b"a" * 99 + "é".encode() + b"\x80" + b"c" * 300, 10, "not UTF-8 text (byte 0x80 at offset 101 is invalid)"),
    (b"a" * 300 + "é".encode()[:1], 16, "not UTF-8 text (byte 0xc3 at offset 300 is invalid)"),  # ends inside a character
    (b"a" * 300 + b"\x00", 64, "a NUL byte at offset 300"),
])
def test_errors_in_later_chunks_name_their_offset_in_the_file(data, size, problem):
    with pytest.raises(CorpusError, match="f.txt") as e:
        feed_in(data, size)
    assert problem in str(e.value)


# ---------------------------------------------------------------- finding the files


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_a_directory_gives_its_files_sorted_with_include_and_exclude(tmp_path):
    root = tmp_path / "src"
    for name in ["b.py", "a.py", "pkg/c.py", "pkg/d.txt", "tests/t.py", ".hidden.py", ".git/x.py", "empty.py"]:
        write(root / name, "" if name == "empty.py" else f"# {name}\n")
    found = find_sources([str(root)], downloads=tmp_path / "dl")
    assert [f.name for f in found.files] == [f"{root}/{n}" for n in ["a.py", "b.py", "pkg/c.py", "pkg/d.txt", "tests/t.py"]]
    assert found.label == "src/ (5 files)"
    found = find_sources([str(root)], include=["*.py"], exclude=["tests/*"], downloads=tmp_path / "dl")
    assert [f.path.name for f in found.files] == ["a.py", "b.py", "c.py"]
    with pytest.raises(CorpusError, match="no non-empty files matching --include/--exclude"):
        find_sources([str(root)], include=["*.rs"], downloads=tmp_path / "dl")


def test_several_files_and_held_out_files_go_last(tmp_path):
    files = [str(write(tmp_path / f"part-{i}.txt", f"text {i}\n")) for i in range(4)]
    found = find_sources(files, validation_files=["part-1.txt"], downloads=tmp_path)
    assert [f.path.name for f in found.files] == ["part-0.txt", "part-2.txt", "part-3.txt", "part-1.txt"]
    assert [f.held_out for f in found.files] == [False, False, False, True]
    assert found.label == "part-0.txt + part-1.txt + part-2.txt + part-3.txt"
    with pytest.raises(CorpusError, match="matches none of the 4 corpus files"):
        find_sources(files, validation_files=["*.md"], downloads=tmp_path)
    with pytest.raises(CorpusError, match="matches all 4 corpus files, leaving none to train on"):
        find_sources(files, validation_files=["part-*"], downloads=tmp_path)


def test_held_out_files_by_their_path_inside_a_corpus_folder(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    write(root / "a.txt", "text a\n")
    write(root / "sub" / "b.txt", "text b\n")
    for glob in ("sub/*", "sub/b.txt", "texts/sub/*", "b.txt", "*/b.txt"):
        found = find_sources([str(root)], validation_files=[glob], downloads=tmp_path)
        assert [(f.path.name, f.held_out) for f in found.files] == [("a.txt", False), ("b.txt", True)], glob
    with pytest.raises(CorpusError, match="matches none"):
        find_sources([str(root)], validation_files=["ub/*"], downloads=tmp_path)


def test_missing_unknown_and_twice_given_sources(tmp_path, monkeypatch):
    manifest = {"speech": KnownCorpus("speech", "hamlet.txt", "http://127.0.0.1:9/h.txt", "ab" * 32, 10)}
    with pytest.raises(CorpusError, match=r"absent.txt: no such file or directory \(nor the name of a known corpus: speech\)"):
        find_sources([str(tmp_path / "absent.txt")], downloads=tmp_path, manifest=manifest)
    one = write(tmp_path / "one.txt", "x" * 300)
    with pytest.raises(CorpusError, match="given twice"):
        find_sources([str(one), str(tmp_path / "." / "one.txt")], downloads=tmp_path, manifest=manifest)
    # a known corpus: the copy `chargen prepare speech` leaves in the current directory, else downloaded later
    found = find_sources(["speech"], downloads=tmp_path / "dl", manifest=manifest)
    assert found.files[0].url and found.files[0].path == tmp_path / "dl" / "hamlet.txt"
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "hamlet.txt", "To be, or not to be\n" * 20)
    found = find_sources(["speech"], downloads=tmp_path / "dl", manifest=manifest)
    assert found.files[0].url is None and found.files[0].sha256 == "ab" * 32
    with pytest.raises(CorpusError, match="sha256 is .*, not the abab.* of the known corpus"):
        scan(found)


def test_a_directory_follows_linked_directories_once(tmp_path):
    # corpus/books -> /data/books was skipped without a word; a link back up the tree must not loop
    books = tmp_path / "data" / "books"
    write(books / "a.txt", "a book of words\n" * 20)
    root = tmp_path / "corpus"
    write(root / "own.txt", "my own words\n" * 20)
    (root / "books").symlink_to(books)
    (root / "up").symlink_to(root)  # a loop
    (root / "again").symlink_to(books)  # the same directory by a second name: read once
    found = find_sources([str(root)], downloads=tmp_path / "dl")
    assert [f.name for f in found.files] == [f"{root}/own.txt", f"{root}/again/a.txt"]


def test_a_directory_skips_links_to_its_own_files_and_binary_files(tmp_path):
    """Debian's fortunes: each text has a `.u8` link to it and a binary `.dat` index beside it."""
    root = tmp_path / "fortunes"
    for name in ("art", "cookie", "zen"):
        write(root / name, f"{name} fortune\n%\n" * 20)
        (root / f"{name}.u8").symlink_to(name)
        (root / f"{name}.dat").write_bytes(b"\x00\x00\x00\x02" + bytes(range(1, 40)))
    (root / "0-first").symlink_to("zen")  # a link that comes before its file: the file is kept
    write(tmp_path / "elsewhere.txt", "a text only a link leads to\n" * 10)
    (root / "outside").symlink_to(tmp_path / "elsewhere.txt")
    found = find_sources([str(root)], downloads=tmp_path / "dl")
    assert [f.name for f in found.files] == [f"{root}/{n}" for n in ["art", "cookie", "outside", "zen"]]
    assert found.label == "fortunes/ (4 files)"
    assert found.skipped == (
        f"{root}: skipped 4 links to files already in the corpus (0-first -> zen, art.u8 -> art, "
        "cookie.u8 -> cookie and 1 more)",
        f"{root}: skipped 3 binary files (art.dat, cookie.dat, zen.dat)")
    assert scan(found).length > MIN_CORPUS_CHARS  # every file left is text

    # a link to a file given by name gives way to it; the same file named twice is still an error
    elsewhere = str(tmp_path / "elsewhere.txt")
    found = find_sources([str(root), elsewhere], downloads=tmp_path / "dl")
    assert [f.name for f in found.files] == [*(f"{root}/{n}" for n in ["art", "cookie", "zen"]), elsewhere]
    assert found.skipped[0].startswith(f"{root}: skipped 5 links to files already in the corpus (0-first -> zen, ")
    assert found.label == "fortunes/ (3 files) + elsewhere.txt"
    with pytest.raises(CorpusError, match="art: given twice"):
        find_sources([str(root / "art"), str(root)], downloads=tmp_path / "dl")
    # a binary file named on its own is read, and refused
    with pytest.raises(CorpusError, match=r"art.dat: a binary file, not text \(a NUL byte at offset 0\)"):
        scan(find_sources([str(root / "art.dat")], downloads=tmp_path / "dl"))
    # a directory of binary files only
    only = tmp_path / "indexes"
    only.mkdir()
    (only / "a.dat").write_bytes(bytes(100))
    with pytest.raises(CorpusError, match=r"indexes: a directory with no non-empty text files \(hidden files are "
                                          r"skipped; it has 1 binary file \(a.dat\)\)"):
        find_sources([str(only)], downloads=tmp_path / "dl")


# ---------------------------------------------------------------- the token file


def prepare_dir(tmp_path, files, **kw):
    sources = find_sources([str(f) for f in files], downloads=tmp_path, **kw)
    corpus = scan(sources)
    write_tokens(sources, corpus, tmp_path / "data")
    return sources, corpus, TokenCorpus(tmp_path / "data", corpus)


def test_documents_are_joined_by_an_empty_line_and_encoded_once(tmp_path):
    texts = ["first document\n" * 10, "second, without a final newline", "third\r\nwith CRLF\r\n"]
    files = [write(tmp_path / f"{i}.txt", t) for i, t in enumerate(texts)]
    files[2].write_bytes(texts[2].encode())  # keep the \r\n
    sources, corpus, tokens = prepare_dir(tmp_path, files)
    stream = "first document\n" * 10 + "\nsecond, without a final newline\n\nthird\nwith CRLF\n"
    vocab = Vocab.from_text(stream)
    assert corpus.vocabulary == "".join(vocab.chars) and corpus.length == len(stream)
    assert tokens.ids.dtype == np.uint8 and vocab.decode(tokens.ids) == stream
    record = json.loads((tmp_path / "data" / SOURCES).read_text())
    assert [(s["name"], s["size_bytes"], s["chars"]) for s in record["sources"]] == [
        (str(files[0]), 150, 150), (str(files[1]), 31, 31), (str(files[2]), 18, 16)]
    assert record["sources"][2]["sha256"] == hashlib.sha256(texts[2].encode()).hexdigest()
    listing = "".join(f"{s['sha256']}  {s['name']}\n" for s in record["sources"])
    assert corpus.describe() == {"name": "0.txt + 1.txt + 2.txt", "size_bytes": 199, "chars": len(stream),
                                 "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    assert not list((tmp_path / "data").glob(".*"))  # no temporary files left


def test_one_file_is_its_text_unchanged_with_the_old_split(tmp_path):
    text = "".join(chr(32 + i % 90) for i in range(5000))
    path = write(tmp_path / "one.txt", text)
    _, corpus, tokens = prepare_dir(tmp_path, [path])
    assert corpus.describe() == read_corpus(path).describe()  # the name, size, length and sha256 of before
    ids = Vocab.from_text(text).encode_exact(text)
    assert (tokens.ids == ids).all()
    split, old = tokens.split(0.1), split_ids(ids, 0.1)
    assert (split.train == old.train).all() and (split.validation == old.validation).all()


def test_a_large_vocabulary_is_stored_as_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3 + "abc\n"
    _, corpus, tokens = prepare_dir(tmp_path, [write(tmp_path / "cjk.txt", text)])
    assert len(corpus.vocabulary) == 304 and tokens.ids.dtype == np.uint16
    assert Vocab(list(corpus.vocabulary)).decode(tokens.ids) == text
    assert (tmp_path / "data" / TOKENS).stat().st_size == 2 * len(text)


def test_held_out_files_are_the_validation_text(tmp_path):
    files = [write(tmp_path / f"{name}.txt", name * 100 + "\n") for name in ("a", "b", "c")]
    _, corpus, tokens = prepare_dir(tmp_path, files, validation_files=["b.txt"])
    vocab = tokens.vocab
    split = tokens.split(0.1)  # the fraction is not used
    assert vocab.decode(split.train) == "a" * 100 + "\n\n" + "c" * 100 + "\n\n"
    assert vocab.decode(split.validation) == "b" * 100 + "\n"
    assert split.validation_fraction == pytest.approx(101 / corpus.length)


def test_the_token_file_is_reused_until_a_source_changes(tmp_path):
    files = [write(tmp_path / "a.txt", "alpha " * 100), write(tmp_path / "b.txt", "beta " * 100)]
    sources, corpus, _ = prepare_dir(tmp_path, files)
    again, why = prepared(tmp_path / "data", find_sources([str(f) for f in files], downloads=tmp_path))
    assert again == corpus and why == "the same files"
    assert prepared(tmp_path / "other", sources) == (None, "no token file yet")
    reordered = find_sources([str(f) for f in reversed(files)], downloads=tmp_path)
    assert prepared(tmp_path / "data", reordered)[0] is None
    files[1].write_text("BETA " * 100)  # same size, other bytes
    assert prepared(tmp_path / "data", sources) == (None, f"{files[1]} has changed (its sha256 differs)")
    files[1].write_text("beta")
    assert prepared(tmp_path / "data", sources) == (None, f"{files[1]} has changed (its size differs)")


@pytest.mark.parametrize("chunk", [8, 1 << 20])  # 8: ASCII chunks and others, counted each its own way
def test_control_characters_are_reported_and_dropped_on_request(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk)
    plain = "plain text\twith a tab\n" * 10
    odd = "ring\x07 the bell, ba\x08ck space\x08, \x1b[1mbold\x1b[0m\n" * 5 + "caf\ufffd cr\u00e8me \x07\x85\n"
    files = [write(tmp_path / "plain.txt", plain), write(tmp_path / "odd.txt", odd)]
    sources, corpus, _ = prepare_dir(tmp_path, files)
    assert dict(corpus.control) == {"\x07": 6, "\x08": 10, "\x1b": 10, "\x85": 1, "\ufffd": 1}
    assert [s.control_chars for s in corpus.sources] == [0, 28]
    assert set("\x07\x08\x1b\x85\ufffd") <= set(corpus.vocabulary)  # kept unless asked
    assert corpus.control_report() == (
        "plain.txt + odd.txt: 28 control characters (not printable text, newline or tab) in 1 file (odd.txt): "
        "U+0008 BS ×10, U+001B ESC ×10, U+0007 BEL ×6, U+0085 NEL ×1, U+FFFD REPLACEMENT CHARACTER ×1; "
        "they are in the vocabulary; --drop-control leaves them out")

    # --drop-control: out of the stream and the vocabulary; a token file made otherwise is not reused
    dropping = find_sources([str(f) for f in files], downloads=tmp_path, drop_control=True)
    assert prepared(tmp_path / "data", dropping) == (None, "made without --drop-control")
    dropped = scan(dropping)
    write_tokens(dropping, dropped, tmp_path / "data")
    kept = data.without_control(odd)
    assert kept == "ring the bell, back space, [1mbold[0m\n" * 5 + "caf cr\u00e8me \n"
    assert dropped.vocabulary == "".join(sorted(set(plain + "\n" + kept)))
    assert dropped.control == corpus.control and dropped.length == corpus.length - 28
    assert dropped.control_report().endswith("; left out of the text and the vocabulary (--drop-control)")
    tokens = TokenCorpus(tmp_path / "data", dropped)
    assert tokens.vocab.decode(tokens.ids) == plain + "\n" + kept
    assert prepared(tmp_path / "data", dropping) == (dropped, "the same files")
    assert prepared(tmp_path / "data", sources) == (None, "made with --drop-control")

    clean = prepare_dir(tmp_path, [files[0]])[1]
    assert clean.control == () and clean.control_report() is None


def test_a_token_file_of_an_older_format_is_made_again(tmp_path):
    sources, _, _ = prepare_dir(tmp_path, [write(tmp_path / "a.txt", "alpha " * 100)])
    record = json.loads((tmp_path / "data" / SOURCES).read_text())
    del record["control"], record["drop_control"]  # what format 1 wrote
    (tmp_path / "data" / SOURCES).write_text(json.dumps({**record, "format": 1}))
    assert prepared(tmp_path / "data", sources) == (None, "made by another version of chargen")


def test_preparing_holds_a_few_chunks_whatever_the_corpus_size(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 1 << 16)
    path = tmp_path / "big.txt"
    path.write_bytes(("the quick brown fox jumps over the lazy dog; " * 24 + "\r\n").encode() * 8000)  # 8.7 MB
    tracemalloc.start()
    try:
        prepare_dir(tmp_path, [path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**21, f"{peak:,} bytes at the peak for a {path.stat().st_size:,}-byte corpus"
    assert (tmp_path / "data" / TOKENS).stat().st_size == path.stat().st_size - 8000  # each \r\n became \n


# ---------------------------------------------------------------- splitting, windows, samples


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
    ids = np.arange(500, dtype=np.uint16)  # position == value, so offsets are visible
    windows = Windows(ids, seq_len=20, batch_size=8, seed=0)
    x, y = windows.batch(3)
    assert x.shape == y.shape == (8, 20) and x.dtype == np.int32
    assert (np.diff(x, axis=1) == 1).all()  # each window is a contiguous run of the text
    assert (y == x + 1).all()  # the target at every position is the character that follows it
    assert x.min() >= 0 and y.max() <= 499
    assert (windows.batch(3, slice(2, 4))[0] == x[2:4]).all()  # one process's rows of the batch


def test_an_epoch_is_the_draw_of_before_batch_by_batch(monkeypatch):
    """Step s is batch s % steps_per_epoch of epoch s // steps_per_epoch, with the offsets that one
    draw of the whole epoch from (seed, epoch) gives, so epoch-based runs see the batches they saw
    before offsets were drawn in blocks; any step can be made again, in any order."""
    monkeypatch.setattr(Windows, "BLOCK", 40)  # blocks of 5 batches, so an epoch spans several
    ids = np.arange(10_000, dtype=np.int32) % 50
    windows = Windows(ids, seq_len=100, batch_size=8, seed=7)
    assert windows.steps_per_epoch == 12  # 10,000 // 100 = 100 windows, 12 whole batches of 8
    for epoch in (0, 3):
        draw = np.random.default_rng([7, epoch]).integers(0, 10_000 - 100, size=12 * 8)
        got = np.concatenate([windows.starts(epoch * 12 + b) for b in range(12)])
        assert (got == draw).all()
    backwards = [windows.starts(s).copy() for s in reversed(range(36))][::-1]
    fresh = Windows(ids, seq_len=100, batch_size=8, seed=7)
    assert all((fresh.starts(s) == b).all() for s, b in enumerate(backwards))
    assert not (Windows(ids, 100, 8, seed=8).starts(0) == windows.starts(0)).all()
    assert Windows(ids[:300], seq_len=100, batch_size=16, seed=1).steps_per_epoch == 1  # tiny texts: one batch


def test_validation_samples_are_fixed_evenly_spread_pieces():
    ids = np.arange(1_000_000, dtype=np.uint32)
    assert sample_pieces(100_000, 64) == (64, 1562)
    assert sample_pieces(10_000, 64) == (19, 526)  # pieces of at least 512 characters
    assert sample_pieces(300, 64) == (1, 300)
    assert sample_pieces(2_000_000, 64) == (489, 4089)  # at most 4096 each
    sample = sample_text(ids, 64, 1562)
    assert sample.shape == (64 * 1562,) and sample.dtype == np.int32
    pieces = sample.reshape(64, 1562)
    assert (np.diff(pieces, axis=1) == 1).all()  # each piece is a run of the text
    assert pieces[0, 0] == 0 and pieces[-1, -1] == 999_999  # from its start to its end
    assert (np.diff(pieces[:, 0]) >= 1562).all()  # without overlaps
    assert (sample_text(ids, 64, 1562) == sample).all()


def test_streams_are_contiguous_rows():
    ids = np.arange(10_000, dtype=np.int32)
    rows = streams(ids, n_streams=8)
    assert rows.shape == (8, 1250)
    assert rows.reshape(-1).tolist() == list(range(10_000))
    # short texts use fewer, longer streams (at least min_len characters of context each)
    assert streams(ids[:1000], n_streams=8, min_len=512).shape == (1, 1000)
    assert streams(ids[:10], n_streams=8).shape == (1, 10)


def test_windows_read_from_the_token_file_are_those_of_the_map(tmp_path):
    text = "".join(chr(0x4E00 + i % 300) for i in range(20_000))  # uint16 ids
    _, _, tokens = prepare_dir(tmp_path, [write(tmp_path / "t.txt", text)])
    train = tokens.split(0.1).train
    read, sliced = Windows(train, 50, 8, seed=2, read=tokens.windows), Windows(train, 50, 8, seed=2)
    for step in (0, 5, 44, 45, 1000):
        for a, b in zip(read.batch(step), sliced.batch(step)):
            assert a.dtype == np.int32 and (a == b).all()


def test_release_keeps_the_memory_map_readable(tmp_path):
    _, _, tokens = prepare_dir(tmp_path, [write(tmp_path / "t.txt", "abcdefgh" * 1000)])
    before = tokens.ids[:16].copy()
    tokens.release()
    assert (tokens.ids[:16] == before).all() and not tokens.ids.flags.writeable
    assert os.path.getsize(tmp_path / "data" / TOKENS) == 8000


def test_a_known_corpus_is_downloaded_once_into_the_data_directory(tmp_path, monkeypatch):
    import http.server
    import threading

    text = ("To be, or not to be, that is the question:\n" * 20).encode()
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/hamlet.txt"
        manifest = {"speech": KnownCorpus("speech", "hamlet.txt", url, hashlib.sha256(text).hexdigest(), len(text))}
        monkeypatch.chdir(tmp_path)  # no copy in the current directory
        sources = find_sources(["speech"], downloads=tmp_path / "data", manifest=manifest)
        corpus = scan(sources)
        assert served == ["/hamlet.txt"] and (tmp_path / "data" / "hamlet.txt").read_bytes() == text
        assert corpus.describe()["name"] == "hamlet.txt" and corpus.length == len(text)
        scan(find_sources(["speech"], downloads=tmp_path / "data", manifest=manifest))
        assert served == ["/hamlet.txt"]  # read from the data directory the second time
    finally:
        httpd.shutdown()
        httpd.server_close()
