"""Corpus files -> one stream of character ids on disk -> training windows and validation text.

A corpus is one or more UTF-8 text files: files named on the command line, the files under a
directory (chosen with --include/--exclude globs), or a corpus named in corpora/manifest.json.
Each is checked and normalized as `chargen prepare` does (UTF-8, no NUL bytes, newlines become
\\n, a byte-order mark is dropped). The files are joined into one stream of documents: every
document but the last ends with a newline (one is added when it has none) and is followed by an
empty line, so "\\n\\n" separates two documents. A corpus of one file is its text unchanged.
A directory's links to files the corpus has anyway, and its binary files, are skipped and said so
(`find_sources`); control characters are counted as the files are read, and left out of the text
and the vocabulary on request (CONTROL_CHARACTERS, --drop-control).

The stream is encoded once into `tokens.bin` in a data directory (uint8 ids when the vocabulary
has at most 256 characters, else uint16), in two passes over the files that hold a few MiB at a
time whatever their size: the first checks and hashes them and finds the vocabulary (`scan`), the
second writes the ids (`write_tokens`). `sources.json` beside it records every file's name, size,
sha256 and length; a later run on the same files (a resumed run, or another one given the same
--data) hashes them again and reuses the token file; a file that changed is noticed.

Training reads its windows from the token file (`Windows`, `TokenCorpus.windows`) and its
validation text through a memory map of it; the validation text is the last fraction of the
stream, or the held-out files (--validation-files), which come last.

Nothing here imports Keras, so the command line reports a bad file at once.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import math
import mmap
import os
import re
import threading
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.records.files import replacing, write_atomic
from model.records.vocab import Vocab, normalize_newlines
from model.training.corpora import PrepareError, fetch, load_manifest

MIN_CORPUS_CHARS = 200  # below this there is nothing to learn and nothing to validate on
CHUNK_BYTES = 4 * 2**20  # read at a time: memory stays flat whatever the size of a file
MAX_VOCAB = 2**16  # ids are stored as uint16 at most
TOKENS, SOURCES = "tokens.bin", "sources.json"
DATA_FORMAT = 2  # 2: the control characters found, and whether they were dropped


class CorpusError(ValueError):
    """A corpus file that cannot be trained on; the message says why."""


@dataclass(frozen=True)
class Corpus:
    """One text read whole (`chargen prepare`, `chargen evaluate`); training streams instead."""

    name: str
    text: str  # newlines normalized
    sha256: str  # of the file's bytes as read
    size_bytes: int

    def describe(self) -> dict:
        return {"name": self.name, "size_bytes": self.size_bytes, "chars": len(self.text), "sha256": self.sha256}


# ---------------------------------------------------------------- decoding


# Bytes that do not occur in text files (NUL and the C0 controls other than tab, newline, vertical tab,
# form feed, carriage return, backspace and escape; and DEL): more than a few and it is data, not text.
_CONTROL = bytes([*range(0x00, 0x08), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
BINARY_CONTROL_FRACTION = 0.05  # random bytes have 10% of them; text in any 8-bit encoding ~0%


class TextDecoder:
    """One file's bytes, fed in chunks of any size -> its text with newlines normalized and any
    byte-order mark removed. Every problem is a CorpusError naming the file: empty, binary (so
    nobody is told to convert a zip with iconv), text in another encoding, not UTF-8, with the
    offset of the first offending byte. Fed in one piece, a file gets the checks in the order
    listed; fed in chunks, what is found first (a NUL byte is looked for before decoding a chunk,
    the share of control codes is judged at the end and at a decoding error)."""

    def __init__(self, name: str):
        self.name = name
        self.size = 0  # bytes fed so far
        self.control = 0  # how many of them are control codes
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._cr = False  # the text so far ended with \r, whose \n may start the next chunk
        self._started = False  # the first character (a byte-order mark?) has been decoded

    def feed(self, data: bytes) -> str:
        if self.size == 0 and data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise CorpusError(
                f"{self.name}: not UTF-8 text (byte 0x{data[0]:02x} at offset 0 is invalid): it starts with a "
                "UTF-16 byte-order mark; convert it first, e.g. `iconv -f utf-16 -t utf-8`"
            )
        nul = data.find(b"\x00")
        if nul >= 0:
            raise CorpusError(f"{self.name}: a binary file, not text (a NUL byte at offset {self.size + nul})")
        self.control += len(data) - len(data.translate(None, _CONTROL))
        start = self.size - len(self._utf8.getstate()[0])  # offset of the first byte the decoder sees
        self.size += len(data)
        try:
            text = self._utf8.decode(data)
        except UnicodeDecodeError as e:  # e.object is the decoder's held bytes plus `data`
            self._check_control()
            raise self._not_utf8(e, start) from None
        return self._normalize(text)

    def finish(self) -> str:
        if self.size == 0:
            raise CorpusError(f"{self.name}: the file is empty")
        self._check_control()
        start = self.size - len(self._utf8.getstate()[0])
        try:
            text = self._normalize(self._utf8.decode(b"", final=True))
        except UnicodeDecodeError as e:  # the file ends inside a character
            raise self._not_utf8(e, start) from None
        if self._cr:
            self._cr = False
            text += "\n"
        return text

    def _normalize(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._cr:
            text = "\r" + text
        self._cr = text.endswith("\r")
        if self._cr:
            text = text[:-1]
        return normalize_newlines(text) if "\r" in text else text

    def _check_control(self) -> None:
        if self.control > BINARY_CONTROL_FRACTION * self.size:
            raise CorpusError(
                f"{self.name}: a binary file, not text ({self.control / self.size:.0%} of its bytes are control codes)"
            )

    def _not_utf8(self, e: UnicodeDecodeError, start: int) -> CorpusError:
        return CorpusError(
            f"{self.name}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {start + e.start} is invalid); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        )


SNIFF_BYTES = 8192  # what a directory's file is judged by before it is read (git looks at 8000)


def looks_binary(head: bytes) -> bool:
    """Whether the first bytes of a file make it data rather than text, by TextDecoder's tests. A
    UTF-16 file is text in another encoding: reading it says how to convert it."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return False
    return b"\x00" in head or len(head) - len(head.translate(None, _CONTROL)) > BINARY_CONTROL_FRACTION * len(head)


