"""Look inside (issue 23): the hidden states, cell states and gates that model/runtime/inside.py
computes from model.onnx's weights, against the graph the engine runs; the features and the cell
ranking of model/runtime/cells.py, with a planted cell that counts the position in the line; POST
/v1/inspect and its 4xx; `chargen inspect`.

Networks with random weights (conftest.random_network), saved as whole artifacts by the training
side's artifacts.save, so the same network is traced, served and read by the command line.
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import VOCAB, assert_error, random_network, words
from model.records.meta import ArtifactMeta
from model.runtime.artifact import load
from model.runtime.cells import FEATURES, PIECE, CellStatistics, features, statistics
from model.runtime.inside import GATES, MAX_CHARS, SIGMOID_GATES, Network, probabilities
from model.runtime.onnx_step import OrtStep

CASES = [(cell, layers) for cell in ("lstm", "gru", "rnn") for layers in (1, 2, 3)]
UNITS = 24
TOLERANCE = 1e-5  # absolute, on hidden and cell states
PLANTED = (1, 5)  # (layer, cell) of the planted line counter
TEXT = words(2_500, seed=3)  # lines of 8 random words: line lengths vary; longer than a PIECE


def save(model, path, cell: str, layers: int):
    from model.records.config import ModelConfig
    from model.training import artifacts

    meta = ArtifactMeta(config=ModelConfig(cell=cell, layers=layers, units=UNITS, embedding=8), vocab_size=len(VOCAB))
    return artifacts.save(path, model, VOCAB, meta)


def planted_network():
    """A 2-layer LSTM with random weights whose layer-1 cell 5 counts the characters since the
    last newline: its input and forget gates are held open (bias 20) except that a newline (the
    only character with embedding[:, 0] = 1) shuts the forget gate; the candidate is a constant
    0.1. Its cell state after a character is 0.1 x (characters since the newline + 1) (on a first
    line, read from the zero state, 0.1 x the characters: r is just below 1)."""
    model = random_network("lstm", 2, len(VOCAB), UNITS, seed=7)
    H, k = UNITS, PLANTED[1]
    embedding = model.get_layer("embedding").embeddings
    e = np.asarray(embedding.numpy())
    e[:, 0] = 0.0
    e[VOCAB.index["\n"], 0] = 1.0
    embedding.assign(e)
    cell = model.get_layer("rnn_1").cell
    columns = [k, H + k, 2 * H + k, 3 * H + k]  # Keras's i, f, c, o blocks
    kernel, recurrent, bias = (np.asarray(v.numpy()) for v in (cell.kernel, cell.recurrent_kernel, cell.bias))
    kernel[:, columns] = 0.0
    kernel[0, H + k] = -40.0
    recurrent[:, columns] = 0.0
    bias[columns] = [20.0, 20.0, math.atanh(0.1), 0.0]
    for v, value in ((cell.kernel, kernel), (cell.recurrent_kernel, recurrent), (cell.bias, bias)):
        v.assign(value)
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A whole artifact of planted_network()."""
    return save(planted_network(), tmp_path_factory.mktemp("planted") / "a", "lstm", 2)


@pytest.fixture(scope="module")
def gru(tmp_path_factory):
    return save(random_network("gru", 1, len(VOCAB), UNITS, seed=2), tmp_path_factory.mktemp("gru") / "a", "gru", 1)


def network_of(path) -> Network:
    artifact = load(path)
    return Network.from_graph(artifact.onnx_path, artifact.config.cell, artifact.config.layers)


# ---------------------------------------------------------------- the values are the graph's


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("random")
    return {(cell, layers): save(random_network(cell, layers, len(VOCAB), UNITS), root / f"{cell}{layers}", cell, layers)
            for cell, layers in CASES}


