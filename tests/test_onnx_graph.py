"""The ONNX graph against the Keras model it was built from, and the graph check against meta.json
(model/runtime/graph.py: ONNX Runtime's view of the graph, no onnx).

Exactness runs on tiny networks with random weights, scaled as in test_engine.py: states and
predictions far from trivial, recurrent weights left orthogonal so the dynamics are not chaotic.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model.runtime.graph import GRAPH_FORMAT, check_graph
from model.training.onnx_graph import OPSET, build_graph
from model.runtime.sampling import log_softmax
from model.records.vocab import Vocab
from conftest import random_network

VOCAB = Vocab("\n abcdefghijklmnopqrstuvw.,")
V = len(VOCAB)
UNITS = 24
STEPS = 1000
TOLERANCE = 1e-4  # absolute, on natural-log probabilities
CASES = [(cell, layers) for cell in ("lstm", "gru", "rnn") for layers in (1, 2, 3)]


def random_model(cell: str, layers: int, units: int = UNITS, seed: int = 0) -> keras.Model:
    return random_network(cell, layers, V, units, seed)


@functools.cache
def case(cell: str, layers: int) -> tuple[keras.Model, bytes]:
    model = random_model(cell, layers)
    return model, build_graph(model).SerializeToString()


def session(graph: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the test machine's cores are shared
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def zero_state(cell: str, layers: int, batch: int, units: int = UNITS) -> dict[str, np.ndarray]:
    names = ["h", "c"] if cell == "lstm" else ["h"]
    return {n: np.zeros((layers, batch, units), np.float32) for n in names}


def run(sess: ort.InferenceSession, ids, state: dict) -> tuple[np.ndarray, dict]:
    """Feed ids (B, T) from `state`; returns the logits (B, T, V) and the state after them."""
    out = sess.run(None, {"ids": np.asarray(ids, np.int64), **state})
    return out[0], dict(zip(state, out[1:]))


def keras_log_probs(model: keras.Model, ids: np.ndarray) -> np.ndarray:
    """(B, T, V): Keras's next-character log-probabilities after each prefix of each row."""
    return log_softmax(keras.ops.convert_to_numpy(model.predict_on_batch(np.asarray(ids, np.int32))))


def generate(sess, cell: str, layers: int, prompts: list[str], steps: int, seed: int = 0):
    """Consume the prompts (equal lengths) in one call, then sample `steps` characters one call per
    character with the state carried. Returns every id (B, T + steps) and the log-probabilities
    ORT gave after each (B, T + steps, V), the last position's included."""
    ids = np.array([VOCAB.encode(p).ids for p in prompts], np.int64)
    logits, state = run(sess, ids, zero_state(cell, layers, len(prompts)))
    rows, rng = [log_softmax(logits)], np.random.default_rng(seed)
    for _ in range(steps):
        p = np.exp(rows[-1][:, -1])
        picked = np.array([[rng.choice(V, p=row / row.sum())] for row in p])  # (B, 1)
        ids = np.concatenate([ids, picked], axis=1)
        logits, state = run(sess, picked, state)
        rows.append(log_softmax(logits))
    return ids, np.concatenate(rows, axis=1), state


# ---------------------------------------------------------------- exactness against Keras


@pytest.mark.parametrize("cell,layers", CASES)
def test_one_stream_stepped_1000_chars_matches_keras(cell, layers):
    model, graph = case(cell, layers)
    ids, got, state = generate(session(graph), cell, layers, ["the cat sat on the mat"], STEPS)
    want = keras_log_probs(model, ids)
    assert np.abs(got - want).max() < TOLERANCE
    # the comparison means something: busy states, predictions far from uniform, varied text
    assert np.abs(state["h"]).max() > 0.5
    entropy = -(np.exp(want) * want).sum(axis=-1).mean()
    assert entropy < 0.8 * np.log(V)
    assert len(set(ids[0, 22:].tolist())) > 5


@pytest.mark.parametrize("cell,layers", CASES)
def test_a_batch_of_different_streams_stepped_1000_chars_matches_keras(cell, layers):
    model, graph = case(cell, layers)
    prompts = ["a long prompt", "another, too.", "\n\n\nnewlines\n\n", "wwwwwwwwwwwww", "words, words."]
    ids, got, _ = generate(session(graph), cell, layers, prompts, STEPS, seed=1)
    assert len({row.tobytes() for row in ids}) == len(prompts)
    want = keras_log_probs(model, ids)
    assert np.abs(got - want).max() < TOLERANCE


