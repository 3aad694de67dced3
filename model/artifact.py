"""Save and load an artifact; validate it. Nothing else writes or reads one.

An artifact is a directory:
    model.keras   the network (Keras 3 zip format, loaded with safe_mode=True; no pickle)
    model.onnx    the same network as an ONNX graph (model/onnx_graph.py): what serving runs
    vocab.json    {"chars": [...]}: id -> character
    meta.json     an `ArtifactMeta`: format version, network config, corpus, split, validation loss,
                  training figures, versions and the command line that made it
and, when `chargen train` made it, history.json, history.csv and loss.png: the run's history up to
the epoch it was saved at, written once with the rest (a published artifact is never rewritten,
except by `add_graph`, which gives an artifact made before model.onnx existed its graph).

Directories are written under a temporary name beside the target and renamed into place, so a crash
never leaves half an artifact under the real name.

Two ways in: `load(path)` is the serving load (model.onnx, vocab.json and meta.json; it never
imports Keras, so a serving install needs no training stack), and `load(path, keras=True)` also
loads the Keras network, for evaluation, training and benchmarks (model.onnx is optional there, so
an artifact made before it existed still evaluates; it is checked when present). `check()` does
every check of the same load but loading Keras, so a wrong path or a damaged file is reported in a
fraction of a second (the command line calls it before the heavy imports; `load()` runs it first).
Keras is imported only inside `load(keras=True)`, `save()` and `add_graph()`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import tempfile
import types
import typing
import zipfile
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from model.network import ModelConfig
from model.recipe import Recipe
from model.vocab import Vocab

if TYPE_CHECKING:
    import keras

FORMAT_VERSION = 1
GRAPH = "model.onnx"
FILES = ("model.keras", GRAPH, "vocab.json", "meta.json")


class ArtifactError(Exception):
    """Base class: an artifact that cannot be used. The message names the path and the problem."""


class ArtifactNotFound(ArtifactError):
    pass


class MissingFile(ArtifactError):
    pass


class CorruptModel(ArtifactError):
    pass


class MissingGraph(ArtifactError):
    """No model.onnx: an artifact made before it existed. `add_graph` (chargen export) adds it."""


class CorruptGraph(ArtifactError):
    """A model.onnx that cannot be read, or is not the graph of the network meta.json describes."""


class BadVocab(ArtifactError):
    pass


class BadMeta(ArtifactError):
    pass


class UnsupportedFormat(ArtifactError):
    pass


class VocabMismatch(ArtifactError):
    pass


# ---------------------------------------------------------------- meta.json


@dataclass(frozen=True)
class CorpusInfo:
    name: str
    size_bytes: int
    chars: int
    sha256: str  # of the file's bytes


@dataclass(frozen=True)
class SplitInfo:
    validation_fraction: float
    train_chars: int
    validation_chars: int


@dataclass(frozen=True)
class ValidationInfo:
    epoch: int
    nats_per_char: float
    bits_per_char: float
    chars_scored: int
    # true: the loss of a fixed sample of the validation text (training's --eval-chars: evenly spaced
    # pieces, the same at every evaluation), not of all of it
    sample: bool = False


@dataclass(frozen=True)
class TrainingInfo:
    epochs: int
    seconds: float
    chars_per_second: int | None
    seq_len: int
    batch_size: int
    lr: float
    lr_decay: float
    clipnorm: float
    seed: int
    recipe: Recipe | None = None  # model/recipe.py; absent from artifacts trained before recipes


@dataclass(frozen=True)
class Versions:
    keras: str
    backend: str
    backend_version: str
    numpy: str
    python: str


@dataclass(frozen=True, kw_only=True)
class ArtifactMeta:
    """meta.json. Fields are in the file's order; a section an artifact does not have is null
    (an artifact saved outside a training run has no corpus, split, ...)."""

    format_version: int = FORMAT_VERSION
    config: ModelConfig
    parameters: int | None = None
    corpus: CorpusInfo | None = None
    split: SplitInfo | None = None
    validation: ValidationInfo | None = None
    training: TrainingInfo | None = None
    versions: Versions | None = None
    command: str | None = None  # the command line that started the training run
    resumed: list[str] = field(default_factory=list)  # the command line of each --resume since, in order
    created: str | None = None  # ISO 8601, UTC
    vocab_size: int

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["training"] and d["training"]["recipe"] is None:  # an artifact from before recipes reads back unchanged
            del d["training"]["recipe"]
        if not d["resumed"]:  # written only when there were resumes, for the same reason
            del d["resumed"]
        if d["validation"] and not d["validation"]["sample"]:  # written only when true: older artifacts read back unchanged
            del d["validation"]["sample"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, where: str = "meta.json") -> "ArtifactMeta":
        """The record in `text`; BadMeta (UnsupportedFormat for another version) names `where` and
        the first field that is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadMeta(f"{where}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BadMeta(f"{where}: expected a JSON object")
        version = data.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise UnsupportedFormat(
                f"{where}: format_version {version!r} is not supported (this chargen reads version {FORMAT_VERSION})"
            )
        meta = _record(cls, data, where, "")
        if meta.training is not None and meta.training.recipe is not None:
            try:
                meta.training.recipe.check()
            except ValueError as e:
                raise BadMeta(f"{where}: invalid training.recipe: {e}") from None
        if meta.created is not None:
            try:
                datetime.fromisoformat(meta.created)
            except ValueError:
                raise BadMeta(f"{where}: field 'created' must be an ISO 8601 time, got {meta.created!r}") from None
        return meta


_KINDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _record(cls: type, data, where: str, prefix: str):
    """An instance of the dataclass `cls` from a JSON object, every field of its declared type."""
    if not isinstance(data, dict):
        raise BadMeta(f"{where}: field {prefix.rstrip('.')!r} must be an object, got {data!r:.60}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BadMeta(f"{where}: unknown field {prefix + unknown[0]!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        name = prefix + f.name
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise BadMeta(f"{where}: missing field {name!r}")
            continue
        values[f.name] = _value(hints[f.name], data[f.name], where, name)
    return cls(**values)


def _value(kind, value, where: str, name: str):
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)  # X | None -> (X, NoneType)
    if value is None and type(None) in options:
        return None
    kind = next(k for k in options if k is not type(None))
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise BadMeta(f"{where}: field {name!r} must be a list, got {value!r:.60}")
        return [_value(item, v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if kind is ModelConfig:
        if not isinstance(value, dict):
            raise BadMeta(f"{where}: invalid config: expected an object, got {value!r:.60}")
        try:
            return ModelConfig.from_dict(value)
        except (TypeError, ValueError) as e:
            raise BadMeta(f"{where}: invalid config: {e}") from None
    if is_dataclass(kind):
        return _record(kind, value, where, name + ".")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise BadMeta(f"{where}: field {name!r} must be {_KINDS[kind]}, got {value!r:.60}")
    return value


# ---------------------------------------------------------------- loading


@dataclass
class Artifact:
    path: Path
    model: keras.Model | None  # only from load(path, keras=True)
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
    if not (path / "meta.json").exists() and (path / "best" / "meta.json").exists():
        return path / "best"
    return path


def export_command(path: Path) -> str:
    """The command that gives the artifact at `path` its model.onnx (in the messages that need one)."""
    return f".venv/bin/chargen export --artifact {shlex.quote(str(path))}"


def check(path: str | Path, *, keras: bool = False) -> tuple[Path, ArtifactMeta, Vocab]:
    """Everything `load(path, keras=keras)` checks, without loading Keras: the directory, the files
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
    from model.onnx_graph import check_graph  # onnx, not Keras; only when a graph is checked

    config = meta.config
    try:
        check_graph(graph_path if data is None else data, cell=config.cell, layers=config.layers,
                    units=config.units, vocab_size=meta.vocab_size, name=str(graph_path))
    except ValueError as e:  # its message names the file and every mismatch
        raise CorruptGraph(f"{e}; rebuild it with: {export_command(graph_path.parent)}") from None


def load(path: str | Path, *, keras: bool = False) -> Artifact:
    """The artifact at `path` (or a run directory's best), checked. By default the serving load:
    model.onnx, vocab.json and meta.json, with model=None and onnx_path set; Keras is never
    imported. With `keras=True` also the Keras network, for evaluation, training and benchmarks;
    model.onnx may then be absent (onnx_path None), and is checked when it is there."""
    if not keras:
        path, meta, vocab = check(path)
        return Artifact(path, None, vocab, meta, path / GRAPH)
    path, meta, vocab = _check_files(path, keras=True)
    model = _keras_model(path, meta, vocab)  # first: when meta.json is wrong, this says how
    onnx_path = path / GRAPH if (path / GRAPH).is_file() else None
    if onnx_path is not None:
        _check_graph(onnx_path, meta)
    return Artifact(path, model, vocab, meta, onnx_path)


def _keras_model(path: Path, meta: ArtifactMeta, vocab: Vocab) -> keras.Model:
    """model.keras, checked against meta.json and vocab.json."""
    import keras

    from model.network import config_of

    model_path, config = path / "model.keras", meta.config
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types for damaged archives
        raise CorruptModel(f"{model_path}: cannot be loaded: {type(e).__name__}: {e}") from None

    try:
        found = config_of(model)
    except ValueError as e:
        raise CorruptModel(f"{model_path}: not a chargen network: {e}") from None
    if (found.cell, found.layers, found.units, found.embedding) != (config.cell, config.layers, config.units, config.embedding):
        raise BadMeta(f"{path}: meta.json describes {config} but model.keras holds {found}")
    vocab_in = model.get_layer("embedding").input_dim
    vocab_out = model.get_layer("logits").units
    if not len(vocab) == vocab_in == vocab_out:
        raise VocabMismatch(
            f"{path}: vocab.json has {len(vocab)} characters but the model was built for "
            f"{vocab_in} (input) and {vocab_out} (output)"
        )
    return model


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


# ---------------------------------------------------------------- saving


def save(path: str | Path, model: keras.Model, vocab: Vocab, meta: ArtifactMeta,
         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a new artifact directory at `path` (which must not exist) atomically, with
    `extra_files` (name -> contents) beside the four files of an artifact.

    The network is saved without optimizer state or dropout settings that only matter in training:
    a fresh inference model with the same weights, and its ONNX graph.
    """
    from model.network import build_model, copy_weights, trainable_weights

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new directory")
    if meta.vocab_size != len(vocab):
        raise ValueError(f"meta.vocab_size is {meta.vocab_size} but the vocabulary has {len(vocab)} characters")
    text = meta.to_json()
    ArtifactMeta.from_json(text, f"{path / 'meta.json'} (about to be written)")  # what is written must load
    path.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        inference = build_model(meta.config, len(vocab))
        copy_weights(trainable_weights(model), inference)  # a training network's recipe layers hold no weights
        inference.save(tmp / "model.keras")
        (tmp / GRAPH).write_bytes(_graph_bytes(inference, meta, path / GRAPH))
        (tmp / "vocab.json").write_text(vocab.to_json(), encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / "meta.json").write_text(text, encoding="utf-8")
        _fsync_dir(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def add_graph(path: str | Path) -> tuple[Path, bool]:
    """Give an existing artifact (or a run's best) the model.onnx built from its model.keras, as
    `chargen export` does for one made before training wrote it. Returns the graph's path and
    whether it was written: a graph that is already the one built is left alone, so running it
    again changes nothing, and a damaged one is replaced. The graph is written to a temporary file
    beside it and renamed, so a reader sees the old graph or the new one, never part of one."""
    path, meta, vocab = _check_files(path, keras=True)  # not the graph: a damaged one is replaced
    target = path / GRAPH
    data = _graph_bytes(_keras_model(path, meta, vocab), meta, target)
    if target.is_file() and target.read_bytes() == data:
        return target, False
    tmp = target.with_name(f".{GRAPH}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target, True


def _graph_bytes(model: keras.Model, meta: ArtifactMeta, where: Path) -> bytes:
    """The serialized ONNX graph of a Keras network, after checking that the loader accepts it."""
    from model.onnx_graph import build_graph

    try:
        data = build_graph(model).SerializeToString()
    except ValueError as e:  # a layer setting the ONNX operators do not compute
        raise CorruptModel(f"{where.with_name('model.keras')}: cannot be written as an ONNX graph: {e}") from None
    _check_graph(where, meta, data)
    return data


def point(link: str | Path, target: str | Path) -> None:
    """Atomically make `link` a symlink to `target` (relative), replacing what it pointed to."""
    link, target = Path(link), Path(target)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