@pytest.mark.parametrize("cell,layers", CASES)
def test_states_agree_with_the_graph_the_engine_runs(artifacts, cell, layers):
    path = artifacts[(cell, layers)]
    ids = VOCAB.encode(TEXT[:300]).ids.astype(np.int64)
    trace = network_of(path).trace(ids)
    step = OrtStep(load(path).onnx_path, max_batch=1, threads=1)
    state = None
    for t in range(len(ids)):  # the engine's step, one character at a time: its state after each
        _, state = step.predict(ids[t:t + 1], state)
        h = state.arrays[0][:, 0]  # (layers, units)
        for i in range(layers):
            np.testing.assert_allclose(trace.layers[i].hidden[t], h[i], rtol=0, atol=TOLERANCE, err_msg=f"layer {i + 1}, t={t}")
            if cell == "lstm":
                np.testing.assert_allclose(trace.layers[i].cell[t], state.arrays[1][i, 0], rtol=0, atol=TOLERANCE)
    logits, _ = step.predict(ids)  # the whole text in one call, as a prompt
    np.testing.assert_allclose(trace.logits, logits, rtol=0, atol=10 * TOLERANCE)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_gates_are_named_for_what_they_do(artifacts, cell):
    """Each cell type's update rule, written with the gates by name, gives the states."""
    trace = network_of(artifacts[(cell, 2)]).trace(VOCAB.encode(TEXT[:200]).ids)
    for layer in trace.layers:
        g, h = layer.gates, layer.hidden
        assert set(g) == set(GATES[cell])
        if cell == "lstm":
            c = layer.cell
            c_before = np.vstack([np.zeros((1, UNITS)), c[:-1]])
            np.testing.assert_allclose(c, g["forget"] * c_before + g["input"] * g["candidate"], atol=1e-5)
            np.testing.assert_allclose(h, g["output"] * np.tanh(c), atol=1e-5)
        elif cell == "gru":
            h_before = np.vstack([np.zeros((1, UNITS)), h[:-1]])
            np.testing.assert_allclose(h, (1 - g["update"]) * g["candidate"] + g["update"] * h_before, atol=1e-5)
        else:
            np.testing.assert_allclose(h, np.tanh(g["preactivation"]), atol=1e-5)
        for name in set(g) & {"input", "forget", "output", "update", "reset"}:
            assert 0 <= g[name].min() and g[name].max() <= 1


def test_a_text_read_in_pieces_is_the_text_read_at_once(artifacts):
    net = network_of(artifacts[("lstm", 2)])
    ids = VOCAB.encode(TEXT[:400]).ids
    whole = net.trace(ids)
    first = net.trace(ids[:150])
    rest = net.trace(ids[150:], state=first.state)
    np.testing.assert_allclose(rest.layers[1].hidden, whole.layers[1].hidden[150:], atol=1e-6)
    np.testing.assert_allclose(rest.layers[0].cell, whole.layers[0].cell[150:], atol=1e-6)


def test_only_the_layers_and_gates_asked_for_are_kept(artifacts):
    trace = network_of(artifacts[("gru", 3)]).trace(VOCAB.encode("the cat").ids, layers={2}, gates={"reset"})
    assert trace.layers[0] is None and trace.layers[2] is None
    assert set(trace.layers[1].gates) == {"reset"} and trace.layers[1].hidden.shape == (7, UNITS)


# ---------------------------------------------------------------- features and the ranking


def test_features_of_a_text():
    text = 'ROMEO:\nSay "hi" (now)\n'
    f = features(text)
    at = {name: dict(zip(range(len(text)), f[name])) for name in f}
    assert [at["line_chars"][t] for t in range(7)] == [1, 2, 3, 4, 5, 6, 0]
    assert at["speaker_line"][0] == at["speaker_line"][5] == 1 and at["speaker_line"][8] == 0
    q = text.index('"')
    assert at["in_quotes"][q] == 1 and at["in_quotes"][q + 1] == 1 and at["in_quotes"][q + 3] == 0 and at["in_quotes"][q - 1] == 0
    b = text.index("(")
    assert at["in_brackets"][b] == 1 and at["in_brackets"][b + 3] == 1 and at["in_brackets"][b + 4] == 0
    assert at["upper_case"][0] == 1 and at["upper_case"][8] == 0
    assert at["in_word"][8] == 1 and at["in_word"][10] == 0
    line = text.index("\n") + 1
    assert at["line_fraction"][line] == pytest.approx(1 / 14) and at["line_fraction"][len(text) - 2] == 1
    assert at["line_fraction"][len(text) - 1] == 0  # the newline starts the next line