# The characters that are not text though a text file may hold them: the C0 and C1 controls other
# than tab and newline (bell, backspace, escape, DEL, ...; \r is gone by now), and U+FFFD, which
# stands for bytes a converter could not read. Format characters (zero-width joiner, soft hyphen)
# and spaces other than U+0020 belong to real text and are not among them.
CONTROL_CHARACTERS = frozenset(chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0), 0xFFFD))
_CONTROL_ASCII = bytes(ord(c) for c in sorted(CONTROL_CHARACTERS) if c.isascii())
_TEXT_ASCII = bytes(sorted(set(range(128)) - set(_CONTROL_ASCII)))
_CONTROL_RE = re.compile("[" + "".join(re.escape(c) for c in sorted(CONTROL_CHARACTERS)) + "]")
_CONTROL_NAMES = dict(zip(
    [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)],
    "NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 DC4 NAK SYN ETB CAN EM SUB ESC FS GS RS "
    "US DEL PAD HOP BPH NBH IND NEL SSA ESA HTS HTJ VTS PLD PLU RI SS2 SS3 DCS PU1 PU2 STS CCH MW SPA EPA SOS SGCI "
    "SCI CSI ST OSC PM APC".split()))


def without_control(text: str) -> str:
    """`text` less its CONTROL_CHARACTERS (--drop-control)."""
    if text.isascii():
        return text.encode("ascii").translate(None, _CONTROL_ASCII).decode("ascii")
    return _CONTROL_RE.sub("", text)


def show_control(counts, most: int = 8) -> str:
    """(character, count) pairs as 'U+0007 BEL ×12, U+FFFD REPLACEMENT CHARACTER ×3', the commonest first."""
    counts = sorted(counts, key=lambda cn: (-cn[1], cn[0]))
    shown = ", ".join(f"U+{ord(c):04X} {_CONTROL_NAMES.get(ord(c)) or unicodedata.name(c, '')} ×{n:,}"
                      for c, n in counts[:most])
    return shown + (f" and {len(counts) - most} more" if len(counts) > most else "")


def decode_text(data: bytes, name: str) -> str:
    """A whole file's bytes as text, checked and normalized as TextDecoder does."""
    decoder = TextDecoder(name)
    return decoder.feed(data) + decoder.finish()


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


# ---------------------------------------------------------------- finding the files


@dataclass(frozen=True)
class SourceFile:
    path: Path  # where it is read from
    name: str  # how it is shown and recorded: as given, or the directory given joined with its path inside
    held_out: bool = False  # matched --validation-files: validation text only
    url: str | None = None  # a corpus of the manifest not downloaded yet: fetched to `path`
    sha256: str | None = None  # what the manifest says its bytes hash to


@dataclass(frozen=True)
class Sources:
    files: tuple[SourceFile, ...]  # in the order of the stream: training files, then held-out ones
    label: str  # the corpus's name in an artifact's meta.json
    drop_control: bool = False  # CONTROL_CHARACTERS are left out of the text (--drop-control)
    skipped: tuple[str, ...] = ()  # a line for each kind of file a directory had that was left out


