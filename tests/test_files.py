"""model/records/files.py: the one way chargen replaces a file (atomically and durably)."""

import os

import pytest

from model.records import files
from model.records.files import replacing, write_atomic


def test_write_atomic_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    write_atomic(target, "név: ő\n")  # text is UTF-8
    assert target.read_bytes() == "név: ő\n".encode("utf-8")
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_error_while_writing_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "tokens.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half written"):
        with replacing(target) as tmp:
            tmp.write_bytes(b"new, but")
            raise RuntimeError("half written")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.bin"]


def test_the_temporary_file_is_hidden_beside_the_target_with_its_suffix(tmp_path):
    # Keras saves only to a name ending in .keras; a corpus directory's reader skips hidden files.
    with replacing(tmp_path / "checkpoint.keras") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".keras"
        tmp.write_bytes(b"model")
    assert (tmp_path / "checkpoint.keras").read_bytes() == b"model"


def test_the_contents_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_atomic(tmp_path / "model.onnx", b"graph")
    assert calls == ["fsync", "replace"]