def test_the_planted_line_counter_ranks_first_for_characters_since_the_newline(planted):
    ids = VOCAB.encode(TEXT).ids
    ranked = statistics(network_of(planted), ids, VOCAB.decode(ids)).ranking(3)
    best = ranked["line_chars"][0]
    assert (best.layer, best.quantity, best.cell) == (*PLANTED[:1], "cell", PLANTED[1])
    assert best.r > 0.999
    assert ranked["in_quotes"] == [] and ranked["in_brackets"] == []  # the text has neither


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_ranking_and_saturation_are_those_of_the_whole_trace(artifacts, cell):
    """Running sums over PIECEs, with the state carried, give what the whole trace gives at once."""
    net = network_of(artifacts[(cell, 2)])
    ids = VOCAB.encode(TEXT).ids
    assert len(ids) > 2 * PIECE
    stats = statistics(net, ids, VOCAB.decode(ids))
    trace = net.trace(ids)
    feats = features(VOCAB.decode(ids))
    for name, ranked in stats.ranking(4).items():
        constant = name in ("in_quotes", "in_brackets", "upper_case", "speaker_line")  # VOCAB has none of them
        assert len(ranked) == (0 if constant else 4)
        for c in ranked:
            layer = trace.layers[c.layer - 1]
            values = (layer.hidden if c.quantity == "hidden" else layer.cell)[:, c.cell]
            assert c.r == pytest.approx(np.corrcoef(values, feats[name])[0, 1], abs=1e-6)
        assert [abs(c.r) for c in ranked] == sorted((abs(c.r) for c in ranked), reverse=True)
    for s in stats.saturation():
        v = trace.layers[s.layer - 1].gates[s.gate]
        shut = 0.1 if s.gate in SIGMOID_GATES else -0.9  # the candidate is a tanh
        assert s.low == pytest.approx(np.mean(v < shut), abs=1e-9) and s.high == pytest.approx(np.mean(v > 0.9), abs=1e-9)


def test_no_cell_ranks_for_a_feature_the_text_lacks(artifacts):
    stats = CellStatistics(network_of(artifacts[("rnn", 1)]))
    ids = VOCAB.encode("abc abc\n" * 20).ids
    stats.add(ids, features(VOCAB.decode(ids)))
    assert stats.ranking(2)["upper_case"] == [] and len(stats.ranking(2)["in_word"]) == 2


# ---------------------------------------------------------------- POST /v1/inspect


@pytest.fixture(scope="module")
def app(tmp_path_factory, planted, gru):
    from service.app import create_app

    root = tmp_path_factory.mktemp("served") / "models"
    root.mkdir()
    (root / "planted").symlink_to(planted)
    (root / "gru").symlink_to(gru)
    app = create_app({"MODELS": str(root), "DEFAULT_MODEL": "planted", "TESTING": True})
    chargen = app.extensions["chargen"]
    assert chargen.wait_ready(120), chargen.failed() and chargen.failed().scheduler.failure
    yield app
    chargen.close()


def test_inspect_returns_the_traced_values_and_the_predictions(client, planted):
    text = "the cat\nsat."
    r = client.post("/v1/inspect", json={"text": text})
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert (body["model"], body["cell_type"], body["units"], body["num_layers"]) == ("planted", "lstm", UNITS, 2)
    assert body["chars"] == list(text) and body["offsets"] == list(range(len(text)))
    trace = network_of(planted).trace(VOCAB.encode(text).ids)
    assert [e["layer"] for e in body["layers"]] == [1, 2]
    for e, t in zip(body["layers"], trace.layers):
        assert set(e) == {"layer", "hidden", "cell", "gates"} and set(e["gates"]) == set(GATES["lstm"])
        np.testing.assert_allclose(e["hidden"], t.hidden, atol=5e-5)
        np.testing.assert_allclose(e["gates"]["forget"], t.gates["forget"], atol=5e-5)
    p = probabilities(trace.logits)
    assert len(body["next"]) == len(text)
    for t, n in enumerate(body["next"][:-1]):
        assert n["char"] == text[t + 1] and n["p"] == pytest.approx(p[t, VOCAB.index[text[t + 1]]], abs=1e-4)
        assert len(n["top"]) == 5 and n["top"][0][1] == pytest.approx(p[t].max(), abs=1e-4)
    assert body["next"][-1]["char"] is None and body["next"][-1]["p"] is None
    assert "ranking" not in body and "saturation" not in body


