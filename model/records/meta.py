"""An artifact's record: the files it holds, meta.json (`ArtifactMeta`, read strictly: every field of
its declared type, unknown fields refused) and the errors that name what is wrong with one. The
runtime reads artifacts (model/runtime/artifact.py), the training side writes them
(model/training/artifacts.py); this module imports neither.

An artifact is a directory:
    model.keras   the network (Keras 3 zip format, loaded with safe_mode=True; no pickle)
    model.onnx    the same network as an ONNX graph (model/training/onnx_graph.py): what serving runs
                  in float32
    model.int8.onnx  (LSTM artifacts) the same graph with int8 weights (model/training/quantize.py),
                  recorded in meta.json's `int8` with its sha256 and its loss beside model.onnx's;
                  what serving runs by default when it passed its quality gate
    vocab.json    {"chars": [...]}: id -> character
    meta.json     an `ArtifactMeta`: format version, network config, corpus, split, validation loss,
                  training figures, versions and the command line that made it, and the sha256 of
                  model.onnx and vocab.json (`FileHashes`), which the loader compares
and, when `chargen train` made it, history.json, history.csv and loss.png: the run's history up to
the evaluation it was saved at, written once with the rest.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime
from pathlib import Path

from model.records.config import ModelConfig, Recipe
from model.records.files import parse_json

FORMAT_VERSION = 1
GRAPH = "model.onnx"
INT8_GRAPH = "model.int8.onnx"
FILES = ("model.keras", GRAPH, "vocab.json", "meta.json")
PRECISIONS = ("float32", "int8")  # the graphs an artifact can serve: model.onnx, model.int8.onnx
# How much worse (nats/char, in windows of 256 on the artifact's validation text) an int8 graph may
# score than the float32 graph and still be what serving runs by default (issue 24).
MAX_INT8_LOSS_INCREASE = 0.005


def artifact_in(path: Path) -> Path | None:
    """The artifact directory `path` names: `path` itself when it holds meta.json, its best/ when it
    is a training run's directory; None when neither (the loader's checks then say what is missing)."""
    for found in (path, path / "best"):
        if (found / "meta.json").is_file():
            return found
    return None


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


class MissingInt8Graph(ArtifactError):
    """meta.json records a model.int8.onnx that is not there, or int8 was asked of an artifact
    without one (or whose int8 graph failed its quality gate)."""


class CorruptInt8Graph(ArtifactError):
    """A model.int8.onnx that cannot be read, is not the graph of the network meta.json describes,
    or is not the file meta.json records (sha256)."""


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
class Int8Info:
    """meta.json's `int8`: the artifact's int8 graph, or why it has none, and the loss of both
    graphs on the same text, measured when the int8 graph was made. Serving runs it by default only
    when it `passed`: at most `max_increase` nats/char worse than the float32 graph."""

    sha256: str | None  # of model.int8.onnx; None: the artifact has none (`reason` says why)
    float32_sha256: str | None = None  # of the model.onnx it was made from
    reason: str | None = None  # why there is no int8 graph (a GRU or RNN)
    text: str | None = None  # what was scored: the artifact's validation text, or the file given
    window: int | None = None  # the measure: consecutive windows of this many predictions from a fresh state
    chars_scored: int | None = None
    float32_nats_per_char: float | None = None  # model.onnx's loss on that text
    int8_nats_per_char: float | None = None  # model.int8.onnx's
    max_increase: float = MAX_INT8_LOSS_INCREASE  # the quality gate

    @property
    def increase(self) -> float | None:
        if self.int8_nats_per_char is None or self.float32_nats_per_char is None:
            return None
        return self.int8_nats_per_char - self.float32_nats_per_char

    @property
    def passed(self) -> bool:
        return self.sha256 is not None and self.increase is not None and self.increase <= self.max_increase

    def verdict(self) -> str:
        """One line: the figures and what they mean for serving."""
        if self.sha256 is None:
            return f"no int8 graph: {self.reason or 'not made'}; serving runs float32"
        figures = (f"int8 {self.int8_nats_per_char:.4f} nats/char against float32 {self.float32_nats_per_char:.4f} "
                   f"({self.increase:+.4f}; windows of {self.window} on {self.chars_scored:,} characters of {self.text})")
        if self.passed:
            return f"{figures}: within the gate of {self.max_increase:+g}, so serving runs int8 by default"
        return (f"{figures}: above the gate of {self.max_increase:+g} nats/char, so int8 is not made the default; "
                "serving runs float32")


@dataclass(frozen=True)
class FileHashes:
    """meta.json's `sha256`: of the files serving reads beside it, as they were written with it. The
    loader compares them, so a model.onnx or vocab.json of another model, even one of the same shape,
    is refused rather than served. Absent from artifacts written before it (they load unchecked);
    `chargen export` adds it."""

    model_onnx: str
    vocab_json: str


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
    recipe: Recipe | None = None  # model/training/recipe.py; absent from artifacts trained before recipes


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
    sha256: FileHashes | None = None  # of model.onnx and vocab.json; absent from artifacts written before it
    int8: Int8Info | None = None  # the int8 graph (model.int8.onnx); absent from artifacts made before it

    def precision(self, asked: str = "auto") -> str:
        """The graph serving runs for `asked` ("auto", "float32" or "int8"): auto is int8 when the
        artifact has an int8 graph that passed its quality gate, float32 otherwise. Asking for int8
        of an artifact that has none, or whose graph failed the gate, is MissingInt8Graph."""
        if asked not in ("auto", *PRECISIONS):
            raise ValueError(f"precision must be auto, float32 or int8, got {asked!r}")
        if asked == "float32":
            return "float32"
        if self.int8 is not None and self.int8.passed:
            return "int8"
        if asked == "auto":
            return "float32"
        if self.int8 is not None and self.int8.sha256 is not None:  # measured, and failed the gate
            raise MissingInt8Graph(f"int8 was asked for, but this artifact's int8 graph failed its quality gate: "
                                   f"{self.int8.verdict()}")
        float32 = "--precision float32 or CHARGEN_PRECISION=float32"
        if self.config.cell != "lstm":  # int8 graphs are made for LSTMs only (model/training/quantize.py)
            why = (self.int8 and self.int8.reason) or "int8 graphs are made for LSTMs only"
            cell = self.config.cell.upper()
            raise MissingInt8Graph(f"int8 was asked for, but a {cell} artifact has no int8 graph and `chargen export "
                                   f"--int8` cannot add one: {why}; run it in float32 ({float32}; auto, the default, does)")
        why = (self.int8 and self.int8.reason) or "meta.json records none: the artifact was made before int8 graphs"
        raise MissingInt8Graph(f"int8 was asked for, but this artifact has no int8 graph ({why}); add one with: "
                               f"chargen export --int8 --artifact DIR --corpus FILE, or run it in float32 ({float32})")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["training"] and d["training"]["recipe"] is None:  # an artifact from before recipes reads back unchanged
            del d["training"]["recipe"]
        if not d["resumed"]:  # written only when there were resumes, for the same reason
            del d["resumed"]
        if d["int8"] is None:  # written only when made: older artifacts read back unchanged
            del d["int8"]
        if d["sha256"] is None:  # written only when recorded, for the same reason
            del d["sha256"]
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
            data = parse_json(text)
        except ValueError as e:  # says "not valid JSON: ..."
            raise BadMeta(f"{where}: {e}") from None
        if not isinstance(data, dict):
            raise BadMeta(f"{where}: expected a JSON object")
        version = data.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise UnsupportedFormat(
                f"{where}: format_version {version!r} is not supported (this chargen reads version {FORMAT_VERSION})"
            )
        meta = read_record(cls, data, where, "")
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


def read_record(cls: type, data, where: str, prefix: str):
    """An instance of the dataclass `cls` from a JSON object, every field of its declared type: the one
    strict reader of meta.json and of a training run's state.json (model/training/run_state.py)."""
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
        return read_record(kind, value, where, name + ".")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise BadMeta(f"{where}: field {name!r} must be {_KINDS[kind]}, got {value!r:.60}")
    return value