@pytest.mark.parametrize("cell,layers", CASES)
def test_a_whole_prompt_in_one_call_equals_stepping_it(cell, layers):
    _, graph = case(cell, layers)
    sess = session(graph)
    rng = np.random.default_rng(layers)
    _, start = run(sess, rng.integers(0, V, (3, 17)), zero_state(cell, layers, 3))  # a busy state to start from
    prompt = rng.integers(0, V, (3, 120))
    whole, end = run(sess, prompt, start)
    assert whole.shape == (3, 120, V)
    state, stepped = start, []
    for t in range(prompt.shape[1]):
        logits, state = run(sess, prompt[:, t : t + 1], state)
        stepped.append(logits)
    np.testing.assert_allclose(np.concatenate(stepped, axis=1), whole, atol=1e-5)
    for name in end:
        np.testing.assert_allclose(state[name], end[name], atol=1e-6)
        assert end[name].shape == (layers, 3, UNITS)


def test_batch_and_length_are_dynamic_and_rows_do_not_depend_on_their_batch():
    cell, layers = "lstm", 2
    _, graph = case(cell, layers)
    sess = session(graph)
    rng = np.random.default_rng(5)
    for batch, length in [(1, 1), (5, 7), (2, 30), (9, 1)]:
        ids = rng.integers(0, V, (batch, length))
        start = {n: rng.normal(0, 0.5, s.shape).astype(np.float32) for n, s in zero_state(cell, layers, batch).items()}
        logits, end = run(sess, ids, start)
        assert logits.shape == (batch, length, V) and end["h"].shape == end["c"].shape == (layers, batch, UNITS)
        for b in range(batch):
            alone, alone_end = run(sess, ids[b : b + 1], {n: s[:, b : b + 1] for n, s in start.items()})
            np.testing.assert_allclose(logits[b : b + 1], alone, atol=1e-5)
            for n in end:
                np.testing.assert_allclose(end[n][:, b : b + 1], alone_end[n], atol=1e-6)


def test_a_trained_artifact_greedy_text_and_log_probs_match_keras(tiny_artifact):
    from model.training.artifacts import load_keras

    art = load_keras(tiny_artifact)
    sess = session(build_graph(art.model).SerializeToString())
    ids = art.vocab.encode("the quick").ids.astype(np.int64)[None]
    logits, state = run(sess, ids, zero_state("lstm", 1, 1, units=32))
    rows = [log_softmax(logits)]
    for _ in range(200):
        picked = rows[-1][:, -1].argmax(axis=-1)[:, None]
        ids = np.concatenate([ids, picked], axis=1)
        logits, state = run(sess, picked, state)
        rows.append(log_softmax(logits))
    text = art.vocab.decode(ids[0].tolist())
    assert text.startswith("the quick brown fox jumps over the lazy dog.\nthe quick")
    want = keras_log_probs(art.model, ids)
    assert np.abs(np.concatenate(rows, axis=1) - want).max() < TOLERANCE


# ---------------------------------------------------------------- the graph itself


