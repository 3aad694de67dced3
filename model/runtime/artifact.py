"""Reading an artifact (model/records/meta.py says what one holds), as a server worker and `chargen
sample` do: `check(path)` finds what is wrong with one before its network is loaded (the command
line calls it first), `load(path)` reads the graph it serves, vocab.json and meta.json. Writing
artifacts and loading their Keras network is the training side's (model/training/artifacts.py).

Which graph serves is the precision (`CHARGEN_PRECISION`, `chargen sample --precision`): auto, the
default, runs model.int8.onnx where meta.json records one that passed its quality gate and
model.onnx otherwise; float32 and int8 ask for one. The graph that serves is the one checked
(loaded by ONNX Runtime and compared with meta.json). Each file is also compared by its sha256 with
the one meta.json records, so that a file of another model of the same shape is refused: vocab.json
and model.onnx (meta.json's `sha256`, absent from artifacts written before it: they load unchecked),
model.int8.onnx (`int8.sha256`) and the model.onnx it was made from (`int8.float32_sha256`). A
worker serving int8 hashes model.onnx but never loads it.

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
from model.runtime.graph import described, graph_problems

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
            _check_float32(path, meta)
    elif served_precision(path, meta, precision) == "int8":
        _check_int8(path, meta)
    else:
        _check_float32(path, meta)
    return path, meta, vocab


def served_precision(path: Path, meta: ArtifactMeta, asked: str) -> str:
    """The precision the artifact at `path` serves when `asked` (auto, float32 or int8)."""
    try:
        return meta.precision(asked)
    except MissingInt8Graph as e:
        raise MissingInt8Graph(f"{path}: {e}".replace("--artifact DIR", f"--artifact {shlex.quote(str(path))}")) from None


def _check_float32(path: Path, meta: ArtifactMeta) -> None:
    """model.onnx is the graph of the network meta.json describes and, where meta.json records its
    sha256, that very file (not another model's graph of the same shape)."""
    graph = path / GRAPH
    data = _read(graph, CorruptGraph)
    recorded = meta.sha256.model_onnx if meta.sha256 is not None else None
    if recorded is None and meta.int8 is not None:  # an artifact from before `sha256`: its int8 record names model.onnx
        recorded = meta.int8.float32_sha256
    found = _sha256(data) if recorded is not None else None
    _check_graph(graph, meta, data, recorded=recorded is not None and found == recorded)  # damaged: said so first
    if found != recorded:
        raise CorruptGraph(_not_recorded(graph, found, recorded, "another model's graph") +
                           f"; rebuild it from model.keras with: {export_command(path)}")


def _check_int8(path: Path, meta: ArtifactMeta) -> None:
    """model.int8.onnx is there, is the file meta.json records, was made from this model.onnx, and
    is the int8 graph of the network meta.json describes; model.onnx is the file meta.json records."""
    graph, again = path / INT8_GRAPH, export_command(path, int8=True)
    if not graph.is_file():
        raise MissingInt8Graph(f"{graph}: missing; meta.json records this int8 graph (serving runs it by default). "
                               f"Add it again with: {again}, or serve float32 (CHARGEN_PRECISION=float32)")
    data = _read(graph, CorruptInt8Graph)
    if _sha256(data) != meta.int8.sha256:
        raise CorruptInt8Graph(f"{graph}: not the int8 graph meta.json records (its sha256 differs: damaged, or "
                               f"replaced by another file); make it again with: {again}")
    made_from, recorded = meta.int8.float32_sha256, meta.sha256.model_onnx if meta.sha256 is not None else None
    float32 = _sha256(_read(path / GRAPH, CorruptGraph)) if made_from or recorded else None
    if recorded is not None and float32 != recorded:
        _check_float32(path, meta)  # raises, saying what is wrong with model.onnx
    if made_from is not None and float32 != made_from:
        _check_graph(path / GRAPH, meta)  # a damaged model.onnx is said as such
        raise CorruptInt8Graph(f"{graph}: made from another model.onnx than the artifact's (model.onnx's sha256 "
                               f"differs from the one meta.json records); make it again with: {again}")
    _check_graph(graph, meta, data, "int8", recorded=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _not_recorded(path: Path, found: str, recorded: str, other: str) -> str:
    """The start of the message for a file whose sha256 is not the one meta.json records."""
    return (f"{path}: does not match meta.json (sha256 {found[:12]}…, meta.json records {recorded[:12]}…): "
            f"{other}, or changed since the artifact was written")


def _read(path: Path, error: type[ArtifactError]) -> bytes:
    """The bytes of an artifact's file; `error` naming it and the system's reason when it cannot be
    read (permissions, an I/O error)."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read: {e.strerror or e}") from None


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
    vocab_path = path / "vocab.json"
    data = _read(vocab_path, BadVocab)
    vocab = _read_vocab(vocab_path, data)
    if meta.vocab_size != len(vocab):
        raise VocabMismatch(f"{path}: meta.json says vocab_size {meta.vocab_size} but vocab.json has {len(vocab)}")
    if meta.sha256 is not None and _sha256(data) != meta.sha256.vocab_json:
        raise VocabMismatch(_not_recorded(vocab_path, _sha256(data), meta.sha256.vocab_json, "another model's "
                                          "vocabulary") + "; put the artifact's own vocab.json back")
    model_path = path / "model.keras"
    if keras and not zipfile.is_zipfile(model_path):
        raise CorruptModel(f"{model_path}: not a Keras archive (not a zip file; truncated or overwritten?)")
    return path, meta, vocab


def _check_graph(graph_path: Path, meta: ArtifactMeta, data: bytes | None = None, precision: str = "float32",
                 recorded: bool = False) -> None:
    """The graph (its bytes, else read from `graph_path`) is the graph of the network meta.json
    describes. `recorded`: its sha256 is the one meta.json records, so it is the graph written with
    meta.json, and a network that differs is meta.json's fault, not the graph's."""
    config = meta.config
    error = CorruptGraph if precision == "float32" else CorruptInt8Graph
    rebuild = f"rebuild it with: {export_command(graph_path.parent, precision == 'int8')}"
    network = described(config.cell, config.layers, config.units, meta.vocab_size)
    try:
        problems = graph_problems(graph_path if data is None else data, cell=config.cell, layers=config.layers,
                                  units=config.units, vocab_size=meta.vocab_size, embedding=config.embedding,
                                  name=str(graph_path), precision=precision)
    except ValueError as e:  # its message names the file and what is wrong with it
        raise error(f"{e}; {rebuild}") from None
    if problems and recorded:
        raise BadMeta(f"{graph_path.with_name('meta.json')}: describes {network}, but {graph_path.name}, the file it "
                      f"records (the same sha256), is another network: {'; '.join(problems)}; meta.json was changed "
                      "after the artifact was written: put its own back")
    if problems:
        raise error(f"{graph_path}: does not match meta.json ({network}): {'; '.join(problems)}; {rebuild}")


def load(path: str | Path, precision: str = "auto") -> Artifact:
    """The artifact at `path` (or a run directory's best), checked, as serving reads it: the graph
    it serves for `precision` (auto, float32 or int8; see the module's docstring), vocab.json and
    meta.json (model is None: the Keras network is model/training/artifacts.py's)."""
    path, meta, vocab = check(path, precision=precision)
    return Artifact(path, None, vocab, meta, path / GRAPH, served_precision(path, meta, precision))


def _read_meta(path: Path) -> ArtifactMeta:
    try:
        text = _read(path, BadMeta).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadMeta(f"{path}: not valid JSON: not UTF-8 ({e})") from None
    return ArtifactMeta.from_json(text, str(path))


def _read_vocab(path: Path, data: bytes) -> Vocab:
    """vocab.json's vocabulary from its bytes `data`."""
    try:
        return Vocab.from_json(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadVocab(f"{path}: not valid JSON: not UTF-8 ({e})") from None
    except ValueError as e:  # "not valid JSON: ...", or what in it is not a vocabulary
        raise BadVocab(f"{path}: {e}") from None