def _matches(name: str, globs) -> bool:
    """fnmatch against a path (where * also matches /) or its last part."""
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], g) for g in globs)


def _walk(root: Path, skip: set[str]):
    """(path inside root, path) of the non-empty regular files under root, sorted, skipping hidden
    files and directories (.git, .cache, ...) and the directories in `skip` (real paths). Linked
    directories are followed (a folder of links to books is a corpus), each real directory once, so
    a link back up the tree ends there."""
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in skip and real not in seen:
                seen.add(real)
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file() and path.stat().st_size > 0:
                yield path.relative_to(root).as_posix(), path


def _few(names: list[str], one: str, several: str, most: int = 3) -> str:
    """'1 binary file (a)', '5 binary files (a, b, c and 2 more)'."""
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"{len(names)} {one if len(names) == 1 else several} ({shown})"


@dataclass
class _Given:
    """A --corpus argument and the files it names."""

    arg: str
    label: str
    files: list[SourceFile]
    directory: bool = False
    links: tuple[SourceFile, ...] = ()  # a directory's files that are links
    binary: tuple[str, ...] = ()  # a directory's binary files, left out (as named inside it)


def find_sources(corpus: list[str] | tuple[str, ...], *, include=(), exclude=(), validation_files=(),
                 downloads: Path, skip=(), manifest=None, drop_control: bool = False) -> Sources:
    """The files a corpus is made of, checked to exist (a directory's files are only glanced at).

    Each entry of `corpus` is a file, a directory (its files, recursively, sorted by path; those
    matching an `include` glob if any are given, and none matching an `exclude` glob), or the name
    of a corpus in the manifest (the manifest's file in the current directory, as `chargen prepare
    NAME` leaves it, else downloaded into `downloads` when the corpus is read). Files matching a
    `validation_files` glob are held out as the validation text and go last. Directories in `skip`
    (the run directory, the token file's) are not looked into, nor is `downloads`.

    A directory may hold what is not text beside its texts, so two kinds of its files are left out,
    each kind said in a line of `skipped`: a link to a file the corpus has anyway (Debian's fortunes
    link `art.u8` to `art`), and a file whose first SNIFF_BYTES are binary (an index beside the
    texts). A file named on its own is read whatever it is, and the same file named twice is an error."""
    if not corpus:
        raise CorpusError("no corpus given")
    skip = {os.path.realpath(p) for p in (*skip, downloads)}
    given: list[_Given] = []
    for arg in corpus:
        path = Path(arg)
        if path.is_dir():
            given.append(_directory(arg, skip, include, exclude))
        elif path.exists():
            given.append(_Given(arg, path.name, [SourceFile(path, arg)]))
        else:
            if manifest is None:
                try:
                    manifest = load_manifest()
                except PrepareError as e:
                    raise CorpusError(str(e)) from None
            given.append(_known(arg, manifest, downloads))
    seen, dropped = _read_once(given)
    files: list[SourceFile] = []
    labels, skipped = [], []
    for g in given:
        found = [f for f in g.files if seen[os.path.realpath(f.path)] == f.name]
        if g.directory:
            skipped += _left_out(g, dropped.get(g.arg, []), found, include or exclude)
        files += found
        labels.append(f"{g.label} ({len(found)} files)" if g.directory else g.label)
    if validation_files:
        files = _held_out(files, validation_files)
    label = labels[0] if len(labels) == 1 else " + ".join(labels)
    return Sources(tuple(files), label if len(label) <= 200 else label[:199] + "…", drop_control, tuple(skipped))


def _directory(arg: str, skip: set[str], include, exclude) -> _Given:
    """A directory's files: those the globs choose, its binary files left out."""
    found, links, binary = [], [], []
    for rel, p in _walk(Path(arg), skip):
        if include and not _matches(rel, include) or _matches(rel, exclude):
            continue
        if _sniff_binary(p, f"{arg.rstrip('/')}/{rel}"):
            binary.append(rel)
            continue
        found.append(SourceFile(p, f"{arg.rstrip('/')}/{rel}"))
        if p.is_symlink():
            links.append(found[-1])
    return _Given(arg, f"{Path(arg).name or arg}/", found, True, tuple(links), tuple(binary))


def _known(arg: str, manifest: dict, downloads: Path) -> _Given:
    """A corpus of the manifest: its file here, or where it is downloaded to."""
    known = manifest.get(arg)
    if known is None:
        names = ", ".join(sorted(manifest)) or "none"
        raise CorpusError(f"{arg}: no such file or directory (nor the name of a known corpus: {names})")
    local = Path(known.file)
    if local.is_file():
        file = SourceFile(local, known.file, sha256=known.sha256)
    else:
        file = SourceFile(Path(downloads) / known.file, known.file, url=known.url, sha256=known.sha256)
    return _Given(arg, known.file, [file])