def test_graph_signature_opset_and_metadata():
    model = onnx.load_model_from_string(case("lstm", 2)[1])
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]

    def spec(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    state = [2, "batch", UNITS]
    assert spec(model.graph.input) == [("ids", onnx.TensorProto.INT64, ["batch", "seq"]),
                                       ("h", onnx.TensorProto.FLOAT, state), ("c", onnx.TensorProto.FLOAT, state)]
    assert spec(model.graph.output) == [("logits", onnx.TensorProto.FLOAT, ["batch", "seq", V]),
                                        ("h_out", onnx.TensorProto.FLOAT, state), ("c_out", onnx.TensorProto.FLOAT, state)]
    assert {p.key: p.value for p in model.metadata_props} == {
        "chargen_graph_format": str(GRAPH_FORMAT), "cell": "lstm", "layers": "2", "units": str(UNITS),
        "embedding": "8", "vocab_size": str(V),
    }
    assert [n.op_type for n in model.graph.node if n.op_type == "LSTM"] == ["LSTM", "LSTM"]
    gru = onnx.load_model_from_string(case("gru", 1)[1])
    assert [i.name for i in gru.graph.input] == ["ids", "h"] and [o.name for o in gru.graph.output] == ["logits", "h_out"]
    (node,) = [n for n in gru.graph.node if n.op_type == "GRU"]
    assert {a.name: a.i for a in node.attribute}["linear_before_reset"] == 1


@pytest.mark.parametrize("layer", [
    keras.layers.LSTM(8, activation="relu", return_sequences=True, name="rnn_1"),
    keras.layers.GRU(8, reset_after=False, return_sequences=True, name="rnn_1"),
    keras.layers.SimpleRNN(8, use_bias=False, return_sequences=True, name="rnn_1"),
], ids=["relu-lstm", "gru-reset-before", "rnn-no-bias"])
def test_layers_the_operators_do_not_compute_are_refused(layer):
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(V, 4, name="embedding")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(V, name="logits")(layer(x)))
    with pytest.raises(ValueError, match="rnn_1: the ONNX graph supports"):
        build_graph(model)


# ---------------------------------------------------------------- check_graph


def lstm_meta(**changes) -> dict:
    return {"cell": "lstm", "layers": 2, "units": UNITS, "vocab_size": V, **changes}


def test_check_graph_accepts_the_graph_from_a_path_and_from_bytes(tmp_path):
    graph = case("lstm", 2)[1]
    path = tmp_path / "model.onnx"
    path.write_bytes(graph)
    check_graph(path, **lstm_meta())
    check_graph(graph, **lstm_meta())
    for cell, layers in [("gru", 3), ("rnn", 1)]:
        check_graph(case(cell, layers)[1], cell=cell, layers=layers, units=UNITS, vocab_size=V)


@pytest.mark.parametrize("meta,words", [
    (lstm_meta(vocab_size=V + 1), [f"metadata vocab_size is '{V}', meta.json says '{V + 1}'",
                                   f"output 'logits' has shape (batch, seq, {V}), expected (batch, seq, {V + 1})"]),
    (lstm_meta(units=64), ["metadata units", f"input 'h' has shape (2, batch, {UNITS}), expected (2, batch, 64)",
                           "input 'c' has shape", "output 'h_out' has shape"]),
    (lstm_meta(layers=3), ["metadata layers", f"input 'h' has shape (2, batch, {UNITS}), expected (3, batch, {UNITS})"]),
    (lstm_meta(cell="gru"), ["metadata cell is 'lstm', meta.json says 'gru'", "unexpected input 'c'", "unexpected output 'c_out'"]),
])
def test_check_graph_refuses_a_graph_of_another_network(tmp_path, meta, words):
    path = tmp_path / "model.onnx"
    path.write_bytes(case("lstm", 2)[1])
    with pytest.raises(ValueError) as e:
        check_graph(path, **meta)
    message = str(e.value)
    assert message.startswith(f"{path}: does not match meta.json")
    for w in words:
        assert w in message


def test_check_graph_refuses_an_lstm_graph_without_its_c_input():
    """A graph ONNX Runtime runs (its c a constant) that lacks an input of the signature."""
    model = onnx.load_model_from_string(case("lstm", 1)[1])
    (c,) = [i for i in model.graph.input if i.name == "c"]
    model.graph.input.remove(c)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 1, UNITS), np.float32), "c"))
    with pytest.raises(ValueError, match=r"^art/model.onnx: does not match meta.json .*: missing input 'c'$"):
        check_graph(model.SerializeToString(), name="art/model.onnx", **lstm_meta(layers=1))


def test_check_graph_refuses_an_input_of_unknown_shape():
    model = onnx.load_model_from_string(case("gru", 1)[1])
    model.graph.input[1].type.tensor_type.ClearField("shape")
    with pytest.raises(ValueError, match=rf"^model.onnx: does not match meta.json .*: input 'h' has shape unknown, expected \(1, batch, {UNITS}\)$"):
        check_graph(model.SerializeToString(), cell="gru", layers=1, units=UNITS, vocab_size=V)


