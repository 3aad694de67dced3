"""Writing artifacts, and loading one's Keras network: what training, `chargen export` and
`chargen evaluate` do (reading one for serving is model/runtime/artifact.py's).

Directories are written under a temporary name beside the target and renamed into place, so a crash
never leaves half an artifact under the real name. meta.json records the sha256 of the model.onnx
and vocab.json written with it (its `sha256`), which the loader compares. A published artifact is
never rewritten, except by `add_graph`, which gives an artifact made before model.onnx existed its
graph and one made before meta.json's `sha256` that record, and `add_int8`, which gives an LSTM
artifact its int8 graph (model.int8.onnx) and meta.json its `int8` record.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.records.files import fsync, write_atomic
from model.records.meta import (GRAPH, INT8_GRAPH, MAX_INT8_LOSS_INCREASE, ArtifactMeta, BadMeta, CorruptModel,
                                FileHashes, Int8Info, VocabMismatch)
from model.records.vocab import Vocab
from model.runtime.artifact import Artifact, _check_files, _check_float32, _check_graph, _sha256, check
from model.training.network import build_model, config_of, copy_weights, trainable_weights

if TYPE_CHECKING:
    import keras


def load_keras(path: str | Path) -> Artifact:
    """The artifact at `path` (or a run directory's best) with its Keras network, for evaluation,
    training and benchmarks: model.keras, vocab.json and meta.json; model.onnx may be absent
    (onnx_path None: an artifact made before it existed), and is checked when it is there."""
    path, meta, vocab = _check_files(path, keras=True)
    model = _keras_model(path, meta, vocab)  # first: when meta.json is wrong, this says how
    onnx_path = path / GRAPH if (path / GRAPH).is_file() else None
    if onnx_path is not None:
        _check_float32(path, meta)
    return Artifact(path, model, vocab, meta, onnx_path)


def _keras_model(path: Path, meta: ArtifactMeta, vocab: Vocab) -> keras.Model:
    """model.keras, checked against meta.json and vocab.json."""
    import keras

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


def save(path: str | Path, model: keras.Model, vocab: Vocab, meta: ArtifactMeta,
         extra_files: dict[str, bytes] | None = None, int8_text: tuple[np.ndarray, str] | None = None) -> Path:
    """Write a new artifact directory at `path` (which must not exist) atomically, with
    `extra_files` (name -> contents) beside the four files of an artifact.

    The network is saved without optimizer state or dropout settings that only matter in training:
    a fresh inference model with the same weights, and its ONNX graph. With `int8_text` (ids, what
    they are: training passes its validation text), an LSTM gets its int8 graph too, scored beside
    the float32 graph on those ids, and meta.json its `int8` record (another cell: why it has none).
    meta.json records the sha256 of the model.onnx and vocab.json written (whatever `meta.sha256` says).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose a new directory")
    if meta.vocab_size != len(vocab):
        raise ValueError(f"meta.vocab_size is {meta.vocab_size} but the vocabulary has {len(vocab)} characters")
    ArtifactMeta.from_json(meta.to_json(), f"{path / 'meta.json'} (about to be written)")  # what is written must load
    path.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        inference = build_model(meta.config, len(vocab))
        copy_weights(trainable_weights(model), inference)  # a training network's recipe layers hold no weights
        inference.save(tmp / "model.keras")
        graph = _graph_bytes(inference, meta, path / GRAPH)
        (tmp / GRAPH).write_bytes(graph)
        if int8_text is not None:
            int8, info = _int8(graph, meta, path, *int8_text)
            if int8 is not None:
                (tmp / INT8_GRAPH).write_bytes(int8)
            meta = dataclasses.replace(meta, int8=info)
        vocab_bytes = vocab.to_json().encode("utf-8")
        (tmp / "vocab.json").write_bytes(vocab_bytes)
        meta = dataclasses.replace(meta, sha256=FileHashes(model_onnx=_sha256(graph), vocab_json=_sha256(vocab_bytes)))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / "meta.json").write_text(meta.to_json(), encoding="utf-8")
        for child in tmp.iterdir():  # on the disk before the rename publishes them
            fsync(child)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def add_graph(path: str | Path) -> tuple[Path, bool]:
    """Give an existing artifact (or a run's best) the model.onnx built from its model.keras, as
    `chargen export` does for one made before training wrote it, and meta.json the sha256 of it and
    of vocab.json where it does not record them. Returns the graph's path and whether the graph was
    written: a graph that is already the one built is left alone, so running it again changes
    nothing, and a damaged one, or another model's, is replaced; but a model.keras that builds
    another graph than the one meta.json records is refused (the archive is the file that changed). The graph, then meta.json, is
    replaced atomically, so a reader sees the old file or the new one, never part of one."""
    path, meta, vocab = _check_files(path, keras=True)  # not the graph: a damaged one is replaced
    target = path / GRAPH
    data = _graph_bytes(_keras_model(path, meta, vocab), meta, target)
    present = target.read_bytes() if target.is_file() else None
    recorded = meta.sha256.model_onnx if meta.sha256 is not None else meta.int8.float32_sha256 if meta.int8 else None
    if present is not None and present != data and _sha256(present) == recorded:
        # model.onnx is the graph written with meta.json, and model.keras builds another: the archive is what changed
        raise CorruptModel(f"{path / 'model.keras'}: its network is not the one of model.onnx, the graph meta.json records "
                           "(its sha256): model.keras is another model's, or changed since the artifact was written; put "
                           "the artifact's own back (model.onnx is left as it is)")
    written = present != data
    if written:
        write_atomic(target, data)
    # vocab.json as _check_files read it: the one meta.json records, or (not recorded yet) the one model.keras fits
    hashes = FileHashes(model_onnx=_sha256(data), vocab_json=_sha256((path / "vocab.json").read_bytes()))
    if meta.sha256 != hashes:
        _write_meta(path, dataclasses.replace(meta, sha256=hashes))
    return target, written