def _read_once(given: list[_Given]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(real path -> the name it is read under, directory argument -> "link -> target" of its links
    left out). The files that are not links come first, so that a link is what gives way whichever
    comes first; the same file given twice otherwise is an error."""
    links = {f for g in given for f in g.links}
    seen: dict[str, str] = {}
    dropped: dict[str, list[str]] = {}
    everything = [(g.arg, f) for g in given for f in g.files]
    for arg, f in sorted(everything, key=lambda af: af[1] in links):
        key = os.path.realpath(f.path)
        if key not in seen:
            seen[key] = f.name
        elif f in links:
            inside = arg.rstrip("/") + "/"
            dropped.setdefault(arg, []).append(f"{f.name.removeprefix(inside)} -> {seen[key].removeprefix(inside)}")
        else:
            raise CorpusError(f"{f.name}: given twice (also as {seen[key]}); each file is read once")
    return seen, dropped


def _left_out(g: _Given, dropped: list[str], found: list[SourceFile], globs: bool) -> list[str]:
    """The lines saying what a directory had that was left out; an error when nothing is left."""
    skipped = []
    if dropped:
        skipped.append(f"{g.arg}: skipped " + _few(dropped, "link to a file already in the corpus",
                                                    "links to files already in the corpus"))
    if g.binary:
        skipped.append(f"{g.arg}: skipped {_few(list(g.binary), 'binary file', 'binary files')}")
    if not found:
        chosen = " matching --include/--exclude" if globs else ""
        if g.binary:
            raise CorpusError(f"{g.arg}: a directory with no non-empty text files{chosen} (hidden files are "
                              f"skipped; it has {_few(list(g.binary), 'binary file', 'binary files')})")
        raise CorpusError(f"{g.arg}: a directory with no non-empty files{chosen} (hidden files are skipped)")
    return skipped


def _held_out(files: list[SourceFile], validation_files) -> list[SourceFile]:
    """The files with those matching a `validation_files` glob held out, and last."""
    def held(name: str) -> bool:  # the path as given, or from any folder down (a corpus folder's own paths among them)
        parts = name.split("/")
        return any(_matches("/".join(parts[k:]), validation_files) for k in range(len(parts)))

    files = [SourceFile(f.path, f.name, held(f.name), f.url, f.sha256) for f in files]
    held = sum(f.held_out for f in files)
    if held == 0:
        raise CorpusError(f"--validation-files {' '.join(validation_files)}: matches none of the {len(files)} corpus files")
    if held == len(files):
        raise CorpusError(f"--validation-files {' '.join(validation_files)}: matches all {len(files)} corpus files, "
                          "leaving none to train on")
    return [f for f in files if not f.held_out] + [f for f in files if f.held_out]


def _sniff_binary(path: Path, name: str) -> bool:
    try:
        with open(path, "rb") as f:
            return looks_binary(f.read(SNIFF_BYTES))
    except OSError as e:
        raise CorpusError(f"{name}: cannot be read: {e.strerror or e}") from None


# ---------------------------------------------------------------- the first pass: scan


@dataclass(frozen=True)
class SourceInfo:
    name: str
    size_bytes: int
    sha256: str
    chars: int  # of its text, normalized, without the separator after it
    held_out: bool = False
    ends_with_newline: bool = True
    control_chars: int = 0  # CONTROL_CHARACTERS found in its text (left out with --drop-control)


@dataclass(frozen=True)
class CorpusScan:
    """What the first pass learns about the files: enough to check the settings against before
    anything is written, and what sources.json records."""

    label: str
    sources: tuple[SourceInfo, ...]
    vocabulary: str  # the sorted characters
    length: int  # ids in the stream, separators included
    validation_start: int | None  # where the held-out files begin in the stream; None: no held-out files
    control: tuple[tuple[str, int], ...] = ()  # (character, count) of the CONTROL_CHARACTERS found, by character
    drop_control: bool = False  # they were left out of the stream and the vocabulary

    def control_report(self) -> str | None:
        """A line for the log on the CONTROL_CHARACTERS found; None when there were none."""
        if not self.control:
            return None
        files = [s.name.rsplit("/", 1)[-1] for s in self.sources if s.control_chars]
        done = ("left out of the text and the vocabulary (--drop-control)" if self.drop_control
                else "they are in the vocabulary; --drop-control leaves them out")
        return (f"{self.label}: {sum(n for _, n in self.control):,} control characters (not printable text, newline "
                f"or tab) in {_few(files, 'file', 'files')}: {show_control(self.control)}; {done}")

    @property
    def sha256(self) -> str:
        """Of a single file, its sha256; of several, that of their `sha256sum` listing (in order)."""
        if len(self.sources) == 1:
            return self.sources[0].sha256
        return hashlib.sha256("".join(f"{s.sha256}  {s.name}\n" for s in self.sources).encode()).hexdigest()

    def describe(self) -> dict:
        """The corpus in an artifact's meta.json."""
        return {"name": self.label, "size_bytes": sum(s.size_bytes for s in self.sources), "chars": self.length,
                "sha256": self.sha256}

    def to_dict(self) -> dict:
        return {"format": DATA_FORMAT, "label": self.label, "vocabulary": self.vocabulary, "length": self.length,
                "validation_start": self.validation_start, "control": dict(self.control),
                "drop_control": self.drop_control, "sources": [asdict(s) for s in self.sources]}

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusScan":
        return cls(label=d["label"], sources=tuple(SourceInfo(**s) for s in d["sources"]), vocabulary=d["vocabulary"],
                   length=d["length"], validation_start=d["validation_start"],
                   control=tuple((c, int(n)) for c, n in d["control"].items()), drop_control=bool(d["drop_control"]))


def separator(ends_with_newline: bool) -> str:
    """What follows a document that is not the last: a newline if it lacks one, then an empty line."""
    return "\n" if ends_with_newline else "\n\n"


class _FileText:
    """Iterating gives a file's normalized text (less its CONTROL_CHARACTERS if `drop_control`), a
    chunk at a time; after it, its size, sha256, length and last character. The text before any is
    dropped goes to `alphabet` if one is given. A corpus from the manifest is downloaded first if need be."""

    def __init__(self, file: SourceFile, drop_control: bool = False, alphabet: "_Alphabet | None" = None):
        self.file, self.drop_control, self.alphabet = file, drop_control, alphabet
        self.size = self.chars = 0
        self.sha256 = ""
        self.last = ""

    def __iter__(self):
        file = self.file
        if file.url and not file.path.exists():
            _download(file)
        digest, decoder = hashlib.sha256(), TextDecoder(file.name)
        try:
            f = open(file.path, "rb")
        except OSError as e:
            raise CorpusError(f"{file.name}: cannot be read: {e.strerror or e}") from None
        with f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
                yield self._took(decoder.feed(chunk))
        yield self._took(decoder.finish())
        self.size, self.sha256 = decoder.size, digest.hexdigest()
        if file.sha256 and self.sha256 != file.sha256:
            raise CorpusError(f"{file.name}: sha256 is {self.sha256}, not the {file.sha256} of the known corpus of "
                              "that name; the file is damaged or a different text (rename it to use it as a corpus of its own)")

    def _took(self, text: str) -> str:
        if self.alphabet is not None:
            self.alphabet.add(text)
        if self.drop_control:
            text = without_control(text)
        if text:
            self.chars += len(text)
            self.last = text[-1]
        return text


def _download(file: SourceFile) -> None:
    print(f"fetching {file.url} ...", flush=True)
    try:
        data = fetch(file.url)
    except PrepareError as e:
        raise CorpusError(str(e)) from None
    file.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file.path, data)  # its sha256 is checked as it is read, like any copy of a known corpus


