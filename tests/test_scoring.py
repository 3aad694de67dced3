"""Scoring a text: POST /v1/score and /v1/completions with echo and logprobs (max_tokens 0 too)
give the figures of `chargen evaluate` (model/training/evaluate.py's StreamScorer on the Keras model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PERIODIC, loaded_app

from chargen.cli import main
from model.training.data import streams

AGREE = 1e-4  # nats per character, the bound


@pytest.fixture(scope="module")
def app(tiny_artifact):
    # the float32 graph, whose figures are the Keras network's (tests/test_int8.py: the int8 graph's are
    # `chargen evaluate --precision int8`'s)
    with loaded_app(tiny_artifact, MAX_PROMPT_CHARS=5000, MAX_BODY_BYTES=1 << 20, PRECISION="float32") as app:
        yield app


def evaluate(artifact, text: str, tmp_path) -> dict:
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode())
    result = CliRunner().invoke(main, ["evaluate", "--artifact", str(artifact), "--text", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


TEXTS = {"learned": PERIODIC * 3 + "the quick brown", "other": "a lazy fox jumps over the quick dog. the end.\n" * 2,
         "unknown": "thé quick brown fox jumps over the lazy dog.€\r\n" * 3}


@pytest.mark.parametrize("name", TEXTS)
def test_score_agrees_with_chargen_evaluate(client, tiny_artifact, tmp_path, name):
    text = TEXTS[name]
    want = evaluate(tiny_artifact, text, tmp_path)
    got = client.post("/v1/score", json={"text": text}).get_json()
    assert abs(got["nats_per_char"] - want["nats_per_char"]) < AGREE, (got, want)
    assert abs(got["bits_per_char"] - want["bits_per_char"]) < AGREE / math.log(2)
    for key in ("chars_scored", "chars", "outside_vocabulary", "replaced", "dropped"):
        assert got[key] == want[key], key
    if name == "unknown":
        assert (got["chars"], got["outside_vocabulary"], got["replaced"], got["dropped"]) == (138, 6, 3, 3)  # \r\n is \n, é -> e, € dropped
    # the completions API, as lm-evaluation-harness asks: echo, logprobs, max_tokens 0, temperature 0
    r = client.post("/v1/completions", json={"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0})
    choice = r.get_json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == want["chars_scored"] + 1
    assert abs(-sum(lp["token_logprobs"][1:]) / want["chars_scored"] - want["nats_per_char"]) < AGREE


def test_a_long_text_scores_as_evaluate_scores_its_streams(client, tiny_artifact, tmp_path, app):
    """`chargen evaluate` cuts a text of 1,024 characters or more into streams of at least 512,
    each scored from the zero state; /v1/score carries the state through the whole text. Scoring
    evaluate's streams one by one gives its figure."""
    text = (PERIODIC + "a dog, lazy and brown, over which the quick fox jumps.\n") * 30  # 3,000 characters
    want = evaluate(tiny_artifact, text, tmp_path)
    vocab = app.extensions["chargen"].default.engine.vocab
    rows = streams(vocab.encode(text).ids, 64)  # as StreamScorer cuts it
    assert len(rows) == 5
    nats = sum(client.post("/v1/score", json={"text": vocab.decode(row)}).get_json()["nats_per_char"] * (len(row) - 1)
               for row in rows)
    assert abs(nats / (rows.size - len(rows)) - want["nats_per_char"]) < AGREE
    whole = client.post("/v1/score", json={"text": text}).get_json()
    assert whole["chars_scored"] == len(vocab.encode(text).ids) - 1 and whole["nats_per_char"] <= want["nats_per_char"] + AGREE


def test_each_characters_log_probability_and_alternatives(client):
    text = "thé quick€ brown"
    body = client.post("/v1/score", json={"text": text, "logprobs": True, "top_logprobs": 3}).get_json()
    chars = body["logprobs"]
    assert [c["char"] for c in chars] == list("the quick brown")  # é read as e, € dropped
    assert [c["offset"] for c in chars] == [i for i, c in enumerate(text) if c != "€"]
    assert chars[0]["logprob"] is None and chars[0]["top"] == []
    for c in chars[1:]:
        top = [t["logprob"] for t in c["top"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and c["logprob"] <= top[0] <= 0
        assert c["char"] in [t["char"] for t in c["top"]]  # the learned text: each character is among the likeliest
    assert body["nats_per_char"] == pytest.approx(-np.mean([c["logprob"] for c in chars[1:]]), abs=1e-12)
    plain = client.post("/v1/score", json={"text": text}).get_json()
    assert "logprobs" not in plain and plain["nats_per_char"] == body["nats_per_char"]


@pytest.mark.parametrize("text", ["", "t", "€€", "€t€"])
def test_a_text_with_fewer_than_two_known_characters_scores_nothing(client, text):
    body = client.post("/v1/score", json={"text": text, "logprobs": True}).get_json()
    assert body["chars_scored"] == 0 and body["nats_per_char"] is None and body["bits_per_char"] is None
    assert len(body["logprobs"]) == (1 if "t" in text else 0)


def test_echo_logprobs_of_the_prompt_then_the_completion(client):
    prompt = "the qu€ick"  # € is dropped: the tokens are what the model read, the offsets are in the text returned
    body = client.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 5,
                                                "temperature": 0}).get_json()
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt) and len(choice["text"]) == len(prompt) + 5
    assert lp["tokens"] == list("the quick") + list(choice["text"][len(prompt):])
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5, 7, 8, 9] + [10, 11, 12, 13, 14]
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert lp["top_logprobs"][0] is None
    assert all(tok in top and len(top) in (2, 3) for tok, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:]))  # the two, and the one read
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    # streamed: the prompt's chunk carries its logprobs, and the completion's offsets follow it
    from test_service import events

    got = events(client.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 5,
                                                      "temperature": 0, "stream": True}))
    first = got[0]["choices"][0]
    assert first["text"] == prompt and first["logprobs"]["tokens"] == list("the quick")
    assert first["logprobs"]["token_logprobs"] == lp["token_logprobs"][:9]
    offsets = sum((c["choices"][0]["logprobs"]["text_offset"] for c in got[1:-1] if c["choices"][0]["text"]), [])
    assert offsets == [10, 11, 12, 13, 14]


def test_max_tokens_0_without_echo_generates_nothing(client):
    body = client.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 0}).get_json()
    assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == [("", "length")]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}


def test_scoring_runs_in_the_engine_loop_and_several_prompts_score_each(client):
    prompts = ["the quick brown fox", "over the lazy dog", "jumps over"]
    body = client.post("/v1/completions", json={"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0, "n": 1}).get_json()
    for prompt, choice in zip(prompts, body["choices"]):
        single = client.post("/v1/score", json={"text": prompt}).get_json()
        mean = -np.mean(choice["logprobs"]["token_logprobs"][1:])
        assert mean == pytest.approx(single["nats_per_char"], abs=1e-12)
