"""Reading an artifact (model/records/meta.py says what one holds), as a server worker and `chargen
sample` do: `check(path)` finds what is wrong with one before its network is loaded (the command
line calls it first), `load(path)` reads the graph it serves, vocab.json and meta.json. Writing
artifacts and loading their Keras network is the training side's (model/training/artifacts.py).

Which graph serves is the precision (`CHARGEN_PRECISION`, `chargen sample --precision`): auto, the
default, runs model.int8.onnx where meta.json records one that passed its quality gate and
model.onnx otherwise; float32 and int8 ask for one. The graph that serves is the one checked
(loaded by ONNX Runtime and compared with meta.json); for int8 also its sha256 against meta.json's,
and model.onnx's against the one it was made from (hashed, not loaded: a worker serving int8 never
loads the float32 graph).

Two ways in: `load(path)` is the serving load; `check()` does every check of it, and with
`keras=True` the checks of the Keras load (model.keras instead of model.onnx, which is then
checked only when present).
"""

from __future__ import annotations

import hashlib
import shlex
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.records.config import ModelConfig
# the records and errors a reader of artifacts uses, also as artifact.NAME
from model.records.meta import (FILES, FORMAT_VERSION, GRAPH, INT8_GRAPH, PRECISIONS, ArtifactError, ArtifactMeta,  # noqa: F401
                                ArtifactNotFound, BadMeta, BadVocab, CorruptGraph, CorruptInt8Graph, CorruptModel,
                                MissingFile, MissingGraph, MissingInt8Graph, UnsupportedFormat, VocabMismatch,
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
    onnx_path: Path | None = None  # model.onnx; None only for a Keras load of an artifact without one
    precision: str = "float32"  # the graph serving runs: float32 (model.onnx) or int8 (model.int8.onnx)

    @property
    def config(self) -> ModelConfig:
        return self.meta.config

    @property
    def graph(self) -> Path | None:
        """The checked graph the engine runs."""
        return self.path / INT8_GRAPH if self.precision == "int8" else self.onnx_path


def resolve(path: str | Path) -> Path:
    """An artifact directory, or a training run directory whose best artifact is `best/`."""
    path = Path(path)
    if not path.exists():
        raise ArtifactNotFound(f"{path}: no such artifact directory")
    if not path.is_dir():
        raise ArtifactNotFound(f"{path}: is a file; an artifact is a directory holding {', '.join(FILES)}")
    return artifact_in(path) or path


def export_command(path: Path, int8: bool = False) -> str:
    """The command that gives the artifact at `path` its model.onnx (in the messages that need one),
    or with `int8` its model.int8.onnx."""
    if int8:
        return f".venv/bin/chargen export --int8 --artifact {shlex.quote(str(path))} --corpus FILE"
    return f".venv/bin/chargen export --artifact {shlex.quote(str(path))}"


def check(path: str | Path, *, keras: bool = False, precision: str = "auto") -> tuple[Path, ArtifactMeta, Vocab]:
    """Everything `load(path, precision)` (or with `keras=True` the training side's `load_keras`)
    checks, without loading Keras: the directory, the files it reads, meta.json, vocab.json and that
    they agree, and that the graph serving runs for `precision` is the graph of the network meta.json
    describes (for the Keras load, model.onnx when it is there); with `keras=True`, that model.keras
    is a zip archive. Returns the resolved directory, its metadata and vocabulary."""
    path, meta, vocab = _check_files(path, keras)
    if keras:
        if (path / GRAPH).is_file():
            _check_graph(path / GRAPH, meta)
    elif served_precision(path, meta, precision) == "int8":
        _check_int8(path, meta)
    else:
        _check_graph(path / GRAPH, meta)
    return path, meta, vocab


def served_precision(path: Path, meta: ArtifactMeta, asked: str) -> str:
    """The precision the artifact at `path` serves when `asked` (auto, float32 or int8)."""
    try:
        return meta.precision(asked)
    except MissingInt8Graph as e:
        raise MissingInt8Graph(f"{path}: {e}".replace("--artifact DIR", f"--artifact {shlex.quote(str(path))}")) from None


def _check_int8(path: Path, meta: ArtifactMeta) -> None:
    """model.int8.onnx is there, is the file meta.json records, was made from this model.onnx, and
    is the int8 graph of the network meta.json describes."""
    graph, again = path / INT8_GRAPH, export_command(path, int8=True)
    if not graph.is_file():
        raise MissingInt8Graph(f"{graph}: missing; meta.json records this int8 graph (serving runs it by default). "
                               f"Add it again with: {again}, or serve float32 (CHARGEN_PRECISION=float32)")
    data = graph.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.int8.sha256:
        raise CorruptInt8Graph(f"{graph}: not the int8 graph meta.json records (its sha256 differs: damaged, or "
                               f"replaced by another file); make it again with: {again}")
    made_from = meta.int8.float32_sha256
    if made_from is not None and _sha256(path / GRAPH) != made_from:
        _check_graph(path / GRAPH, meta)  # a damaged model.onnx is said as such
        raise CorruptInt8Graph(f"{graph}: made from another model.onnx than the artifact's (model.onnx's sha256 "
                               f"differs from the one meta.json records); make it again with: {again}")
    config = meta.config
    try:
        check_graph(data, cell=config.cell, layers=config.layers, units=config.units, vocab_size=meta.vocab_size,
                    name=str(graph), precision="int8")
    except ValueError as e:
        raise CorruptInt8Graph(f"{e}; make it again with: {again}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


def _check_graph(graph_path: Path, meta: ArtifactMeta, data: bytes | None = None, precision: str = "float32") -> None:
    config = meta.config
    error = CorruptGraph if precision == "float32" else CorruptInt8Graph
    try:
        check_graph(graph_path if data is None else data, cell=config.cell, layers=config.layers,
                    units=config.units, vocab_size=meta.vocab_size, name=str(graph_path), precision=precision)
    except ValueError as e:  # its message names the file and every mismatch
        raise error(f"{e}; rebuild it with: {export_command(graph_path.parent, precision == 'int8')}") from None


def load(path: str | Path, precision: str = "auto") -> Artifact:
    """The artifact at `path` (or a run directory's best), checked, as serving reads it: the graph
    it serves for `precision` (auto, float32 or int8; see the module's docstring), vocab.json and
    meta.json (model is None: the Keras network is model/training/artifacts.py's)."""
    path, meta, vocab = check(path, precision=precision)
    return Artifact(path, None, vocab, meta, path / GRAPH, served_precision(path, meta, precision))


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