class _Alphabet:
    """The set of characters of a text seen a chunk at a time, and how many of each of the
    CONTROL_CHARACTERS it has. ASCII chunks (the common case) cost one pass that deletes the bytes
    already seen, and a second only once a control character has been seen; others are counted
    with numpy."""

    def __init__(self):
        self.ascii = bytearray()
        self.other: set[int] = set()
        self.control: dict[str, int] = {}

    def add(self, text: str) -> None:
        if text.isascii():
            raw = text.encode("ascii")
            rest = raw.translate(None, self.ascii)
            while rest:  # a byte not seen before
                self.ascii.append(rest[0])
                rest = rest.translate(None, rest[:1])
            if self.ascii.translate(None, _TEXT_ASCII):
                control = raw.translate(None, _TEXT_ASCII)
                for b in set(control):
                    self._count(chr(b), control.count(b))
        elif text:
            counts = np.bincount(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
            present = np.flatnonzero(counts)
            self.other.update(present.tolist())
            for c in present[(present < 0xA0) | (present == 0xFFFD)].tolist():
                if chr(c) in CONTROL_CHARACTERS:
                    self._count(chr(c), int(counts[c]))

    def _count(self, char: str, n: int) -> None:
        self.control[char] = self.control.get(char, 0) + n

    def chars(self, drop_control: bool = False) -> str:
        chars = {chr(b) for b in self.ascii} | {chr(c) for c in self.other}
        return "".join(sorted(chars - CONTROL_CHARACTERS if drop_control else chars))


def scan(sources: Sources) -> CorpusScan:
    """The first pass: check every file, hash it, find the vocabulary and the length of the stream."""
    alphabet, infos = _Alphabet(), []
    for file in sources.files:
        before = sum(alphabet.control.values())
        reader = _FileText(file, sources.drop_control, alphabet)
        for _ in reader:
            pass
        infos.append(SourceInfo(file.name, reader.size, reader.sha256, reader.chars, file.held_out, reader.last == "\n",
                                sum(alphabet.control.values()) - before))
    if len(infos) > 1:
        alphabet.add("\n")  # the separator
    return _scan_of(sources.label, infos, alphabet.chars(sources.drop_control), tuple(sorted(alphabet.control.items())),
                    sources.drop_control)


def _scan_of(label: str, infos: list[SourceInfo], vocabulary: str, control: tuple[tuple[str, int], ...],
             drop_control: bool) -> CorpusScan:
    length, validation_start = 0, None
    for i, info in enumerate(infos):
        if info.held_out and validation_start is None:
            validation_start = length
        length += info.chars + (len(separator(info.ends_with_newline)) if i < len(infos) - 1 else 0)
    if length < MIN_CORPUS_CHARS:
        raise CorpusError(f"{label}: only {length} characters; at least {MIN_CORPUS_CHARS} are needed to train")
    if len(vocabulary) > MAX_VOCAB:
        raise CorpusError(f"{label}: {len(vocabulary):,} different characters; at most {MAX_VOCAB:,} can be trained on")
    return CorpusScan(label, tuple(infos), vocabulary, length, validation_start, control, drop_control)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16)


