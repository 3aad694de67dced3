"""`chargen export`: gives an artifact made before training wrote model.onnx its graph, atomically
and idempotently, and refuses what is not an artifact with the loader's message."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from chargen.cli import main
from model.runtime import artifact
from model.training import artifacts


def export(path: Path):
    result = CliRunner().invoke(main, ["export", "--artifact", str(path)])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture
def old(tiny_artifact, tmp_path) -> Path:
    """A copy of a trained artifact as one made before model.onnx existed."""
    path = Path(shutil.copytree(tiny_artifact, tmp_path / "old"))
    (path / "model.onnx").unlink()
    return path


def test_export_adds_the_graph_training_would_have_written(tiny_artifact, old):
    with pytest.raises(artifact.MissingGraph, match="chargen export --artifact"):
        artifact.load(old)
    result = export(old)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {old / 'model.onnx'} (") and "checked against meta.json" in result.output
    assert (old / "model.onnx").read_bytes() == (tiny_artifact / "model.onnx").read_bytes()
    assert artifact.load(old).onnx_path == old / "model.onnx"  # servable now
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in tiny_artifact.iterdir())  # no temporary file


def test_export_records_the_sha256_an_older_meta_json_lacks_and_says_so(old):
    assert export(old).exit_code == 0
    meta = json.loads((old / "meta.json").read_text())
    recorded = meta.pop("sha256")
    (old / "meta.json").write_text(json.dumps(meta, indent=2))  # as written before meta.json recorded them
    result = export(old)
    assert result.exit_code == 0, result.output
    assert f"{old / 'model.onnx'} is up to date (" in result.output
    assert "its sha256 and vocab.json's recorded in meta.json" in result.output and "nothing written" not in result.output
    assert json.loads((old / "meta.json").read_text())["sha256"] == recorded


def test_export_again_changes_nothing(old):
    assert export(old).exit_code == 0
    before = os.stat(old / "model.onnx")
    result = export(old)
    assert result.exit_code == 0, result.output
    assert result.output.strip().startswith(f"{old / 'model.onnx'} is up to date (") and "nothing written" in result.output
    after = os.stat(old / "model.onnx")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_export_replaces_a_damaged_graph(tiny_artifact, old):
    (old / "model.onnx").write_bytes(b"half a graph")
    with pytest.raises(artifact.CorruptGraph, match="rebuild it with"):
        artifact.load(old)
    result = export(old)
    assert result.exit_code == 0 and result.output.startswith("wrote "), result.output
    assert (old / "model.onnx").read_bytes() == (tiny_artifact / "model.onnx").read_bytes()


def test_export_of_a_run_directory_writes_its_best_artifact(old, tmp_path):
    run = tmp_path / "run"
    shutil.move(old, run / "artifacts" / "epoch-003")
    artifacts.point(run / "best", run / "artifacts" / "epoch-003")
    result = export(run)
    assert result.exit_code == 0, result.output
    assert (run / "artifacts" / "epoch-003" / "model.onnx").is_file() and not (run / "model.onnx").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such artifact directory"),
    (lambda d: d.mkdir(), "missing model.keras, vocab.json, meta.json (an artifact holds model.keras, model.onnx, vocab.json, meta.json)"),
    (lambda d: d.write_text("x"), "is a file; an artifact is a directory"),
])
def test_export_refuses_what_is_not_an_artifact_with_the_loaders_message(tmp_path, make, message):
    target = tmp_path / "thing"
    make(target)
    with pytest.raises(artifact.ArtifactError) as loader:
        artifact.check(target, keras=True)
    result = export(target)
    assert result.exit_code == 1
    assert result.output == f"Error: {loader.value}\n" and message in result.output
    assert not (tmp_path / "thing" / "model.onnx").exists()


def test_a_failed_write_leaves_the_old_graph_and_no_temporary_file(old, monkeypatch):
    """The graph is written beside the old one and renamed into place: a failure before the rename
    (here the rename itself: a full disk or a read-only mount fails earlier, the same way) leaves
    the artifact as it was, and the error is one line."""
    (old / "model.onnx").write_bytes(b"the old graph")
    before = sorted(p.name for p in old.iterdir())

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.os, "replace", refuse)
    result = export(old)
    assert result.exit_code == 1
    assert result.output == f"Error: {old / 'model.onnx'}: cannot be written: No space left on device\n"
    assert (old / "model.onnx").read_bytes() == b"the old graph"
    assert sorted(p.name for p in old.iterdir()) == before
