"""`chargen prepare`: known corpora and their hashes, newline normalization, downloads, bad sources.

Downloads come from an http.server on 127.0.0.1 in a thread; nothing here touches the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from chargen.cli import main
from model.training.prepare import MANIFEST, KnownCorpus, PrepareError, load_manifest, prepare, report

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4
SHAKESPEARE_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- a local web server


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(1.5)  # longer than the client's timeout in the test, bounded so the thread ends
        body = self.files.get(self.path.removesuffix("?unsized"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        if not self.path.endswith("?unsized"):  # without a length the body runs until the connection closes
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    Handler.files = {
        "/data/input.txt": TEXT.encode(),
        "/crlf/windows.txt": TEXT.replace("\n", "\r\n").encode(),
        "/big.txt": b"x" * 5000,
        "/slow": TEXT.encode(),
        "/data/": TEXT.encode(),
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------- the manifest


def test_manifest_lists_tinyshakespeare():
    known = load_manifest()["tinyshakespeare"]
    assert known.file == "tinyshakespeare.txt"
    assert known.url == "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    assert known.sha256 == SHAKESPEARE_SHA
    assert known.size_bytes == 1_115_394
    assert "public domain" in known.license
    readme = (ROOT / "corpora" / "README.md").read_text()
    assert known.url in readme and known.sha256 in readme and "../shared/corpora" in readme


def test_manifest_is_found_from_anywhere_by_the_installed_package(tmp_path):
    """From another directory the installed `chargen` still knows the manifest (editable install)."""
    (tmp_path / "tinyshakespeare.txt").write_text(TEXT)
    chargen = Path(sys.executable).with_name("chargen")
    result = subprocess.run([str(chargen), "prepare", "tinyshakespeare.txt"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert SHAKESPEARE_SHA in result.stderr and sha(TEXT.encode()) in result.stderr
    assert MANIFEST == ROOT / "corpora" / "manifest.json"


def test_broken_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(PrepareError, match="manifest not found"):
        load_manifest(tmp_path / "absent.json")
    (tmp_path / "m.json").write_text('{"corpora": {"x": {"file": "x.txt"}}}')
    with pytest.raises(PrepareError, match="invalid corpus manifest"):
        load_manifest(tmp_path / "m.json")


# ---------------------------------------------------------------- local files


def test_the_shared_tinyshakespeare_is_recognized(shakespeare):
    summary = prepare(str(shakespeare))
    assert summary.known == "tinyshakespeare" and summary.sha256 == SHAKESPEARE_SHA
    assert (summary.size_bytes, summary.chars, summary.lines) == (1_115_394, 1_115_394, 40_000)
    assert len(summary.vocabulary) == 65
    assert summary.most_frequent[0] == (" ", 169_892)
    assert summary.written is None
    text = report(summary)
    assert "known corpus tinyshakespeare, sha256 verified" in text
    assert "65 characters" in text and "space 15.2%" in text and "train 1,003,854 / validation 111,540" in text


def test_known_bytes_under_any_name_are_recognized(tmp_path):
    data = TEXT.encode()
    manifest = {"speech": KnownCorpus("speech", "hamlet.txt", "http://example.invalid/h.txt", sha(data), len(data))}
    (tmp_path / "whatever.txt").write_bytes(data)
    summary = prepare(str(tmp_path / "whatever.txt"), manifest=manifest)
    assert summary.known == "speech" and summary.name == "hamlet.txt"


def test_known_file_name_with_other_bytes_names_both_hashes(tmp_path):
    path = tmp_path / "tinyshakespeare.txt"
    path.write_text(TEXT)
    with pytest.raises(PrepareError) as e:
        prepare(str(path))
    message = str(e.value)
    assert SHAKESPEARE_SHA in message and sha(TEXT.encode()) in message
    assert "tinyshakespeare" in message and "file name" in message


def test_unknown_file_is_described_and_nothing_is_written(tmp_path):
    path = tmp_path / "speech.txt"
    path.write_text(TEXT)
    summary = prepare(str(path))
    assert summary.known is None and summary.written is None
    assert summary.chars == len(TEXT) and summary.lines == 8
    assert summary.vocabulary == sorted(set(TEXT))
    counts = dict(summary.most_frequent)
    assert counts[" "] == TEXT.count(" ") and counts["t"] == TEXT.count("t")
    assert len(summary.most_frequent) == 10
    assert [path.name] == [p.name for p in tmp_path.iterdir()]


def test_control_characters_are_counted(tmp_path):
    path = tmp_path / "fortunes.txt"
    path.write_text(TEXT + "ring\x07\x07 ba\x08ck caf\ufffd\n")
    summary = prepare(str(path))
    assert summary.control == [("\x07", 2), ("\x08", 1), ("\ufffd", 1)]
    assert summary.to_dict()["control"][0] == {"char": "\x07", "count": 2}
    assert ("control      4 characters that are not printable text, newline or tab: U+0007 BEL ×2, U+0008 BS ×1, "
            "U+FFFD REPLACEMENT CHARACTER ×1 (`chargen train --drop-control` leaves them out)") in report(summary)
    path.write_text(TEXT)
    assert "control      none" in report(prepare(str(path)))


def test_newlines_are_normalized_and_written_with_out(tmp_path):
    source = tmp_path / "windows.txt"
    lines = TEXT.split("\n")  # 8 lines and an empty string after the last newline
    raw = "\ufeff" + "\r\n".join(lines[:6]) + "\r" + "\r".join(lines[6:])  # 5 \r\n, then 3 lone \r
    source.write_bytes(raw.encode())
    out = tmp_path / "clean.txt"
    summary = prepare(str(source), out=str(out))
    assert summary.crlf_converted == 5 and summary.cr_converted == TEXT.count("\n") - 5
    assert summary.bom_removed
    assert out.read_bytes() == TEXT.encode()
    assert summary.written == str(out) and not summary.unchanged
    assert "5 \\r\\n and 3 lone \\r converted to \\n; byte-order mark removed" in report(summary)
    # the same again: already there, left alone
    assert prepare(str(source), out=str(out)).unchanged


def test_normalizing_in_place(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(TEXT.replace("\n", "\r\n").encode())
    prepare(str(path), out=str(path))
    assert path.read_bytes() == TEXT.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]  # no temporary file left


def test_out_with_other_content_needs_force(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text("something else")
    with pytest.raises(PrepareError, match="already exists with other content; pass --force"):
        prepare(str(tmp_path / "a.txt"), out=str(tmp_path / "b.txt"))
    assert (tmp_path / "b.txt").read_text() == "something else"
    prepare(str(tmp_path / "a.txt"), out=str(tmp_path / "b.txt"), force=True)
    assert (tmp_path / "b.txt").read_text() == TEXT
    with pytest.raises(PrepareError, match="does not exist"):
        prepare(str(tmp_path / "a.txt"), out=str(tmp_path / "no" / "dir.txt"))


@pytest.mark.parametrize("data, problem", [
    (b"", "the file is empty"),
    ("Schöne Grüße\n".encode("latin-1") * 30, "not UTF-8 text (byte 0xf6 at offset 3 is invalid)"),
    (b"\x00\x01\x02binary" * 40, "a binary file, not text"),
    (b"too short\n", "only 10 characters; at least 200 are needed"),
])
def test_unusable_files(tmp_path, data, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(PrepareError) as e:
        prepare(str(path), out=str(tmp_path / "out.txt"))
    assert problem in str(e.value) and "bad.txt" in str(e.value)
    assert not (tmp_path / "out.txt").exists()


def test_missing_sources(tmp_path):
    with pytest.raises(PrepareError, match="no such file .*known: tinyshakespeare"):
        prepare(str(tmp_path / "absent.txt"))
    with pytest.raises(PrepareError, match="is a directory"):
        prepare(str(tmp_path))
    with pytest.raises(PrepareError, match="only http:// and https:// URLs"):
        prepare("ftp://127.0.0.1/corpus.txt")


def test_expected_sha256(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    assert prepare(str(path), expected_sha256=sha(TEXT.encode()).upper()).sha256 == sha(TEXT.encode())
    with pytest.raises(PrepareError) as e:
        prepare(str(path), expected_sha256="0" * 64)
    assert "0" * 64 in str(e.value) and sha(TEXT.encode()) in str(e.value)
    with pytest.raises(PrepareError, match="64 hexadecimal digits"):
        prepare(str(path), expected_sha256="abc")


# ---------------------------------------------------------------- downloads


def test_download_goes_to_the_url_file_name_in_the_current_directory(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = prepare(f"{server}/crlf/windows.txt")
    assert summary.written == "windows.txt" and summary.known is None
    assert (tmp_path / "windows.txt").read_bytes() == TEXT.encode()  # newlines normalized
    assert summary.sha256 == sha(TEXT.replace("\n", "\r\n").encode())  # of the bytes as served
    assert summary.crlf_converted == TEXT.count("\n")


@pytest.mark.parametrize("query", ["", "?unsized"])
def test_download_to_out(server, tmp_path, query):
    summary = prepare(f"{server}/data/input.txt{query}", out=str(tmp_path / "speech.txt"))
    assert (tmp_path / "speech.txt").read_text() == TEXT
    assert summary.size_bytes == len(TEXT)


def test_known_corpus_by_name_is_fetched_from_its_url_and_checked(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = TEXT.encode()
    manifest = {"speech": KnownCorpus("speech", "hamlet.txt", f"{server}/data/input.txt", sha(data), len(data))}
    summary = prepare("speech", manifest=manifest)
    assert summary.known == "speech" and summary.written == "hamlet.txt"
    assert (tmp_path / "hamlet.txt").read_text() == TEXT


@pytest.mark.parametrize("source", ["speech", "URL"])
def test_known_corpus_whose_download_differs_names_both_hashes(server, tmp_path, source):
    url = f"{server}/data/input.txt"
    manifest = {"speech": KnownCorpus("speech", "hamlet.txt", url, "ab" * 32, 1)}
    with pytest.raises(PrepareError) as e:
        prepare(url if source == "URL" else source, out=str(tmp_path / "x.txt"), manifest=manifest)
    assert "ab" * 32 in str(e.value) and sha(TEXT.encode()) in str(e.value)
    assert not (tmp_path / "x.txt").exists()


def test_http_errors_are_clear(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrepareError, match="HTTP 404"):
        prepare(f"{server}/missing.txt", out=str(tmp_path / "x.txt"))
    with pytest.raises(PrepareError, match="5,000 bytes, more than the limit of 1,000 bytes"):
        prepare(f"{server}/big.txt", out=str(tmp_path / "x.txt"), max_bytes=1000)
    with pytest.raises(PrepareError, match="more than the limit of 1,000 bytes"):
        prepare(f"{server}/big.txt?unsized", out=str(tmp_path / "x.txt"), max_bytes=1000)
    with pytest.raises(PrepareError, match="no answer within 0.3 s"):
        prepare(f"{server}/slow", out=str(tmp_path / "x.txt"), timeout=0.3)
    with pytest.raises(PrepareError, match="the URL names no file; pass --out"):
        prepare(f"{server}/data/")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PrepareError, match=f"127.0.0.1:{port}/c.txt: cannot be fetched"):
        prepare(f"http://127.0.0.1:{port}/c.txt", out=str(tmp_path / "x.txt"), timeout=5)


# ---------------------------------------------------------------- the command


def test_command_prints_the_summary(tmp_path):
    (tmp_path / "speech.txt").write_text(TEXT)
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "speech.txt"), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert f"{len(TEXT):,} bytes, {len(TEXT):,} characters, 8 lines" in result.output
    assert f"vocabulary   {len(set(TEXT))} characters" in result.output
    frequent = next(line for line in result.output.splitlines() if line.startswith("most common"))
    assert frequent.startswith("most common  space ") and frequent.count("%") == 3
    assert "written      nothing" in result.output


def test_command_json(server, tmp_path):
    out = tmp_path / "speech.txt"
    result = CliRunner().invoke(main, ["prepare", f"{server}/data/input.txt", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # "fetching ..." goes to stderr
    assert data["written"] == str(out) and data["chars"] == len(TEXT) and data["sha256"] == sha(TEXT.encode())
    assert data["vocabulary_size"] == len(set(TEXT)) and data["most_frequent"][0] == {"char": " ", "count": TEXT.count(" ")}


@pytest.mark.parametrize("args, problem", [
    (["{tmp}/absent.txt"], "absent.txt: no such file"),
    (["{tmp}/bad.txt"], "not UTF-8"),
    (["{tmp}/bad.txt", "--timeout", "0"], "Invalid value for '--timeout'"),
    (["{tmp}/bad.txt", "--top", "0"], "Invalid value for '--top'"),
    (["{tmp}/bad.txt", "--max-mb", "nan"], "Invalid value for --max-mb: must be a finite number, got nan"),
    (["{tmp}/bad.txt", "--timeout", "inf"], "Invalid value for --timeout: must be a finite number, got inf"),
    (["{tmp}/bad.txt", "--sha256", "xyz"], "--sha256 'xyz': expected 64 hexadecimal digits"),
])
def test_command_errors(tmp_path, args, problem):
    (tmp_path / "bad.txt").write_bytes(b"\xff" * 300)
    result = CliRunner().invoke(main, ["prepare", *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code != 0
    assert problem in result.output
    assert "Traceback" not in result.output