NO_TOKEN_FILE = "no token file yet"  # prepared()'s reason where there is none to reuse

def prepared(directory: Path, sources: Sources) -> tuple[CorpusScan | None, str]:
    """The scan recorded in `directory` when its token file was made from exactly these files (same
    bytes, hashed again, in the same order, the same ones held out) and the same --drop-control,
    else None and why not."""
    try:
        record = json.loads((Path(directory) / SOURCES).read_text())
        if record.get("format") != DATA_FORMAT:
            return None, "made by another version of chargen"
        recorded = CorpusScan.from_dict(record)
    except FileNotFoundError:
        return None, NO_TOKEN_FILE
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{SOURCES} is unreadable ({type(e).__name__})"
    if len(recorded.sources) != len(sources.files) or not (Path(directory) / TOKENS).is_file():
        return None, "other files"
    if recorded.drop_control != sources.drop_control:
        return None, f"made {'with' if recorded.drop_control else 'without'} --drop-control"
    for info, file in zip(recorded.sources, sources.files):
        if info.held_out != file.held_out:
            return None, f"{file.name} is held out differently"
        try:
            if file.path.stat().st_size != info.size_bytes:
                return None, _differs(info, file, "size")
        except FileNotFoundError:
            if file.url:
                return None, f"{file.name} is to be downloaded"
            raise CorpusError(f"{file.name}: no such file") from None
        if _sha256(file.path) != info.sha256:
            return None, _differs(info, file, "sha256")
    return CorpusScan(sources.label, recorded.sources, recorded.vocabulary, recorded.length,
                      recorded.validation_start, recorded.control, recorded.drop_control), "the same files"


def _differs(info: SourceInfo, file: SourceFile, what: str) -> str:
    """Why a token file made from `info` is not one of `file` (a file moved, same bytes, is)."""
    if info.name != file.name:
        return f"it holds other files ({info.name}, not {file.name})"
    return f"{file.name} has changed (its {what} differs)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- the second pass: write the ids


class _Encoder:
    """Text -> ids through a table indexed by code point (a byte translation for ASCII text when
    ids fit in a byte)."""

    def __init__(self, vocabulary: str, dtype: np.dtype):
        codes = [ord(c) for c in vocabulary]
        self.table = np.zeros(max(max(codes) + 1, 128), dtype=dtype)
        self.table[codes] = np.arange(len(codes))
        self.bytes_table = bytes(self.table[:128].tolist()) + bytes(128) if dtype == np.uint8 else None

    def encode(self, text: str) -> np.ndarray:
        if text.isascii():
            raw = text.encode("ascii")
            if self.bytes_table is not None:
                return np.frombuffer(raw.translate(self.bytes_table), dtype=np.uint8)
            return np.take(self.table, np.frombuffer(raw, dtype=np.uint8))
        return np.take(self.table, np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))