def test_inspect_float16_is_the_list_in_half_precision(client):
    asked = {"text": "a b c", "layers": [2], "quantities": ["hidden", "gates"], "gates": ["output"]}
    listed = client.post("/v1/inspect", json=asked).get_json()["layers"]
    packed = client.post("/v1/inspect", json={**asked, "encoding": "float16"}).get_json()["layers"]
    assert [e["layer"] for e in packed] == [2] and set(packed[0]) == {"layer", "hidden", "gates"}
    assert set(packed[0]["gates"]) == {"output"}
    v = packed[0]["hidden"]
    assert v["shape"] == [5, UNITS] and v["dtype"] == "float16"
    values = np.frombuffer(base64.b64decode(v["data"]), "<f2").reshape(v["shape"])
    np.testing.assert_allclose(values, listed[0]["hidden"], atol=1e-3)


def test_inspect_ranks_the_planted_cell_and_gives_the_saturation(client):
    body = client.post("/v1/inspect", json={"text": TEXT[:MAX_CHARS], "quantities": ["hidden"], "layers": [1], "cells": 2}).get_json()
    ranking = {row["feature"]: row for row in body["ranking"]}
    assert list(ranking) == list(FEATURES)
    best = ranking["line_chars"]["cells"][0]
    assert (best["layer"], best["quantity"], best["cell"]) == (PLANTED[0], "cell", PLANTED[1]) and best["r"] > 0.999
    assert ranking["line_chars"]["label"] == FEATURES["line_chars"]
    assert [(s["layer"], s["gate"]) for s in body["saturation"]] == [(i, g) for i in (1, 2) for g in GATES["lstm"]]
    assert all(0 <= s["low"] <= 1 and 0 <= s["high"] <= 1 for s in body["saturation"])
    # the planted cell's input and forget gates are held open (bias 20): layer 1's gates saturate on it at least
    gate = {(s["layer"], s["gate"]): s for s in body["saturation"]}
    assert gate[(1, "input")]["high"] >= 1 / UNITS


def test_inspect_with_cells_returns_the_same_values(client):
    """With cells, the values come from the statistics' pieces (PIECE characters each), joined."""
    asked = {"text": TEXT[:MAX_CHARS], "layers": [2], "gates": ["forget", "candidate"], "encoding": "float16"}
    plain = client.post("/v1/inspect", json=asked).get_json()
    ranked = client.post("/v1/inspect", json={**asked, "cells": 1}).get_json()
    assert len(ranked["chars"]) > PIECE and "ranking" in ranked and "ranking" not in plain
    for key in ("hidden", "cell"):
        a, b = (np.frombuffer(base64.b64decode(x["layers"][0][key]["data"]), "<f2") for x in (plain, ranked))
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
    assert set(ranked["layers"][0]["gates"]) == {"forget", "candidate"}
    assert [n["top"][0][0] for n in plain["next"]] == [n["top"][0][0] for n in ranked["next"]]


def test_inspect_reads_characters_outside_the_vocabulary_by_the_prompt_rule(client):
    body = client.post("/v1/inspect", json={"text": "ab\u4e00é c", "quantities": ["hidden"]}).get_json()
    assert body["chars"] == ["a", "b", "e", " ", "c"] and body["offsets"] == [0, 1, 3, 4, 5]
    assert body["dropped"] == [{"offset": 2, "char": "\u4e00"}] and body["replaced"] == [{"offset": 3, "char": "é", "as": "e"}]
    nothing = client.post("/v1/inspect", json={"text": "\u4e00"}).get_json()
    assert nothing["chars"] == [] and nothing["next"] == [] and nothing["layers"] == [{"layer": 1}, {"layer": 2}]


def test_inspect_a_gru_has_its_own_gates_and_no_cell_state(client):
    body = client.post("/v1/inspect", json={"text": "abc", "model": "gru"}).get_json()
    assert body["cell_type"] == "gru" and set(body["layers"][0]) == {"layer", "hidden", "gates"}
    assert set(body["layers"][0]["gates"]) == {"update", "reset", "candidate"}


