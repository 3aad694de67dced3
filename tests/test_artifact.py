"""Artifacts: a round trip keeps the logits (Keras and the ONNX graph); every kind of damage has its
own error naming the file, and so has another model's graph or vocabulary (meta.json records their
sha256); meta.json is one typed record; the module, its check and the serving load need no Keras."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model.runtime import artifact
from model.training import artifacts
from model.records.meta import ArtifactError, ArtifactMeta, ArtifactNotFound, BadMeta, BadVocab, CorpusInfo, CorruptGraph, CorruptModel, FileHashes, MissingFile, MissingGraph, UnsupportedFormat, VocabMismatch
from model.records.config import ModelConfig
from model.training.network import build_model
from model.training.onnx_graph import build_graph
from model.records.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(cell="gru", layers=2, units=16, embedding=8)
VOCAB = Vocab.from_text("abcdefgh \n")
X = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]], dtype=np.int32)
META = ArtifactMeta(config=CONFIG, corpus=CorpusInfo(name="letters", size_bytes=10, chars=10, sha256="0" * 64),
                    vocab_size=len(VOCAB))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An artifact of a randomly initialised network, and that network."""
    keras.utils.set_random_seed(3)
    model = build_model(CONFIG, len(VOCAB))
    path = artifacts.save(tmp_path_factory.mktemp("artifact") / "a", model, VOCAB, META)
    return path, model


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    """A fresh copy to damage."""
    return Path(shutil.copytree(saved[0], tmp_path / "a"))


def raises(cls, path: Path, names: str, keras: bool = True) -> ArtifactError:
    """The error of load(path, keras=keras): the Keras load unless said otherwise."""
    with pytest.raises(ArtifactError) as e:
        artifacts.load_keras(path) if keras else artifact.load(path)
    assert type(e.value) is cls, f"expected {cls.__name__}, got {type(e.value).__name__}: {e.value}"
    assert names in str(e.value), f"message should name {names}: {e.value}"
    return e.value


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(path: Path) -> FileHashes:
    """What meta.json records of the artifact at `path`'s model.onnx and vocab.json."""
    return FileHashes(model_onnx=sha256_of(path / "model.onnx"), vocab_json=sha256_of(path / "vocab.json"))


def edit_meta(path: Path, edit) -> None:
    """meta.json changed in place by `edit(data)`."""
    data = json.loads((path / "meta.json").read_text())
    edit(data)
    (path / "meta.json").write_text(json.dumps(data))


def unrecorded(data: dict) -> None:
    """An edit_meta: meta.json as written before it recorded the sha256 of model.onnx and vocab.json."""
    del data["sha256"]


def another_graph() -> bytes:
    """A sound graph of the same shape as `saved`'s, of another network (other weights)."""
    keras.utils.set_random_seed(4)
    return build_graph(build_model(CONFIG, len(VOCAB))).SerializeToString()