def add_int8(path: str | Path, ids: np.ndarray, text: str,
             max_increase: float = MAX_INT8_LOSS_INCREASE) -> tuple[Path, Int8Info, bool]:
    """Give an artifact (or a run's best) its int8 graph, made from its model.onnx (which must be
    sound), scored beside it on `ids` (`text` says what they are), and meta.json's `int8` record
    (for a GRU or RNN: why there is no int8 graph). Returns the artifact's path, the record, and
    whether anything was written: running it again on the same text changes nothing. The graph is
    written before meta.json, each atomically; `max_increase` is the quality gate (tests lower it)."""
    path, meta, _ = check(path, precision="float32")  # the float32 graph is checked as serving checks it
    graph = (path / GRAPH).read_bytes()
    int8, info = _int8(graph, meta, path, ids, text, max_increase)
    written = False
    if int8 is not None and not ((path / INT8_GRAPH).is_file() and (path / INT8_GRAPH).read_bytes() == int8):
        write_atomic(path / INT8_GRAPH, int8)
        written = True
    if int8 is None and (path / INT8_GRAPH).exists():  # a graph of another cell's artifact, left by hand
        (path / INT8_GRAPH).unlink()
        written = True
    if meta.int8 != info:
        _write_meta(path, dataclasses.replace(meta, int8=info))
        written = True
    return path, info, written


def _write_meta(path: Path, meta: ArtifactMeta) -> None:
    """Replace the meta.json of the artifact at `path` with `meta`, atomically."""
    text = meta.to_json()
    ArtifactMeta.from_json(text, f"{path / 'meta.json'} (about to be written)")
    write_atomic(path / "meta.json", text)


def _int8(graph: bytes, meta: ArtifactMeta, path: Path, ids: np.ndarray, text: str,
          max_increase: float = MAX_INT8_LOSS_INCREASE) -> tuple[bytes | None, Int8Info]:
    """(model.int8.onnx's bytes, meta.json's record) for an artifact's float32 graph; (None, why) for a
    cell that has no int8 graph."""
    from model.training.quantize import int8_graph, measure, none_for

    if meta.config.cell != "lstm":
        return None, none_for(meta.config.cell)
    if len(ids) < 2:
        raise ValueError(f"{text}: at least two characters are needed to score the int8 graph, got {len(ids)}")
    int8 = int8_graph(graph)
    _check_graph(path / INT8_GRAPH, meta, int8, precision="int8")
    return int8, measure(graph, int8, ids, text, max_increase)


def _graph_bytes(model: keras.Model, meta: ArtifactMeta, where: Path) -> bytes:
    """The serialized ONNX graph of a Keras network, after checking that the loader accepts it."""
    from model.training.onnx_graph import build_graph  # onnx: most of a second, only when a graph is written

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
