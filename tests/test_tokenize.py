"""POST /v1/tokenize and /v1/detokenize: characters to ids and back, with the characters (and ids)
outside the vocabulary reported by the rule prompts follow; logit_bias keys written either way."""

from __future__ import annotations

import pytest

from conftest import assert_error, loaded_app


@pytest.fixture(scope="module")
def app(tiny_artifact):
    with loaded_app(tiny_artifact) as app:
        yield app


@pytest.fixture
def vocab(app):
    return app.extensions["chargen"].default.engine.vocab


def test_tokenize_reads_as_the_model_reads(client, vocab):
    text = "thé\r\nqu€ick ﬁx\r"
    body = client.post("/v1/tokenize", json={"text": text}).get_json()
    assert body["ids"] == vocab.encode(text).ids.tolist() and body["count"] == len(body["ids"])
    assert body["tokens"] == list("the\nquick fx\n")  # newlines normalized, é -> e, ﬁ -> f, € dropped
    assert body["replaced"] == [{"offset": 2, "char": "é", "as": "e"}, {"offset": 12, "char": "ﬁ", "as": "f"}]
    assert body["dropped"] == [{"offset": 7, "char": "€"}]
    assert body["model"] == "run"
    back = client.post("/v1/detokenize", json={"ids": body["ids"]}).get_json()
    assert back == {"model": "run", "text": "the\nquick fx\n", "dropped": []}


def test_detokenize_drops_and_lists_ids_outside_the_vocabulary(client, vocab):
    ids = [vocab.index["d"], len(vocab), vocab.index["o"], 10**6, vocab.index["g"]]
    assert client.post("/v1/detokenize", json={"ids": ids}).get_json()["text"] == "dog"
    assert client.post("/v1/detokenize", json={"ids": ids}).get_json()["dropped"] == [{"index": 1, "id": len(vocab)},
                                                                                      {"index": 3, "id": 10**6}]
    assert client.post("/v1/detokenize", json={"ids": []}).get_json()["text"] == ""


@pytest.mark.parametrize("path, body, param, code", [
    ("/v1/tokenize", {}, "text", "missing_field"),
    ("/v1/tokenize", {"text": 3}, "text", "wrong_type"),
    ("/v1/detokenize", {"ids": [-1]}, "ids", "out_of_range"),
    ("/v1/detokenize", {"ids": [1.5]}, "ids", "wrong_type"),
    ("/v1/detokenize", {"ids": "abc"}, "ids", "wrong_type"),
    ("/v1/tokenize", {"text": "x", "model": "nope"}, "model", "model_not_found"),
])
def test_wrong_input_is_named(client, path, body, param, code):
    assert_error(client.post(path, json=body), 404 if code == "model_not_found" else 422, code, param)


def test_logit_bias_keys_are_ids_or_characters(client, vocab):
    ask = {"prompt": "the quick", "max_chars": 40, "temperature": 0}
    plain = client.post("/v1/generate", json=ask).get_json()["choices"][0]["text"]
    assert "o" in plain
    for key in ("o", "ó", str(vocab.index["o"]), "oo"):  # a character, one read as it, its id, text of it
        text = client.post("/v1/generate", json={**ask, "logit_bias": {key: -100}}).get_json()["choices"][0]["text"]
        assert "o" not in text and text != plain, key
    forced = client.post("/v1/generate", json={**ask, "logit_bias": {"z": 100}}).get_json()["choices"][0]["text"]
    assert forced == "z" * 40
    # biases of one character add up: +100 and -100 on "z" cancel
    assert client.post("/v1/generate", json={**ask, "logit_bias": {"z": 100, str(vocab.index["z"]): -100}}).get_json()["choices"][0]["text"] == plain
    # names of nothing change nothing: an id beyond the vocabulary, a character dropped by the rule
    for key in (str(len(vocab)), "€"):
        assert client.post("/v1/generate", json={**ask, "logit_bias": {key: 100}}).get_json()["choices"][0]["text"] == plain
