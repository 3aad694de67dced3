"""Reading an artifact (model/records/meta.py says what one holds), as a server worker and `chargen
sample` do: `check(path)` finds what is wrong with one before its network is loaded (the command
line calls it first), `load(path)` reads model.onnx, vocab.json and meta.json. Writing artifacts
and loading their Keras network is the training side's (model/training/artifacts.py).

Two ways in: `load(path)` is the serving load; `check()` does every check of it, and with
`keras=True` the checks of the Keras load (model.keras instead of model.onnx, which is then
checked only when present).
"""

from __future__ import annotations

import shlex
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.records.config import ModelConfig
# the records and errors a reader of artifacts uses, also as artifact.NAME
from model.records.meta import (FILES, FORMAT_VERSION, GRAPH, ArtifactError, ArtifactMeta, ArtifactNotFound, BadMeta, BadVocab,  # noqa: F401
                                CorruptGraph, CorruptModel, MissingFile, MissingGraph, UnsupportedFormat, VocabMismatch,
                                artifact_in)
from model.records.vocab import Vocab
from model.runtime.graph import check_graph

if TYPE_CHECKING:
    import keras


@dataclass
class Artifact:
    path: Path
    model: keras.Model | None  # only from model/training/artifacts.py's load_keras
    vocab: Vocab
    meta: ArtifactMeta
    onnx_path: Path | None = None  # the checked model.onnx; None only for a Keras load of an artifact without one

    @property
    def config(self) -> ModelConfig:
        return self.meta.config


def resolve(path: str | Path) -> Path:
    """An artifact directory, or a training run directory whose best artifact is `best/`."""
    path = Path(path)
    if not path.exists():
        raise ArtifactNotFound(f"{path}: no such artifact directory")
    if not path.is_dir():
        raise ArtifactNotFound(f"{path}: is a file; an artifact is a directory holding {', '.join(FILES)}")
    return artifact_in(path) or path


def export_command(path: Path) -> str:
    """The command that gives the artifact at `path` its model.onnx (in the messages that need one)."""
    return f".venv/bin/chargen export --artifact {shlex.quote(str(path))}"


def check(path: str | Path, *, keras: bool = False) -> tuple[Path, ArtifactMeta, Vocab]:
    """Everything `load(path)` (or with `keras=True` the training side's `load_keras`) checks, without loading Keras: the directory, the files
    it reads, meta.json, vocab.json and that they agree, and that model.onnx is the graph of the
    network meta.json describes (for the Keras load, when it is there); with `keras=True`, that
    model.keras is a zip archive. Returns the resolved directory, its metadata and vocabulary."""
    path, meta, vocab = _check_files(path, keras)
    if not keras or (path / GRAPH).is_file():
        _check_graph(path / GRAPH, meta)
    return path, meta, vocab


def _check_files(path: str | Path, keras: bool) -> tuple[Path, ArtifactMeta, Vocab]:
    """check() but the graph: serving reads model.onnx, vocab.json and meta.json; the Keras load
    model.keras, vocab.json and meta.json."""
    path = resolve(path)
    needed = ("model.keras", "vocab.json", "meta.json") if keras else (GRAPH, "vocab.json", "meta.json")
    missing = [name for name in needed if not (path / name).is_file()]
    if missing == [GRAPH]:
        raise MissingGraph(f"{path}: missing {GRAPH}, the ONNX graph of the network that serving runs; "
                           f"add it (built from model.keras) with: {export_command(path)}")
    if missing:
        raise MissingFile(f"{path}: missing {', '.join(missing)} (an artifact holds {', '.join(FILES)})")
    meta = _read_meta(path / "meta.json")
    vocab = _read_vocab(path / "vocab.json")
    if meta.vocab_size != len(vocab):
        raise VocabMismatch(f"{path}: meta.json says vocab_size {meta.vocab_size} but vocab.json has {len(vocab)}")
    model_path = path / "model.keras"
    if keras and not zipfile.is_zipfile(model_path):
        raise CorruptModel(f"{model_path}: not a Keras archive (not a zip file; truncated or overwritten?)")
    return path, meta, vocab


def _check_graph(graph_path: Path, meta: ArtifactMeta, data: bytes | None = None) -> None:
    config = meta.config
    try:
        check_graph(graph_path if data is None else data, cell=config.cell, layers=config.layers,
                    units=config.units, vocab_size=meta.vocab_size, name=str(graph_path))
    except ValueError as e:  # its message names the file and every mismatch
        raise CorruptGraph(f"{e}; rebuild it with: {export_command(graph_path.parent)}") from None


def load(path: str | Path) -> Artifact:
    """The artifact at `path` (or a run directory's best), checked, as serving reads it: model.onnx,
    vocab.json and meta.json (model is None: the Keras network is model/training/artifacts.py's)."""
    path, meta, vocab = check(path)
    return Artifact(path, None, vocab, meta, path / GRAPH)


def _read_meta(path: Path) -> ArtifactMeta:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadMeta(f"{path}: not valid JSON: not UTF-8 ({e})") from None
    return ArtifactMeta.from_json(text, str(path))


def _read_vocab(path: Path) -> Vocab:
    try:
        return Vocab.from_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise BadVocab(f"{path}: {e}") from None