def graph_logits(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    """The graph's logits for x (B, T) from the zero state, run by ONNX Runtime."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    state = np.zeros((CONFIG.layers, x.shape[0], CONFIG.units), np.float32)
    return sess.run(["logits"], {"ids": x.astype(np.int64), "h": state})[0]


# ---------------------------------------------------------------- round trip


def test_round_trip_gives_identical_logits(saved):
    path, model = saved
    loaded = artifacts.load_keras(path)
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.keras", "model.onnx", "vocab.json"]
    assert loaded.vocab.chars == VOCAB.chars
    assert loaded.config == CONFIG
    assert loaded.meta == dataclasses.replace(META, sha256=hashes(path))
    assert loaded.meta.format_version == artifact.FORMAT_VERSION and loaded.meta.vocab_size == len(VOCAB)
    assert loaded.onnx_path == path / "model.onnx"
    expected = keras.ops.convert_to_numpy(model(X))
    got = keras.ops.convert_to_numpy(loaded.model(X))
    assert got.shape == (2, 10, len(VOCAB))
    np.testing.assert_array_equal(got, expected)
    # the graph saved beside it computes the same network
    np.testing.assert_allclose(graph_logits(loaded.onnx_path, X), expected, atol=1e-5, rtol=0)


def test_the_serving_load_has_the_graph_and_no_keras_network(saved):
    path, _ = saved
    served = artifact.load(path)
    assert served.model is None and served.onnx_path == path / "model.onnx"
    assert (served.path, served.vocab.chars, served.meta) == (path, VOCAB.chars, dataclasses.replace(META, sha256=hashes(path)))
    assert artifact.Artifact(path, None, VOCAB, META).onnx_path is None  # the record, positionally


def test_saved_network_is_for_inference_only(tmp_path):
    """A trained, compiled network is saved without its optimizer state."""
    import h5py

    model = build_model(CONFIG, len(VOCAB))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(X[:, :-1], X[:, 1:])
    path = artifacts.save(tmp_path / "a", model, VOCAB, ArtifactMeta(config=CONFIG, vocab_size=len(VOCAB)))
    loaded = artifacts.load_keras(path)
    assert getattr(loaded.model, "optimizer", None) is None
    with zipfile.ZipFile(path / "model.keras") as z:
        assert sorted(z.namelist()) == ["config.json", "metadata.json", "model.weights.h5"]
        z.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as h5:
        assert "optimizer" not in h5
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.model(X)), keras.ops.convert_to_numpy(model(X)))


def test_a_run_directory_resolves_to_its_best_artifact(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved[0], run / "artifacts" / "epoch-002")
    artifacts.point(run / "best", run / "artifacts" / "epoch-002")
    assert artifact.load(run).path == run / "best"


def test_save_refuses_an_existing_directory_and_leaves_nothing_half_written(saved, tmp_path):
    _, model = saved
    with pytest.raises(FileExistsError, match="already exists"):
        artifacts.save(saved[0], model, VOCAB, META)
    target = tmp_path / "new"
    with pytest.raises(FileNotFoundError):  # fails part-way: after model.keras, while writing extras
        artifacts.save(target, model, VOCAB, META, extra_files={"no/such/dir": b"x"})
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temporary directory


def test_save_refuses_a_record_that_would_not_load(saved, tmp_path):
    _, model = saved
    with pytest.raises(ValueError, match="vocab_size is 3 but the vocabulary has 10"):
        artifacts.save(tmp_path / "a", model, VOCAB, ArtifactMeta(config=CONFIG, vocab_size=3))
    with pytest.raises(BadMeta, match="field 'parameters' must be a whole number, got 'many'"):
        artifacts.save(tmp_path / "b", model, VOCAB, ArtifactMeta(config=CONFIG, vocab_size=len(VOCAB), parameters="many"))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- damage, one error class each


def test_no_such_directory(tmp_path):
    raises(ArtifactNotFound, tmp_path / "nowhere", "nowhere")
    (tmp_path / "file").write_text("x")
    raises(ArtifactNotFound, tmp_path / "file", "is a file")


@pytest.mark.parametrize("name", ["model.keras", "vocab.json", "meta.json"])
def test_missing_file(copy, name):
    (copy / name).unlink()
    raises(MissingFile, copy, name)
    if name != "model.keras":  # which serving does not read
        raises(MissingFile, copy, name, keras=False)


def test_serving_does_not_read_model_keras(copy):
    (copy / "model.keras").unlink()
    assert artifact.load(copy).onnx_path == copy / "model.onnx"


# ---------------------------------------------------------------- the graph: missing, damaged, another network


def test_missing_graph_says_how_to_add_it(copy):
    (copy / "model.onnx").unlink()
    error = raises(MissingGraph, copy, "model.onnx", keras=False)
    assert str(error) == (f"{copy}: missing model.onnx, the ONNX graph of the network that serving runs; "
                          f"add it (built from model.keras) with: .venv/bin/chargen export --artifact {copy}")
    # the Keras load (evaluation, training) still works without it
    loaded = artifacts.load_keras(copy)
    assert loaded.onnx_path is None and loaded.model is not None
    assert artifact.check(copy, keras=True)[0] == copy


def damaged_graphs(saved) -> dict[str, bytes]:
    data = (saved[0] / "model.onnx").read_bytes()
    other = build_model(ModelConfig(cell="gru", layers=2, units=24, embedding=8), len(VOCAB))
    int32_ids, float_ids = onnx.load_model_from_string(data), onnx.load_model_from_string(data)
    int32_ids.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32  # which the graph still runs
    float_ids.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT  # which its Gather refuses
    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "not ONNX": b"definitely not a protobuf" * 10,
        "another network": build_graph(other).SerializeToString(),
        "another signature": int32_ids.SerializeToString(),
        "refused by ONNX Runtime": float_ids.SerializeToString(),
    }


@pytest.mark.parametrize("kind, problem", [
    ("empty", "not an ONNX model"),
    ("truncated", "not an ONNX model"),
    ("not ONNX", "not an ONNX model"),
    ("another network", "does not match meta.json (a 2-layer gru network of 16 units and 10 characters): metadata units is '24'"),
    ("another signature", "input 'ids' is int32, expected int64"),
    ("refused by ONNX Runtime", "damaged ONNX graph: "),
])
def test_damaged_graph_names_the_file_and_how_to_rebuild_it(saved, copy, kind, problem):
    (copy / "model.onnx").write_bytes(damaged_graphs(saved)[kind])
    for keras_load in (False, True):  # a graph that is there is checked by both loads
        error = raises(CorruptGraph, copy, str(copy / "model.onnx"), keras=keras_load)
        assert problem in str(error)
        assert str(error).endswith(f"; rebuild it with: .venv/bin/chargen export --artifact {copy}")


def test_model_that_is_not_an_archive(copy):
    (copy / "model.keras").write_bytes(b"definitely not a zip file" * 10)
    raises(CorruptModel, copy, "model.keras")


def test_truncated_archive(copy):
    data = (copy / "model.keras").read_bytes()
    (copy / "model.keras").write_bytes(data[: len(data) // 2])
    raises(CorruptModel, copy, "model.keras")


def test_archive_with_damaged_weights(copy):
    path = copy / "model.keras"
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["model.weights.h5"] = members["model.weights.h5"][:200]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    raises(CorruptModel, copy, "model.keras")


def test_zip_that_is_not_a_keras_model(copy):
    with zipfile.ZipFile(copy / "model.keras", "w") as z:
        z.writestr("hello.txt", "hi")
    raises(CorruptModel, copy, "model.keras")


def test_model_with_code_is_refused_by_safe_mode(copy):
    """A Lambda layer carries Python code; safe_mode=True must refuse to run it."""
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(len(VOCAB), 8, name="embedding")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    x = keras.layers.GRU(16, return_sequences=True, name="rnn_1")(x)
    keras.Model(inputs, keras.layers.Dense(len(VOCAB), name="logits")(x)).save(copy / "model.keras")
    error = raises(CorruptModel, copy, "model.keras")
    assert "safe_mode" in str(error) or "Lambda" in str(error)


def test_vocabulary_that_does_not_fit_the_model(copy):
    (copy / "vocab.json").write_text(Vocab(VOCAB.chars + ["z"]).to_json())
    raises(VocabMismatch, copy, "meta.json says vocab_size 10 but vocab.json has 11")  # seen without the network
    meta = json.loads((copy / "meta.json").read_text())
    del meta["sha256"]  # as written before meta.json recorded vocab.json's sha256, which would refuse it first
    (copy / "meta.json").write_text(json.dumps({**meta, "vocab_size": len(VOCAB) + 1}))
    error = raises(VocabMismatch, copy, "vocab.json")
    assert f"{len(VOCAB) + 1} characters" in str(error) and f"built for {len(VOCAB)}" in str(error)


def test_meta_vocab_size_that_disagrees(copy):
    meta = json.loads((copy / "meta.json").read_text())
    meta["vocab_size"] = 99
    (copy / "meta.json").write_text(json.dumps(meta))
    raises(VocabMismatch, copy, "meta.json says vocab_size 99")


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(copy, version):
    meta = json.loads((copy / "meta.json").read_text())
    meta["format_version"] = version
    (copy / "meta.json").write_text(json.dumps(meta))
    error = raises(UnsupportedFormat, copy, "meta.json")
    assert f"format_version {version!r}" in str(error)


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"format_version": 1}), "missing field 'config'"),
    (json.dumps({"format_version": 1, "config": {"cell": "transformer"}}), "invalid config"),
    (json.dumps({"format_version": 1, "config": {"colour": "red"}}), "invalid config"),
    (json.dumps({"format_version": 1, "config": [1]}), "invalid config: expected an object"),
    ("", "not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    ("[" * 200_000, "not valid JSON: nested too deeply"),  # a RecursionError in json's parser
    ('{"format_version": 1, "config": ' * 100_000, "not valid JSON: nested too deeply"),
])
def test_bad_meta(copy, text, problem):
    (copy / "meta.json").write_text(text)
    error = raises(BadMeta, copy, "meta.json")
    assert problem in str(error)


@pytest.mark.parametrize("change, problem", [
    ({"vocab_size": None}, "field 'vocab_size' must be a whole number, got None"),
    ({"vocab_size": "10"}, "field 'vocab_size' must be a whole number, got '10'"),
    ({"vocab_size": True}, "field 'vocab_size' must be a whole number, got True"),
    ({"parameters": 1.5}, "field 'parameters' must be a whole number, got 1.5"),
    ({"command": ["chargen"]}, "field 'command' must be a string"),
    ({"resumed": "chargen train --resume"}, "field 'resumed' must be a list, got 'chargen train --resume'"),
    ({"resumed": ["chargen train --resume", None]}, "field 'resumed[1]' must be a string, got None"),
    ({"validation": {"epoch": 1, "nats_per_char": 1.0, "bits_per_char": 1.0, "chars_scored": 5, "sample": "yes"}},
     "field 'validation.sample' must be true or false, got 'yes'"),
    ({"created": "yesterday"}, "field 'created' must be an ISO 8601 time, got 'yesterday'"),
    ({"corpus": "letters"}, "field 'corpus' must be an object, got 'letters'"),
    ({"corpus": {"name": "letters"}}, "missing field 'corpus.size_bytes'"),
    ({"corpus": {**META.to_dict()["corpus"], "sha256": 7}}, "field 'corpus.sha256' must be a string, got 7"),
    ({"corpus": {**META.to_dict()["corpus"], "colour": "red"}}, "unknown field 'corpus.colour'"),
    ({"validation": {"epoch": 1, "nats_per_char": "low", "bits_per_char": 1.0, "chars_scored": 5}},
     "field 'validation.nats_per_char' must be a number, got 'low'"),
    ({"validation": {"epoch": 1, "nats_per_char": float("nan"), "bits_per_char": 1.0, "chars_scored": 5}},
     "field 'validation.nats_per_char' must be a number, got nan"),
    ({"notes": "mine"}, "unknown field 'notes'"),
])
def test_meta_fields_are_typed(copy, change, problem):
    meta = {**json.loads((copy / "meta.json").read_text()), **change}
    (copy / "meta.json").write_text(json.dumps(meta))
    error = raises(BadMeta, copy, "meta.json")
    assert problem in str(error)


@pytest.mark.parametrize("field, value, problem", [("units", 32, "metadata units is '16', meta.json says '32'"),
                                                   ("embedding", 99, "metadata embedding is '8', meta.json says '99'")])
def test_meta_that_describes_another_network(copy, field, value, problem):
    edit_meta(copy, lambda meta: meta["config"].update({field: value}))
    raises(BadMeta, copy, "model.keras holds")
    # serving sees it in the graph, which is the file meta.json records: meta.json is what changed
    error = raises(BadMeta, copy, f"{copy / 'meta.json'}: describes a 2-layer gru network", keras=False)
    assert problem in str(error) and "model.onnx, the file it records (the same sha256), is another network" in str(error)
    assert str(error).endswith("meta.json was changed after the artifact was written: put its own back")
    edit_meta(copy, unrecorded)  # written before the record: nothing tells which of the two changed
    error = raises(CorruptGraph, copy, f"{copy / 'model.onnx'}: does not match meta.json", keras=False)
    assert problem in str(error)


@pytest.mark.parametrize("data, problem", [
    (b"{oops", "not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (b"", "not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    (b"[" * 200_000, "not valid JSON: nested too deeply"),  # a RecursionError in json's parser
    (b"\xff\xfe", "not valid JSON: not UTF-8"),
    (b'{"letters": []}', 'expected a JSON object {"chars": [...]}'),
    (b'{"chars": ["a", "a"]}', "duplicate characters"),
    (b'{"chars": ["a", "\\ud800"]}', "vocabulary entry 1 is '\\ud800', a lone surrogate"),  # no UTF-8 encodes it
])
def test_bad_vocab(copy, data, problem):
    (copy / "vocab.json").write_bytes(data)
    for keras_load in (False, True):
        error = raises(BadVocab, copy, f"{copy / 'vocab.json'}: ", keras=keras_load)
        assert problem in str(error)


@pytest.mark.parametrize("name, cls", [("meta.json", BadMeta), ("vocab.json", BadVocab), ("model.onnx", CorruptGraph)])
def test_a_file_that_cannot_be_read_is_named_with_the_reason(copy, name, cls):
    """A read that fails (EACCES, EIO) is the loader's error naming the file and the system's reason.
    /proc/self/mem is a file that cannot be read from its start (EIO) even as root, whom chmod 000 does
    not stop."""
    (copy / name).unlink()
    (copy / name).symlink_to("/proc/self/mem")
    for keras_load in (False, True):
        error = raises(cls, copy, name, keras=keras_load)
        assert str(error) == f"{copy / name}: cannot be read: {os.strerror(errno.EIO)}"


# ---------------------------------------------------------------- another model's graph or vocabulary


def test_meta_records_the_sha256_of_the_graph_and_the_vocabulary(saved):
    path, _ = saved
    assert json.loads((path / "meta.json").read_text())["sha256"] == {
        "model_onnx": sha256_of(path / "model.onnx"), "vocab_json": sha256_of(path / "vocab.json")}


def test_a_graph_of_another_model_of_the_same_shape_is_refused(saved, copy):
    (copy / "model.onnx").write_bytes(another_graph())
    for keras_load in (False, True):
        error = raises(CorruptGraph, copy, f"{copy / 'model.onnx'}: does not match meta.json (sha256 ", keras=keras_load)
        assert "another model's graph, or changed since the artifact was written" in str(error)
        assert str(error).endswith(f"; rebuild it from model.keras with: .venv/bin/chargen export --artifact {copy}")
    assert artifacts.add_graph(copy) == (copy / "model.onnx", True)  # what the message says to run
    assert (copy / "model.onnx").read_bytes() == (saved[0] / "model.onnx").read_bytes()
    assert artifact.load(copy).meta == artifact.load(saved[0]).meta


def test_a_vocabulary_of_another_model_of_the_same_size_is_refused(copy):
    (copy / "vocab.json").write_text(Vocab(VOCAB.chars[::-1]).to_json())  # the same characters, other ids
    for keras_load in (False, True):
        error = raises(VocabMismatch, copy, f"{copy / 'vocab.json'}: does not match meta.json (sha256 ", keras=keras_load)
        assert "another model's vocabulary" in str(error) and str(error).endswith("put the artifact's own vocab.json back")


def test_export_refuses_a_model_keras_of_another_model_rather_than_follow_it(copy):
    # model.onnx is the recorded graph; a model.keras of another network of the same shape must not
    # become the artifact's graph (and be recorded) through chargen export
    keras.utils.set_random_seed(4)
    build_model(CONFIG, len(VOCAB)).save(copy / "model.keras")
    before = (copy / "model.onnx").read_bytes(), (copy / "meta.json").read_bytes()
    with pytest.raises(artifact.CorruptModel) as error:
        artifacts.add_graph(copy)
    assert str(error.value).startswith(f"{copy / 'model.keras'}: its network is not the one of model.onnx"), error.value
    assert "put the artifact's own back" in str(error.value)
    assert ((copy / "model.onnx").read_bytes(), (copy / "meta.json").read_bytes()) == before


def test_an_artifact_written_before_the_record_loads_as_before_and_export_records(saved, copy):
    edit_meta(copy, unrecorded)
    (copy / "model.onnx").write_bytes(another_graph())  # nothing tells it from the artifact's own
    assert artifact.load(copy).meta.sha256 is None
    assert artifacts.add_graph(copy) == (copy / "model.onnx", True)  # chargen export: the graph and the record
    assert artifact.load(copy).meta.sha256 == hashes(copy) == hashes(saved[0])

    edit_meta(copy, unrecorded)  # the graph is up to date: only meta.json is written
    before = os.stat(copy / "model.onnx")
    assert artifacts.add_graph(copy) == (copy / "model.onnx", False)
    after = os.stat(copy / "model.onnx")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (copy / "meta.json").read_text() == (saved[0] / "meta.json").read_text()


def test_error_classes_are_distinct():
    classes = [ArtifactNotFound, MissingFile, CorruptModel, BadVocab, BadMeta, UnsupportedFormat, VocabMismatch,
               MissingGraph, CorruptGraph]
    assert len(set(classes)) == len(classes)
    assert all(issubclass(c, ArtifactError) and c is not ArtifactError for c in classes)


# ---------------------------------------------------------------- what training writes


def test_trained_artifact_describes_itself(tiny_artifact):
    meta = json.loads((tiny_artifact / "meta.json").read_text())
    corpus_file = tiny_artifact.parent.parent / f"{tiny_artifact.parent.name}-corpus.txt"
    data = corpus_file.read_bytes()
    assert meta["format_version"] == artifact.FORMAT_VERSION
    assert meta["config"] == {"cell": "lstm", "layers": 1, "units": 32, "embedding": 16, "dropout": 0.0}
    assert meta["vocab_size"] == len(set(data.decode()))
    assert meta["corpus"] == {"name": corpus_file.name, "size_bytes": len(data), "chars": len(data),
                              "sha256": hashlib.sha256(data).hexdigest()}
    split = meta["split"]
    assert split["validation_fraction"] == 0.1
    assert split["train_chars"] + split["validation_chars"] == len(data)
    validation = meta["validation"]
    assert validation["bits_per_char"] == pytest.approx(validation["nats_per_char"] / np.log(2), abs=1e-4)
    assert 1 <= validation["epoch"] <= meta["training"]["epochs"]
    assert meta["training"]["seconds"] > 0 and meta["training"]["chars_per_second"] > 0
    assert meta["versions"]["keras"] == keras.__version__
    assert meta["versions"]["backend"] in ("tensorflow", "jax")
    assert re.fullmatch(r"\d+\.\d+.*", meta["versions"]["backend_version"])
    assert meta["command"] == "test"  # what train_tiny passes
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["created"])
    assert sorted(p.name for p in tiny_artifact.iterdir()) == [
        "history.csv", "history.json", "loss.png", "meta.json", "model.int8.onnx", "model.keras", "model.onnx", "vocab.json"]
    loaded = artifact.load(tiny_artifact).meta
    assert loaded.to_dict() == meta and loaded.to_json() == (tiny_artifact / "meta.json").read_text()
    assert loaded.validation.nats_per_char == meta["validation"]["nats_per_char"] and loaded.corpus.name == corpus_file.name


def test_the_shipped_artifact_reads_unchanged():
    """artifacts/default is read and written back byte for byte."""
    path = ROOT / "artifacts" / "default"
    text = (path / "meta.json").read_text()
    checked_path, meta, vocab = artifact.check(path)
    assert checked_path == path and meta.vocab_size == len(vocab) == 65
    assert meta.corpus.name == "tinyshakespeare.txt" and meta.versions.backend == "jax"
    assert meta.to_json() == text
    assert meta.sha256 == hashes(path) and meta.int8.float32_sha256 == meta.sha256.model_onnx  # recorded, and checked


def test_a_meta_json_from_before_recipes_reads_unchanged():
    """The first shipped model's meta.json (written before the typed record, and before training
    recipes were recorded) is read with its values and written back byte for byte."""
    text = (ROOT / "tests" / "data" / "meta-before-recipes.json").read_text()
    meta = artifact.ArtifactMeta.from_json(text)
    assert meta.config == ModelConfig(cell="lstm", layers=2, units=256, embedding=64, dropout=0.2)
    assert meta.validation.epoch == 27 and meta.training.epochs == 27 and meta.training.recipe is None
    assert meta.to_json() == text


def test_the_shipped_artifact_has_the_graph_of_its_weights():
    """artifacts/default/model.onnx (added by `chargen export`) is what export builds from its
    model.keras today, byte for byte, and serving loads it."""
    path = ROOT / "artifacts" / "default"
    loaded = artifacts.load_keras(path)
    assert loaded.onnx_path == path / "model.onnx"
    assert build_graph(loaded.model).SerializeToString() == (path / "model.onnx").read_bytes()
    assert artifact.load(path).onnx_path == path / "model.onnx"


# ---------------------------------------------------------------- without Keras


def test_check_and_the_module_need_no_keras(saved, tmp_path):
    """The artifact module imports without Keras, check() reports every damage it can see without
    loading it, and the serving load never imports it (a serving install has no Keras)."""
    (tmp_path / "broken").mkdir()
    for name in ("vocab.json", "meta.json"):
        shutil.copyfile(saved[0] / name, tmp_path / "broken" / name)
    (tmp_path / "broken" / "model.keras").write_bytes(b"not a zip")
    code = (
        "import sys\n"
        "from model.runtime import artifact\n"
        "path, meta, vocab = artifact.check(sys.argv[1])\n"
        "print(meta.config.cell, len(vocab))\n"
        "try:\n"
        "    artifact.check(sys.argv[2], keras=True)\n"
        "except artifact.CorruptModel as e:\n"
        "    print(e)\n"
        "served = artifact.load(sys.argv[1])\n"
        "print(served.model, served.onnx_path.name)\n"
        "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(saved[0]), str(tmp_path / "broken")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"gru {len(VOCAB)}"
    assert "model.keras: not a Keras archive" in lines[1]
    assert lines[2] == "None model.onnx"
    assert lines[3] == "[]"


def test_no_pickle_anywhere():
    """Artifacts are JSON plus a Keras archive loaded with safe_mode=True; nothing unpickles."""
    for path in [*ROOT.glob("model/**/*.py"), *ROOT.glob("service/*.py")]:
        source = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib|marshal|shelve)\b", source, re.M), path
        assert "safe_mode=False" not in source, path
    assert "safe_mode=True" in (ROOT / "model" / "training" / "artifacts.py").read_text()