def test_check_graph_refuses_a_graph_of_another_format_or_without_its_metadata():
    model = onnx.load_model_from_string(case("gru", 1)[1])
    (version,) = [p for p in model.metadata_props if p.key == "chargen_graph_format"]
    version.value = "2"
    with pytest.raises(ValueError, match=r"chargen_graph_format '2' is not supported \(this chargen reads 1\)$"):
        check_graph(model.SerializeToString(), cell="gru", layers=1, units=UNITS, vocab_size=V)
    del model.metadata_props[:]
    with pytest.raises(ValueError, match=r"no chargen metadata \(not made by `chargen export`, or truncated\)$"):
        check_graph(model.SerializeToString(), cell="gru", layers=1, units=UNITS, vocab_size=V)


def test_check_graph_refuses_wrong_types_and_fixed_dims():
    model = onnx.load_model_from_string(case("lstm", 1)[1])
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 1  # batch fixed to 1
    with pytest.raises(ValueError) as e:
        check_graph(model.SerializeToString(), **lstm_meta(layers=1))
    assert "input 'ids' is int32, expected int64" in str(e.value)
    assert f"input 'h' has shape (1, 1, {UNITS}), expected (1, batch, {UNITS})" in str(e.value)


@pytest.mark.parametrize("cut", [10, 1000, 0.5, -10, -1])
def test_check_graph_refuses_truncated_bytes(tmp_path, cut):
    graph = case("lstm", 2)[1]
    n = int(len(graph) * cut) if isinstance(cut, float) else cut
    path = tmp_path / "model.onnx"
    path.write_bytes(graph[:n])
    with pytest.raises(ValueError, match=rf"^{path}: (not an ONNX model \(damaged or truncated|.*truncated)"):
        check_graph(path, **lstm_meta())


@pytest.mark.parametrize("data,words", [
    (b"", "not an ONNX model (empty, damaged or truncated"),
    (b"PK\x03\x04 this is a zip, not a graph", "not an ONNX model"),
])
def test_check_graph_refuses_what_is_not_a_graph(tmp_path, data, words):
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    with pytest.raises(ValueError) as e:
        check_graph(path, **lstm_meta())
    assert str(e.value).startswith(f"{path}: {words}")


def test_check_graph_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'model.onnx'}: cannot be read: No such file"):
        check_graph(tmp_path / "model.onnx", **lstm_meta())


def test_check_graph_refuses_a_damaged_graph_that_matches_the_signature():
    model = onnx.load_model_from_string(case("lstm", 1)[1])
    (kernel,) = [t for t in model.graph.initializer if t.name == "logits_kernel"]
    model.graph.initializer.remove(kernel)
    with pytest.raises(ValueError, match=r"^model.onnx: damaged ONNX graph: .*logits_kernel"):
        check_graph(model.SerializeToString(), **lstm_meta(layers=1))


def test_check_graph_refuses_a_graph_onnx_runtime_refuses():
    """ids as float: the graph's Gather takes integer indices only."""
    model = onnx.load_model_from_string(case("lstm", 1)[1])
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    with pytest.raises(ValueError, match=r"^model.onnx: damaged ONNX graph: .*tensor\(float\)"):
        check_graph(model.SerializeToString(), **lstm_meta(layers=1))


def test_checking_needs_neither_onnx_nor_keras(tmp_path):
    """As in a serving install, where neither is installed: importing either fails."""
    path = tmp_path / "model.onnx"
    path.write_bytes(case("gru", 2)[1])
    code = (
        "import sys\n"
        "for name in ('onnx', 'keras', 'tensorflow', 'jax'):\n"
        "    sys.modules[name] = None\n"
        "from model.runtime.graph import check_graph\n"
        f"check_graph({str(path)!r}, cell='gru', layers=2, units={UNITS}, vocab_size={V})\n"
        f"check_graph({str(path)!r}, cell='gru', layers=2, units={UNITS + 1}, vocab_size={V})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"ValueError: {path}: does not match meta.json (a 2-layer gru network of {UNITS + 1} units and {V} characters): "
        f"metadata units is '{UNITS}', meta.json says '{UNITS + 1}'; input 'h' has shape (2, batch, {UNITS}), "
        f"expected (2, batch, {UNITS + 1}); output 'h_out' has shape (2, batch, {UNITS}), expected (2, batch, {UNITS + 1})")