def write_tokens(sources: Sources, corpus: CorpusScan, directory: Path) -> None:
    """The second pass: the ids of the stream into directory/tokens.bin, then sources.json (which
    says the token file is complete; it is removed first, so a crash leaves no stale record)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SOURCES).unlink(missing_ok=True)
    dtype = token_dtype(len(corpus.vocabulary))
    encoder = _Encoder(corpus.vocabulary, dtype)
    with replacing(directory / TOKENS) as tmp:
        with open(tmp, "wb") as out:
            for i, (file, info) in enumerate(zip(sources.files, corpus.sources)):
                reader = _FileText(file, corpus.drop_control)
                for text in reader:
                    out.write(encoder.encode(text).data)
                if reader.sha256 != info.sha256:
                    raise CorpusError(f"{file.name}: changed while the corpus was being prepared; start again")
                if i < len(corpus.sources) - 1:
                    out.write(encoder.encode(separator(info.ends_with_newline)).data)
        if tmp.stat().st_size != corpus.length * dtype.itemsize:
            raise CorpusError(f"{corpus.label}: the token file has {tmp.stat().st_size // dtype.itemsize:,} ids, "
                              f"expected {corpus.length:,}; a file changed while the corpus was being prepared")
    write_atomic(directory / SOURCES, json.dumps(corpus.to_dict(), indent=1, ensure_ascii=False))


# ---------------------------------------------------------------- reading the ids


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # (N_train,) ids
    validation: np.ndarray  # (N_val,) ids
    validation_fraction: float


def train_length(length: int, validation_fraction: float) -> int:
    """How many of `length` characters train in the conventional char-rnn / nanoGPT split: the first
    part trains, the last `validation_fraction` of the text validates."""
    return int(length * (1.0 - validation_fraction))


def split_ids(ids: np.ndarray, validation_fraction: float) -> Split:
    """`ids` cut where `train_length` says."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation fraction must be between 0 and 1, got {validation_fraction}")
    n_train = train_length(len(ids), validation_fraction)
    return Split(ids[:n_train], ids[n_train:], validation_fraction)


def split_lengths(corpus: CorpusScan, validation_fraction: float) -> tuple[int, int]:
    """(training, validation) characters of the split `TokenCorpus.split` makes: held-out files
    validate when the corpus has them, else the last `validation_fraction` of the text."""
    if corpus.validation_start is not None:
        return corpus.validation_start, corpus.length - corpus.validation_start
    n_train = train_length(corpus.length, validation_fraction)
    return n_train, corpus.length - n_train