@pytest.mark.parametrize("body,status,code,param", [
    ({"text": "a" * (MAX_CHARS + 1)}, 422, "out_of_range", "text"),
    ({"text": ""}, 422, "out_of_range", "text"),
    ({}, 422, "missing_field", "text"),
    ({"text": "a", "layers": [3]}, 404, "layer_not_found", "layers"),
    ({"text": "a", "layers": [0]}, 422, "out_of_range", "layers"),
    ({"text": "a", "layers": []}, 422, "out_of_range", "layers"),
    ({"text": "a", "model": "gru", "quantities": ["cell"]}, 404, "quantity_not_found", "quantities"),
    ({"text": "a", "model": "gru", "gates": ["forget"]}, 404, "quantity_not_found", "gates"),
    ({"text": "a", "gates": ["update"]}, 404, "quantity_not_found", "gates"),
    ({"text": "a", "gates": ["sideways"]}, 422, "invalid_value", "gates"),
    ({"text": "a", "quantities": ["hidden"], "gates": ["forget"]}, 422, "invalid_value", "gates"),
    ({"text": "a", "quantities": ["weights"]}, 422, "invalid_value", "quantities"),
    ({"text": "a", "encoding": "bfloat16"}, 422, "invalid_value", "encoding"),
    ({"text": "a", "cells": 51}, 422, "out_of_range", "cells"),
    ({"text": "a", "cells": -1}, 422, "out_of_range", "cells"),
    ({"text": "a", "model": "nope"}, 404, "model_not_found", "model"),
    ({"text": "a", "colour": "red"}, 422, "unknown_field", "colour"),
])
def test_inspect_mistakes_are_4xx_naming_the_field(client, body, status, code, param):
    assert_error(client.post("/v1/inspect", json=body), status, code, param)


def test_an_answer_over_the_bound_is_a_422_naming_the_sizes(client, monkeypatch):
    import service.inspect

    monkeypatch.setattr(service.inspect, "MAX_INSPECT_VALUES", 1_000)
    error = assert_error(client.post("/v1/inspect", json={"text": "abcdefghij", "layers": [1, 2]}), 422, "too_large")
    assert "2,880 values" in error["message"] and "10 characters x 24 units x 6 arrays per layer x 2 layers" in error["message"]
    assert client.post("/v1/inspect", json={"text": "abcdefghij", "layers": [2], "quantities": ["hidden"]}).status_code == 200


def test_inspect_is_in_the_openapi_document(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["paths"]["/v1/inspect"]["post"]["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/InspectRequest"}
    schema = doc["components"]["schemas"]["InspectRequest"]
    assert schema["properties"]["text"]["maxLength"] == MAX_CHARS
    assert "4,000,000 values" in schema["description"]


# ---------------------------------------------------------------- chargen inspect


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "chargen", "inspect", *args], capture_output=True, text=True, timeout=300)


def test_the_command_prints_the_table_and_json(planted, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    done = run_cli("--artifact", str(planted), "--text", str(text), "--json", "--top", "2")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    read = len(VOCAB.encode(TEXT).ids)  # VOCAB has no y: the y of "by" is dropped
    assert (out["cell_type"], out["chars"], out["num_layers"], out["dropped"]) == ("lstm", read, 2, len(TEXT) - read)
    line = next(row for row in out["ranking"] if row["feature"] == "line_chars")
    best = line["cells"][0]
    assert (best["layer"], best["quantity"], best["cell"]) == (PLANTED[0], "cell", PLANTED[1]) and best["r"] > 0.999
    assert len(line["cells"]) == 2
    assert len(out["saturation"]) == 2 * 4

    table = run_cli("--artifact", str(planted), "--text", str(text))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    row = next(x for x in lines if x.startswith(FEATURES["line_chars"]))
    first = row[len(FEATURES["line_chars"]):].split("   ")[0].split()  # the best cell: L1 cell 5: +1.00
    assert first == ["L1", "cell", f"{PLANTED[1]}:", "+1.00"]
    assert next(x for x in lines if x.startswith(FEATURES["in_quotes"])).endswith("(constant in this text: no correlation)")
    assert sum(1 for x in lines if x.split()[:1] in (["1"], ["2"])) == 8  # the gate rows


def test_the_command_refuses_a_text_it_cannot_read(planted, tmp_path):
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    done = run_cli("--artifact", str(planted), "--text", str(binary))
    assert done.returncode == 1 and "not UTF-8" in done.stderr
    done = run_cli("--artifact", str(planted), "--text", str(tmp_path / "missing.txt"))
    assert done.returncode == 1 and "cannot be read" in done.stderr
