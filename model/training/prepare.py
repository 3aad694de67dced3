"""Get a corpus ready to train on: fetch it, check it, normalize it, describe it (`chargen prepare`).

A source is a local file, an http(s) URL, or the name of a corpus in corpora/manifest.json (which is
then fetched from its URL). A corpus is recognized as known by its sha256 (any file name), or by its
file name, URL or manifest name, in which case its sha256 must match the manifest's.

Where the text goes:
  - a local file is only checked and described unless `out` is given; training applies the same
    normalization when it reads a corpus, so a file that passes can be trained on as it is;
  - a download is written to `out`, by default the corpus's file name in the current directory
    (the manifest's name for a known corpus, else the last part of the URL), as `curl -O` does.
What is written is UTF-8 with \\n newlines and no byte-order mark.

Nothing here imports Keras: `chargen prepare` runs in a second.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from model.records.files import write_atomic
from model.training.corpora import (DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, MANIFEST, KnownCorpus, PrepareError,  # noqa: F401
                                    fetch, load_manifest)
from model.training.data import CONTROL_CHARACTERS, CorpusError, decode_corpus, show_control, train_length


@dataclass
class Summary:
    source: str
    name: str  # file name the corpus goes by
    sha256: str  # of the bytes as fetched or read, before normalization
    size_bytes: int
    chars: int
    lines: int
    vocabulary: list[str]
    most_frequent: list[tuple[str, int]]
    crlf_converted: int  # \r\n pairs turned into \n
    cr_converted: int  # lone \r turned into \n
    bom_removed: bool
    control: list[tuple[str, int]]  # (character, count) of data.CONTROL_CHARACTERS found, by character
    known: str | None = None  # manifest name when recognized
    written: str | None = None  # path of the prepared file, None when nothing was written
    unchanged: bool = False  # `written` already held exactly this text

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["most_frequent"] = [{"char": c, "count": n} for c, n in self.most_frequent]
        d["control"] = [{"char": c, "count": n} for c, n in self.control]
        d["vocabulary_size"] = len(self.vocabulary)
        return d


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme.lower() in ("http", "https")


def _url_file_name(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path).rsplit("/", 1)[-1]  # "" for ".../"


# ---------------------------------------------------------------- recognizing


def recognize(sha256: str, *, file_name: str | None, url: str | None, name: str | None,
              manifest: dict[str, KnownCorpus]) -> KnownCorpus | None:
    """The known corpus these bytes are, if any. A source that claims to be a known corpus (by its
    manifest name, URL or file name) but has other bytes is an error naming both hashes."""
    for known in manifest.values():
        if known.sha256 == sha256:
            return known
    for known in manifest.values():
        claims = [why for why, hit in (
            (f"the manifest name {known.name!r}", name == known.name),
            (f"the URL {known.url}", url is not None and url == known.url),
            (f"the file name {known.file!r}", file_name == known.file),
        ) if hit]
        if claims:
            raise PrepareError(
                f"{file_name or url or name}: has {claims[0]} of the known corpus {known.name!r} but its sha256 is "
                f"{sha256}, not the expected {known.sha256}; the file is damaged or a different text "
                "(rename it to use it as a corpus of its own)"
            )
    return None


# ---------------------------------------------------------------- preparing


def prepare(source: str, *, out: str | Path | None = None, expected_sha256: str | None = None,
            force: bool = False, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
            top: int = 10, manifest: dict[str, KnownCorpus] | None = None) -> Summary:
    manifest = load_manifest() if manifest is None else manifest
    if expected_sha256 is not None:
        expected_sha256 = expected_sha256.strip().lower()
        if len(expected_sha256) != 64 or any(c not in "0123456789abcdef" for c in expected_sha256):
            raise PrepareError(f"--sha256 {expected_sha256!r}: expected 64 hexadecimal digits")

    url = name = None
    if is_url(source):
        url = source
    elif "://" in source:
        raise PrepareError(f"{source}: only http:// and https:// URLs can be fetched")
    elif not os.path.exists(source) and source in manifest:
        name, url = source, manifest[source].url

    if url is not None:
        data = fetch(url, timeout=timeout, max_bytes=max_bytes)
        file_name = manifest[name].file if name else _url_file_name(url)
    else:
        path = Path(source)
        if not path.exists():
            known = ", ".join(sorted(manifest)) or "none"
            raise PrepareError(f"{source}: no such file (nor a URL, nor a known corpus name; known: {known})")
        if path.is_dir():
            raise PrepareError(f"{source}: is a directory, expected a text file")
        data = path.read_bytes()
        file_name = path.name

    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise PrepareError(f"{source}: sha256 is {sha256}, not the expected {expected_sha256} (--sha256)")
    known = recognize(sha256, file_name=file_name, url=url, name=name, manifest=manifest)
    if known:
        file_name = known.file

    try:
        corpus = decode_corpus(data, source)  # the trainer's own checks: UTF-8, not empty, no NUL, long enough
    except CorpusError as e:
        raise PrepareError(str(e)) from None
    raw = data.decode("utf-8")
    crlf = raw.count("\r\n")
    counts = Counter(corpus.text)
    summary = Summary(
        source=source, name=file_name, sha256=sha256, size_bytes=len(data), chars=len(corpus.text),
        lines=corpus.text.count("\n") + (not corpus.text.endswith("\n")),
        vocabulary=sorted(counts), most_frequent=counts.most_common(top),
        crlf_converted=crlf, cr_converted=raw.count("\r") - crlf, bom_removed=raw.startswith("\ufeff"),
        control=sorted((c, n) for c, n in counts.items() if c in CONTROL_CHARACTERS),
        known=known.name if known else None,
    )

    if out is None and url is not None:
        if not file_name:
            raise PrepareError(f"{url}: the URL names no file; pass --out FILE")
        out = file_name
    if out is not None:
        summary.written, summary.unchanged = _write(Path(out), corpus.text.encode("utf-8"), force=force, same_as=None if url else Path(source))
    return summary


def _write(out: Path, data: bytes, *, force: bool, same_as: Path | None) -> tuple[str, bool]:
    """Write atomically; an existing file is replaced only if it is the source itself or `force`."""
    if out.is_dir():
        raise PrepareError(f"--out {out}: is a directory; give a file name")
    if out.exists():
        if out.read_bytes() == data:
            return str(out), True
        if not force and not (same_as is not None and out.resolve() == same_as.resolve()):
            raise PrepareError(f"--out {out}: already exists with other content; pass --force to replace it")
    if not out.parent.exists():
        raise PrepareError(f"--out {out}: directory {out.parent} does not exist")
    write_atomic(out, data)
    return str(out), False


# ---------------------------------------------------------------- describing


def show_char(c: str) -> str:
    return {"\n": "\\n", "\t": "\\t", " ": "space"}.get(c, c if c.isprintable() else f"U+{ord(c):04X}")


def report(summary: Summary, validation_fraction: float = 0.1) -> str:
    s = summary
    known = f" (known corpus {s.known}, sha256 verified)" if s.known else ""
    if s.crlf_converted or s.cr_converted or s.bom_removed:
        parts = [f"{s.crlf_converted:,} \\r\\n and {s.cr_converted:,} lone \\r converted to \\n"]
        if s.bom_removed:
            parts.append("byte-order mark removed")
        newlines = "; ".join(parts)
    else:
        newlines = "already \\n only"
    frequent = ", ".join(f"{show_char(c)} {100 * n / s.chars:.1f}%" for c, n in s.most_frequent)
    n_val = s.chars - train_length(s.chars, validation_fraction)
    vocab = "".join(show_char(c) if c in "\n\t" or not c.isprintable() else c for c in s.vocabulary)
    control = (f"{sum(n for _, n in s.control):,} characters that are not printable text, newline or tab: "
               f"{show_control(s.control)} (`chargen train --drop-control` leaves them out)" if s.control else "none")
    lines = [
        f"source       {s.source}{known}",
        f"sha256       {s.sha256}",
        f"size         {s.size_bytes:,} bytes, {s.chars:,} characters, {s.lines:,} lines",
        f"newlines     {newlines}",
        f"control      {control}",
        f"vocabulary   {len(s.vocabulary)} characters: {vocab}",
        f"most common  {frequent}",
        f"split        train {s.chars - n_val:,} / validation {n_val:,} characters (the last {validation_fraction:.0%})",
    ]
    if s.written:
        lines.append(f"written      {s.written}" + (" (already there, unchanged)" if s.unchanged else ""))
    else:
        lines.append("written      nothing (training reads the file as it is; --out FILE writes the normalized text)")
    return "\n".join(lines)