class TokenCorpus:
    """The token file, memory-mapped read-only (`ids`), and open for reading training windows
    (`windows`). Pages of the map the process has touched count in its resident memory until
    `release()` gives them back (they stay in the page cache, so reading them again is cheap):
    evaluations call it after each segment of text they score."""

    def __init__(self, directory: Path, corpus: CorpusScan):
        self.corpus = corpus
        path = Path(directory) / TOKENS
        dtype = token_dtype(len(corpus.vocabulary))
        self._file = open(path, "rb")
        if os.fstat(self._file.fileno()).st_size != corpus.length * dtype.itemsize:
            self._file.close()
            raise CorpusError(f"{path}: not the token file {SOURCES} describes (its size differs); delete "
                              f"{Path(directory) / SOURCES} to prepare the corpus again")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.ids = np.frombuffer(self._map, dtype=dtype)  # (N,) read-only

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The runs of `length` ids that begin at `starts`: (len(starts), length). Read from the file
        rather than through the map: a page fault in a map can bring in a whole large folio of the
        page cache, so windows at random offsets would soon make all of the corpus resident; a
        read per window costs about as much as the fault would (bench/README.md, "Big corpora")."""
        if not hasattr(os, "pread"):  # Windows: through the map
            return self.ids[starts[:, None] + np.arange(length)]
        size, fd = self.ids.itemsize, self._file.fileno()
        out = np.empty((len(starts), length), dtype=self.ids.dtype)
        for row, start in zip(out, starts.tolist()):
            row[:] = np.frombuffer(os.pread(fd, length * size, start * size), dtype=self.ids.dtype)
        return out

    @property
    def vocab(self) -> Vocab:
        return Vocab(list(self.corpus.vocabulary))

    def split(self, validation_fraction: float) -> Split:
        n_train, n_val = split_lengths(self.corpus, validation_fraction)
        fraction = validation_fraction if self.corpus.validation_start is None else n_val / self.corpus.length
        return Split(self.ids[:n_train], self.ids[n_train:], fraction)

    def release(self) -> None:
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


# ---------------------------------------------------------------- training windows


class Windows:
    """The training batches, numbered by optimizer step: step s is batch s % steps_per_epoch of
    epoch s // steps_per_epoch. An epoch has as many windows as cover the training text once, at
    offsets drawn from a generator seeded with (seed, epoch), so any step's batch can be made again
    and a resumed run sees exactly the batches the uninterrupted one would have. The offsets are
    drawn a block at a time, the generator's state kept at each block's start (drawing in blocks
    gives the same numbers as drawing an epoch's at once), so memory does not grow with the corpus."""

    BLOCK = 1 << 16  # windows' offsets drawn at a time, rounded to whole batches

    def __init__(self, ids: np.ndarray, seq_len: int, batch_size: int, seed: int, read=None):
        """`read(starts, length)` reads the windows (TokenCorpus.windows, the training text being the
        start of the token file); by default they are sliced from `ids`."""
        if len(ids) <= seq_len:
            raise ValueError(f"a training text of {len(ids)} characters has no window of {seq_len + 1}")
        self.ids, self.seq_len, self.batch_size, self.seed = ids, seq_len, batch_size, seed
        self._read = read
        self.steps_per_epoch = max(1, (len(ids) // seq_len) // batch_size)
        self._block = batch_size * max(1, self.BLOCK // batch_size)
        self._states: dict[int, dict] = {}  # block -> generator state at its start, for self._epoch
        self._epoch = -1
        self._cached: tuple[int, int, np.ndarray] | None = None  # (epoch, block, offsets)
        self._lock = threading.Lock()  # a data loader may ask from several threads
        self._span = np.arange(seq_len + 1)

    def starts(self, step: int) -> np.ndarray:
        """Offsets of the windows of the batch of optimizer step `step`: (batch_size,) int64."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        first = batch * self.batch_size
        block, at = divmod(first, self._block)
        return self._offsets(epoch, block)[at : at + self.batch_size]

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-character targets of step `step`'s windows (those in `rows`): (b, T) int32 each."""
        starts = self.starts(step)[rows]
        windows = (self._read(starts, self.seq_len + 1) if self._read else self.ids[starts[:, None] + self._span])
        windows = windows.astype(np.int32)  # (b, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def _offsets(self, epoch: int, block: int) -> np.ndarray:
        with self._lock:
            if self._cached and self._cached[:2] == (epoch, block):
                return self._cached[2]
            if epoch != self._epoch:
                self._epoch, self._states = epoch, {}
            count = self.steps_per_epoch * self.batch_size  # windows in an epoch
            high = len(self.ids) - self.seq_len
            known = max((b for b in self._states if b <= block), default=None)
            if known is None:
                rng, b = np.random.default_rng([self.seed, epoch]), 0
            else:
                rng, b = np.random.Generator(np.random.PCG64()), known
                rng.bit_generator.state = self._states[known]
            while True:
                self._states[b] = rng.bit_generator.state
                offsets = rng.integers(0, high, size=min(self._block, count - b * self._block))
                if b == block:
                    break
                b += 1
            self._cached = (epoch, block, offsets)
            return offsets


# ---------------------------------------------------------------- validation text


def sample_pieces(n_chars: int, n_streams: int, max_len: int = 4096, min_len: int = 512) -> tuple[int, int]:
    """(pieces, length) of a validation sample of about `n_chars` characters: as many pieces as
    `n_streams` while each keeps at least `min_len` characters, more when a piece would be longer than
    `max_len`, so that each piece is scored as one stream of the evaluation."""
    pieces = max(1, min(n_streams, n_chars // min_len), math.ceil(n_chars / max_len))
    return pieces, n_chars // pieces


def sample_text(ids: np.ndarray, pieces: int, length: int) -> np.ndarray:
    """`pieces` runs of `length` characters at evenly spaced offsets from the start of `ids` to its
    end, joined: a fixed part of a validation text (the same every time), of bounded size. (P * L,) int32"""
    starts = np.linspace(0, len(ids) - length, pieces).astype(np.int64) if pieces > 1 else np.zeros(1, np.int64)
    return np.concatenate([np.asarray(ids[s : s + length], dtype=np.int32) for s in starts])


def streams(ids: np.ndarray, n_streams: int, min_len: int = 512) -> np.ndarray:
    """Cut a text into at most `n_streams` contiguous equal rows (B, T) of at least `min_len`
    characters where the text allows, dropping the remainder at the end. Each row is scored as one
    long stream with the recurrent state carried through it."""
    n_streams = max(1, min(n_streams, len(ids) // min_len))
    length = len(ids) // n_streams
    return ids[: n_streams * length].reshape(n_streams, length)
