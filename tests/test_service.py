"""The HTTP service through Flask's test client: every endpoint and every kind of bad input.

The real gunicorn server (streams over sockets, several workers, the openai client) is tested in
test_service_server.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from conftest import PERIODIC, assert_error, events
from polling import wait_for
from server import ROOT, continuation, server_env
from service.app import create_app
from service.config import Settings, SettingsError

LIMITS = {"MAX_CHARS": 1000, "MAX_N": 4, "MAX_PROMPT_CHARS": 300, "MAX_BODY_BYTES": 4096, "MAX_BATCH": 16}


def make_app(artifact, **config):
    app = create_app({"ARTIFACT": str(artifact), "TESTING": True, **config})
    return app


def ready(app):
    scheduler = app.extensions["chargen"].scheduler
    assert scheduler.wait_ready(120), f"model did not load: {scheduler.failure}"
    return app


@pytest.fixture(scope="module")
def app(tiny_artifact):
    app = ready(make_app(tiny_artifact, **LIMITS))
    yield app
    app.extensions["chargen"].scheduler.close()


@pytest.fixture
def client(app):
    return app.test_client()


# ---------------------------------------------------------------- /v1/generate: JSON


def test_generate_greedy_json(client):
    r = client.post("/v1/generate", json={"prompt": "the quick", "max_chars": 60, "temperature": 0})
    assert r.status_code == 200
    body = r.get_json()
    assert body["id"].startswith("gen-")
    assert body["model"] == "run"  # the artifact's directory name
    assert isinstance(body["seed"], int)
    assert body["choices"] == [{"index": 0, "text": continuation("the quick", 60), "finish_reason": "length"}]
    assert body["usage"] == {"prompt_chars": 9, "completion_chars": 60, "dropped_chars": 0}
    timings = body["timings"]
    assert set(timings) == {"queue_ms", "prompt_ms", "generation_ms", "chars_per_second"}
    assert all(v >= 0 for v in timings.values())
    assert timings["chars_per_second"] > 0
    assert r.headers["X-Request-Id"].startswith("req-")
    assert r.headers["X-Seed"] == str(body["seed"])


def test_same_seed_same_text_and_choices_use_seed_plus_index(client):
    ask = {"prompt": "the", "max_chars": 80, "temperature": 1.5, "seed": 41}
    one = client.post("/v1/generate", json=ask).get_json()
    again = client.post("/v1/generate", json=ask).get_json()
    assert one["choices"][0]["text"] == again["choices"][0]["text"]
    assert one["seed"] == 41
    three = client.post("/v1/generate", json={**ask, "seed": 40, "n": 3}).get_json()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three["choices"][1]["text"] == one["choices"][0]["text"]  # seed 40 + 1
    assert len({c["text"] for c in three["choices"]}) > 1  # at temperature 1.5 the seeds differ
    assert three["usage"]["prompt_chars"] == 3  # the prompt is counted once
    assert three["usage"]["completion_chars"] == sum(len(c["text"]) for c in three["choices"])


def test_stop_sequences(client):
    r = client.post("/v1/generate", json={"prompt": "the quick", "max_chars": 200, "temperature": 0, "stop": ["lazy", "zzz"]})
    choice = r.get_json()["choices"][0]
    assert choice == {"index": 0, "text": " brown fox jumps over the ", "finish_reason": "stop"}
    r = client.post("/v1/generate", json={"prompt": "the quick", "max_chars": 200, "temperature": 0, "stop": "\n"})
    assert r.get_json()["choices"][0]["text"] == " brown fox jumps over the lazy dog."


def test_logprobs(client):
    r = client.post("/v1/generate", json={"prompt": "the quick", "max_chars": 12, "temperature": 0, "logprobs": 3})
    choice = r.get_json()["choices"][0]
    assert len(choice["logprobs"]) == len(choice["text"]) == 12
    for char, entry in zip(choice["text"], choice["logprobs"]):
        assert entry["char"] == char
        assert entry["logprob"] <= 0
        assert len(entry["top"]) == 3
        assert entry["top"][0] == {"char": char, "logprob": entry["logprob"]}  # greedy takes the most likely
        assert [t["logprob"] for t in entry["top"]] == sorted((t["logprob"] for t in entry["top"]), reverse=True)
    without = client.post("/v1/generate", json={"prompt": "the", "max_chars": 5}).get_json()
    assert "logprobs" not in without["choices"][0]


def test_unknown_characters_rule(client):
    # é has the base form e in the vocabulary; ☃ has none and is dropped
    r = client.post("/v1/generate", json={"prompt": "the quick ☃br", "max_chars": 10, "temperature": 0}).get_json()
    assert r["usage"]["dropped_chars"] == 1
    assert r["usage"]["prompt_chars"] == len("the quick br")
    r = client.post("/v1/generate", json={"prompt": "thé", "max_chars": 7, "temperature": 0}).get_json()
    assert r["usage"]["dropped_chars"] == 0
    assert r["choices"][0]["text"] == continuation("the", 7)


def test_empty_prompt_and_defaults(client):
    r = client.post("/v1/generate", json={})
    body = r.get_json()
    assert r.status_code == 200
    assert body["usage"]["prompt_chars"] == 0
    assert len(body["choices"][0]["text"]) <= 200  # default max_chars
    assert body["choices"][0]["finish_reason"] in ("length", "stop")


# ---------------------------------------------------------------- /v1/generate: streaming


def test_stream_events_match_the_plain_answer(client):
    ask = {"prompt": "the", "max_chars": 150, "temperature": 1.0, "seed": 7, "n": 2, "logprobs": 1}
    whole = client.post("/v1/generate", json=ask).get_json()
    r = client.post("/v1/generate", json={**ask, "stream": True})
    assert r.status_code == 200
    assert r.mimetype == "text/event-stream"
    got = events(r)
    *chunks, last = got
    assert chunks and all(set(c) == {"index", "text", "logprobs"} for c in chunks)
    for i in range(2):
        text = "".join(c["text"] for c in chunks if c["index"] == i)
        assert text == whole["choices"][i]["text"]
        assert [lp["char"] for c in chunks if c["index"] == i for lp in c["logprobs"]] == list(text)
    assert last["done"] is True
    assert last["seed"] == 7
    assert last["choices"] == [{"index": i, "finish_reason": whole["choices"][i]["finish_reason"]} for i in range(2)]
    assert last["usage"] == whole["usage"]
    assert set(last["timings"]) == {"queue_ms", "prompt_ms", "generation_ms", "chars_per_second"}


# ---------------------------------------------------------------- /v1/generate: plain text


def test_plain_text_like_curl(client):
    # curl -d 'the quick' 'localhost:8000/v1/generate?temperature=0&max_chars=50' sends form-urlencoded
    r = client.post("/v1/generate?temperature=0&max_chars=50", data=b"the quick",
                    content_type="application/x-www-form-urlencoded")
    assert r.status_code == 200
    assert r.mimetype == "text/plain"
    assert r.get_data(as_text=True) == continuation("the quick", 50) + "\n"  # the shell's prompt starts on its own line
    assert r.headers["X-Finish-Reason"] == "length"
    assert r.headers["X-Completion-Chars"] == "50"  # the text's characters, not the newline after it
    # --data-binary @prompt.txt keeps newlines; text/plain is always a prompt, even one that looks like JSON
    r = client.post("/v1/generate?temperature=0&max_chars=9", data="over the lazy dog.\n".encode(), content_type="text/plain")
    assert r.get_data(as_text=True) == "the quick\n"
    r = client.post("/v1/generate?max_chars=5", data=b'{"not": "json"}', content_type="text/plain")
    assert r.status_code == 200 and r.mimetype == "text/plain"


def test_plain_text_stream(client):
    r = client.post("/v1/generate?temperature=0&max_chars=120&stream=1", data=b"the quick", content_type="text/plain")
    assert r.status_code == 200
    assert r.mimetype == "text/plain"
    assert r.get_data(as_text=True) == continuation("the quick", 120) + "\n"


@pytest.mark.parametrize("stream", ["0", "1"])
def test_plain_text_ends_with_one_newline_after_the_text_and_json_keeps_the_text_as_it_is(client, stream):
    def plain(query: str) -> str:
        r = client.post(f"/v1/generate?temperature=0&stream={stream}&{query}", data=b"the quick", content_type="text/plain")
        assert r.status_code == 200 and r.mimetype == "text/plain"
        return r.get_data(as_text=True)

    assert plain("max_chars=30") == continuation("the quick", 30) + "\n"
    # a stop sequence still ends the text before it; the newline comes after
    text = continuation("the quick", 100)
    assert plain("max_chars=100&stop=lazy") == text[: text.index("lazy")] + "\n"
    # a text that ends with a newline of its own gets one more: exactly one "\n" is never part of the text
    assert plain("max_chars=100&stop=the%20quick") == text[: text.index("the quick")] + "\n"
    assert text[: text.index("the quick")].endswith(".\n")

    ask = {"prompt": "the quick", "max_chars": 100, "temperature": 0, "stop": "lazy", "stream": stream == "1"}
    r = client.post("/v1/generate", json=ask)
    texts = [e.get("text", "") for e in events(r)] if stream == "1" else [c["text"] for c in r.get_json()["choices"]]
    assert "".join(texts) == text[: text.index("lazy")]
    # several choices are JSON only: the refusal is JSON, which ends with a newline too
    r = client.post(f"/v1/generate?n=2&stream={stream}", data=b"the quick", content_type="text/plain")
    assert_error(r, 422, "unsupported", "n")
    assert r.get_data(as_text=True).endswith("}\n")


def test_json_body_without_content_type_is_json(client):
    r = client.post("/v1/generate", data=b'{"prompt": "the quick", "max_chars": 5, "temperature": 0}',
                    content_type="application/x-www-form-urlencoded")
    assert r.mimetype == "application/json"
    assert r.get_json()["choices"][0]["text"] == continuation("the quick", 5)


def test_plain_text_in_latin1_when_declared(client):
    r = client.post("/v1/generate?temperature=0&max_chars=3", data="thé".encode("latin-1"),
                    content_type="text/plain; charset=latin-1")
    assert r.status_code == 200
    assert r.get_data(as_text=True) == continuation("the", 3) + "\n"


# ---------------------------------------------------------------- OpenAI: /v1/completions, /v1/models


def test_completions(client):
    r = client.post("/v1/completions", json={"model": "run", "prompt": "the quick", "max_tokens": 30, "temperature": 0})
    body = r.get_json()
    assert r.status_code == 200
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "run"
    assert body["choices"] == [{"text": continuation("the quick", 30), "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 30, "total_tokens": 39}


def test_completions_logprobs_echo_and_several_prompts(client):
    r = client.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 4, "temperature": 0, "logprobs": 2})
    lp = r.get_json()["choices"][0]["logprobs"]
    assert lp["tokens"] == list(continuation("the quick", 4))
    assert len(lp["token_logprobs"]) == 4 and all(v <= 0 for v in lp["token_logprobs"])
    assert all(len(top) == 2 and tok in top for tok, top in zip(lp["tokens"], lp["top_logprobs"]))
    assert lp["text_offset"] == [0, 1, 2, 3]
    # sampled: the chosen character is always there, beside the most likely (OpenAI: up to logprobs + 1)
    r = client.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 60, "temperature": 2, "seed": 2, "logprobs": 1})
    lp = r.get_json()["choices"][0]["logprobs"]
    assert all(tok in top and top[tok] == v for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))
    assert {len(top) for top in lp["top_logprobs"]} == {1, 2}  # 2 where the chosen was not the likeliest
    r = client.post("/v1/completions", json={"prompt": ["the quick", "over the"], "max_tokens": 5, "temperature": 0,
                                             "echo": True, "n": 2})
    texts = [c["text"] for c in r.get_json()["choices"]]
    assert texts == ["the quick" + continuation("the quick", 5)] * 2 + ["over the" + continuation("over the", 5)] * 2
    assert r.get_json()["usage"]["prompt_tokens"] == len("the quick") + len("over the")


def test_completions_stream(client):
    ask = {"prompt": "the quick", "max_tokens": 40, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    got = events(client.post("/v1/completions", json=ask))
    assert got[-1] == "[DONE]"
    usage_chunk = got[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 40
    chunks = got[:-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == continuation("the quick", 40)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_the_loop_hands_over_one_chunk_per_choice(app):
    """A reader that falls behind gets, per read, one chunk per choice with all that choice's text and
    logprobs since its last read (not one chunk per hand-over it missed, nor characters of
    several choices mixed)."""
    from model.runtime.engine import GenerationRequest
    from model.runtime.sampling import SamplingSettings
    from service.scheduler import Job

    scheduler = app.extensions["chargen"].scheduler
    requests = [GenerationRequest("the", max_chars=2000, sampling=SamplingSettings(temperature=1.0), seed=seed, logprobs=1)
                for seed in (1, 2)]
    now = time.perf_counter()
    job = Job(requests, incremental=True, deadline=now + 60, arrived=now)
    scheduler.submit(job)
    assert wait_for(lambda: job.done, timeout=30, interval=0.01)  # every hand-over waits unread
    assert job.events.qsize() >= 3  # two hand-overs or more, and DONE
    (chunks,) = list(scheduler.events(job))
    assert [c.index for c in chunks] == [0, 1]
    assert [c.text for c in chunks] == [s.text for s in job.streams]
    assert all([lp.char for lp in c.logprobs] == list(c.text) for c in chunks)


def test_models(client):
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["run"]
    assert body["data"][0]["object"] == "model" and body["data"][0]["created"] > 0
    assert client.get("/v1/models/run").get_json()["id"] == "run"
    assert_error(client.get("/v1/models/gpt-4"), 404, "model_not_found", "model")


# ---------------------------------------------------------------- /health, /info, /metrics, /openapi.json


def test_health_and_info(client, tiny_artifact):
    assert client.get("/health").status_code == 200
    info = client.get("/info").get_json()
    model = info["model"]
    assert (model["cell"], model["layers"], model["units"], model["embedding"]) == ("lstm", 1, 32, 16)
    assert model["parameters"] > 0 and model["vocab_size"] == len(set(PERIODIC))
    assert model["corpus"]["chars"] > 0 and model["validation"]["bits_per_char"] > 0
    assert model["path"] == str(tiny_artifact)
    assert info["limits"] == {"max_prompt_chars": 300, "max_chars": 1000, "max_n": 4, "max_queue": 128,
                              "max_body_bytes": 4096, "request_timeout": 300.0, "max_inspect_chars": 4000}
    assert info["defaults"] == {"max_chars": 200, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "presence_penalty": 0.0,
                                "frequency_penalty": 0.0, "repetition_penalty": 1.0, "repetition_window": 64, "min_p": 0.0,
                                "logit_bias": {}}
    assert info["engine"]["max_batch"] == 16


def test_metrics(client):
    with client.post("/v1/generate", json={"prompt": "the", "max_chars": 10}) as r:
        assert r.status_code == 200
    with client.post("/v1/generate", json={"temprature": 1}) as r:
        assert r.status_code == 422
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("chargen_requests_total", "chargen_request_duration_seconds_bucket", "chargen_time_to_first_char_seconds_bucket",
                 "chargen_chars_generated_total", "chargen_queue_depth", "chargen_active_streams", "chargen_batch_size_bucket",
                 "chargen_workers_ready"):
        assert name in text
    assert 'chargen_requests_total{method="POST",route="/v1/generate",status="422"}' in text
    assert 'chargen_requests_total{method="POST",route="/v1/generate",status="200"}' in text
    for invented in ("FROB", "XYZZY"):  # a method a client makes up is "other": no label per invention
        with client.open("/v1/generate", method=invented) as r:
            assert r.status_code == 405
    text = client.get("/metrics").get_data(as_text=True)
    assert 'method="other"' in text and "FROB" not in text and "XYZZY" not in text
    assert 'chargen_requests_total{method="other",route="/v1/generate",status="405"}' in text  # the route it asked
    with client.get("/no/such/path") as r:
        assert r.status_code == 404
    assert 'route="unmatched",status="404"' in client.get("/metrics").get_data(as_text=True)


def test_openapi_comes_from_the_request_schemas(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    generate = schemas["GenerateRequest"]
    assert generate["additionalProperties"] is False
    assert generate["properties"]["max_chars"]["maximum"] == 1000  # the configured limit
    assert generate["properties"]["n"]["maximum"] == 4
    assert generate["properties"]["temperature"]["default"] == 0.8
    assert "max_tokens" in schemas["CompletionRequest"]["properties"]
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
    post = doc["paths"]["/v1/generate"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateRequest"}
    assert "parameters" not in post  # query-string settings go with text/plain bodies only: described, not listed
    assert {"/v1/completions", "/v1/models", "/health", "/info", "/metrics"} <= set(doc["paths"])


# ---------------------------------------------------------------- bad input: 400


@pytest.mark.parametrize("body, content_type, code", [
    (b'{"prompt": "the', "application/json", "invalid_json"),
    (b"", "application/json", "invalid_json"),
    (b'{"prompt": "caf\xe9"}', "application/json", "invalid_encoding"),
    (b'\xff\xfe{\x00}\x00', "application/json", "invalid_encoding"),
    (b'["the", "quick"]', "application/json", "not_an_object"),
    (b'"the quick"', "application/json", "not_an_object"),
    (b"42", "application/json", "not_an_object"),
    (b"null", "application/json", "not_an_object"),
    (b'{"temperature": NaN}', "application/json", "invalid_json"),
    (b'{"prompt": "x",}', "application/x-www-form-urlencoded", "invalid_json"),  # looks like JSON, is broken
    (b"caf\xe9 au lait", "text/plain", "invalid_encoding"),
    (b"the", "text/plain; charset=klingon", "invalid_encoding"),
    (b"the", "text/plain; charset=base64", "invalid_encoding"),  # codecs that are not text encodings
    (b"the", "text/plain; charset=rot13", "invalid_encoding"),
    (b"the", "text/plain; charset=zlib", "invalid_encoding"),
    (b"the", "text/plain; charset=undefined", "invalid_encoding"),  # a text encoding that refuses everything
    (b"ROMEO\\", "text/plain; charset=punycode", "invalid_encoding"),
])
def test_unparsable_body_is_400(client, body, content_type, code):
    assert_error(client.post("/v1/generate", data=body, content_type=content_type), 400, code)


def test_a_multipart_body_and_a_repeated_model_are_refused_saying_so(client):
    # curl -F: the boundaries and part headers were the prompt
    r = client.post("/v1/generate", data={"prompt": "the quick"}, content_type="multipart/form-data")
    error = assert_error(r, 415, "unsupported_media_type")
    assert "multipart/form-data is not read" in error["message"]
    error = assert_error(client.get("/info?model=run&model=other"), 422, "repeated_setting", "model")
    assert "model is given 2 times" in error["message"]
    assert client.get("/info?model=run").status_code == 200


@pytest.mark.parametrize("body", [b'{"prompt": ', b"[1]", b'{"prompt": "\xff"}'])
def test_unparsable_completion_body_is_400(client, body):
    r = client.post("/v1/completions", data=body, content_type="application/json")
    assert r.status_code == 400
    assert r.get_json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- bad input: 422


@pytest.mark.parametrize("fields, param, code", [
    ({"temprature": 0.5}, "temprature", "unknown_field"),
    ({"prompt": "x", "max_char": 5}, "max_char", "unknown_field"),
    ({"temperature": -0.1}, "temperature", "out_of_range"),
    ({"temperature": "hot"}, "temperature", "wrong_type"),
    ({"temperature": "0.5"}, "temperature", "wrong_type"),  # JSON bodies are strict: a string is not a number
    ({"temperature": True}, "temperature", "wrong_type"),
    ({"max_chars": 0}, "max_chars", "out_of_range"),
    ({"max_chars": 1001}, "max_chars", "out_of_range"),
    ({"max_chars": 2.5}, "max_chars", "wrong_type"),
    ({"max_chars": None}, "max_chars", "wrong_type"),
    ({"top_k": -1}, "top_k", "out_of_range"),
    ({"top_p": 0}, "top_p", "out_of_range"),
    ({"top_p": 1.01}, "top_p", "out_of_range"),
    ({"seed": -1}, "seed", "out_of_range"),
    ({"seed": 2**64}, "seed", "out_of_range"),
    ({"seed": "42"}, "seed", "wrong_type"),
    ({"n": 0}, "n", "out_of_range"),
    ({"n": 5}, "n", "out_of_range"),
    ({"stop": ""}, "stop", "out_of_range"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "out_of_range"),
    ({"stop": [1]}, "stop", "wrong_type"),
    ({"stop": {"text": "x"}}, "stop", "wrong_type"),
    ({"logprobs": 11}, "logprobs", "out_of_range"),
    ({"logprobs": -1}, "logprobs", "out_of_range"),
    ({"stream": "yes"}, "stream", "wrong_type"),
    ({"prompt": 5}, "prompt", "wrong_type"),
    ({"prompt": ["the"]}, "prompt", "wrong_type"),
    ({"prompt": "x" * 301}, "prompt", "out_of_range"),
])
def test_wrong_field_is_422_naming_it(client, fields, param, code):
    error = assert_error(client.post("/v1/generate", json=fields), 422, code, param)
    assert param in error["message"]
    assert "constrained-" not in error["message"] and "[" not in error["message"].split(":")[0]  # no pydantic's names of union members


def test_number_too_large_for_a_float_is_422(client):
    r = client.post("/v1/generate", data=b'{"temperature": 1e999}', content_type="application/json")  # reads as infinity
    assert_error(r, 422, "out_of_range", "temperature")


@pytest.mark.parametrize("query, param, code", [
    ("temperature=warm", "temperature", "wrong_type"),
    ("max_chars=-3", "max_chars", "out_of_range"),
    ("bogus=1", "bogus", "unknown_field"),
    ("=5", "", "unknown_field"),  # a setting with no name is named so, not null
    ("n=2", "n", "unsupported"),
    ("logprobs=2", "logprobs", "unsupported"),
    ("prompt=the", "prompt", "duplicate_prompt"),
    ("max_chars=5&max_chars=6", "max_chars", "repeated_setting"),
    ("temperature=0&seed=1&temperature=0", "temperature", "repeated_setting"),
    ("regex=a&regex=b", "regex", "repeated_setting"),
])
def test_wrong_query_setting_for_plain_text_is_422(client, query, param, code):
    assert_error(client.post(f"/v1/generate?{query}", data=b"the", content_type="text/plain"), 422, code, param)


def test_a_repeated_query_setting_is_named_as_repeated_and_stop_may_repeat(client):
    error = assert_error(client.post("/v1/generate?max_chars=5&max_chars=5", data=b"the", content_type="text/plain"),
                         422, "repeated_setting", "max_chars")
    assert error["message"] == "max_chars is given 2 times in the query string: give it once"
    r = client.post("/v1/generate?max_chars=5&stop=zz&stop=qq", data=b"the", content_type="text/plain")
    assert r.status_code == 200 and len(r.get_data(as_text=True).removesuffix("\n")) <= 5  # plain text ends with a newline


def test_query_settings_with_a_json_body_are_refused(client):
    assert_error(client.post("/v1/generate?temperature=0", json={"prompt": "the"}), 422, "unexpected_query", "temperature")


@pytest.mark.parametrize("fields, param, code", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "out_of_range"),
    ({"prompt": "x", "max_tokens": 1001}, "max_tokens", "out_of_range"),
    ({"prompt": [1, 2, 3]}, "prompt", "wrong_type"),  # token ids: this model reads characters
    ({"prompt": "x", "suffix": "y"}, "suffix", "invalid_value"),
    ({"prompt": "x", "best_of": 2, "n": 3}, "best_of", "out_of_range"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty", "out_of_range"),
    ({"prompt": "x", "logit_bias": {"50256": -101}}, "logit_bias", "out_of_range"),
    ({"prompt": ["a", "b", "c"], "n": 2}, "n", "out_of_range"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options", "wrong_type"),
    ({"prompt": "x", "temprature": 0}, "temprature", "unknown_field"),
])
def test_wrong_completion_field_is_422(client, fields, param, code):
    assert_error(client.post("/v1/completions", json=fields), 422, code, param)


def test_completions_accepts_openai_neutral_fields(client):
    r = client.post("/v1/completions", json={"model": "run", "prompt": "the", "max_tokens": 3, "suffix": None, "best_of": 1,
                                             "presence_penalty": None, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u",
                                             "echo": False, "logprobs": None, "stream": False, "n": 1, "stop": None})
    assert r.status_code == 200, r.get_json()


def test_completions_needs_a_json_body(client):
    assert_error(client.post("/v1/completions", data=b"the quick", content_type="text/plain"), 415, "unsupported_media_type")


# ---------------------------------------------------------------- bad input: 413, 404, 405


@pytest.mark.parametrize("path, body, content_type", [
    ("/v1/generate", json.dumps({"prompt": "x" * 5000}).encode(), "application/json"),
    ("/v1/generate", b"x" * 5000, "text/plain"),
    ("/v1/completions", json.dumps({"prompt": "x" * 5000}).encode(), "application/json"),
])
def test_body_over_the_limit_is_413(client, path, body, content_type):
    error = assert_error(client.post(path, data=body, content_type=content_type), 413, "body_too_large")
    assert "4096" in error["message"]


@pytest.mark.parametrize("method, path, status, code", [
    ("get", "/nope", 404, "not_found"),
    ("post", "/v1/generat", 404, "not_found"),
    ("get", "/v1/generate", 405, "method_not_allowed"),
    ("put", "/v1/completions", 405, "method_not_allowed"),
    ("delete", "/health", 405, "method_not_allowed"),
    ("post", "/metrics", 405, "method_not_allowed"),
])
def test_wrong_route_or_method(client, method, path, status, code):
    r = getattr(client, method)(path)
    assert_error(r, status, code)
    if status == 405:
        assert r.headers["Allow"]


# ---------------------------------------------------------------- 500: logged with the request id, no stack trace


def test_unexpected_error_is_a_json_500_with_the_request_id(app, client, monkeypatch, caplog):
    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(app.extensions["chargen"], "info", broken)
    with caplog.at_level(logging.ERROR, logger="chargen"):
        r = client.get("/info")
    error = assert_error(r, 500, "internal_error")
    request_id = r.headers["X-Request-Id"]
    assert request_id in error["message"]
    assert "disk on fire" not in r.get_data(as_text=True)
    assert any(request_id in rec.getMessage() and rec.exc_info for rec in caplog.records)


def _broken(*args, **kwargs):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"prompt": "the", "max_chars": 20}),
    ("/v1/generate", {"prompt": "the", "max_chars": 20, "stream": True}),
    ("/v1/generate?max_chars=20&stream=1", b"the"),
    ("/v1/completions", {"prompt": "the", "max_tokens": 20}),
    ("/v1/completions", {"prompt": "the", "max_tokens": 20, "stream": True}),
])
@pytest.mark.parametrize("where", ["engine", "response"])
def test_a_generation_that_fails_is_a_500_with_the_request_id(app, client, monkeypatch, caplog, path, body, where):
    """Whether the engine fails to start a job or building the answer fails, every format says the
    same: a 500 quoting the request id (an error event or a last JSON line once a stream has begun)."""
    if where == "engine":
        monkeypatch.setattr(app.extensions["chargen"].scheduler.engine, "start", _broken)
    else:
        monkeypatch.setattr("service.api._timings", _broken)
    with caplog.at_level(logging.ERROR, logger="chargen"):
        if isinstance(body, bytes):
            r = client.post(path, data=body, content_type="text/plain")
        else:
            r = client.post(path, json=body)
    request_id = r.headers["X-Request-Id"]
    text = r.get_data(as_text=True)
    assert "disk on fire" not in text
    if r.status_code == 500:
        assert not body.get("stream")
        error = assert_error(r, 500, "internal_error")["message"]
    else:
        assert r.status_code == 200 and (isinstance(body, bytes) or body["stream"])
        last = json.loads(text.rstrip("\n").rsplit("\n", 1)[-1]) if r.mimetype == "text/plain" else events(r)[-1]
        assert last["error"]["code"] == "internal_error" and last["error"]["type"] == "server_error"
        error = last["error"]["message"]
    assert error == f"internal server error (request id {request_id}); the server log has details"
    if where == "response":
        assert any(request_id in rec.getMessage() and rec.exc_info for rec in caplog.records)


# ---------------------------------------------------------------- 401 and CORS


@pytest.fixture(scope="module")
def keyed_app(tiny_artifact):
    app = ready(make_app(tiny_artifact, API_KEY="s3cret", CORS_ORIGINS="https://page.example, http://localhost:5173"))
    yield app
    app.extensions["chargen"].scheduler.close()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                                     {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret2"},
                                     {"Authorization": "Bearer sécret"}])
@pytest.mark.parametrize("method, path", [("post", "/v1/generate"), ("post", "/v1/completions"), ("get", "/v1/models")])
def test_api_key_missing_or_wrong_is_401(keyed_app, headers, method, path):
    r = getattr(keyed_app.test_client(), method)(path, json={"prompt": "the"}, headers=headers)
    assert_error(r, 401, "invalid_api_key")
    assert r.get_json()["error"]["type"] == "authentication_error"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_api_key_accepted_and_ops_routes_open(keyed_app):
    c = keyed_app.test_client()
    r = c.post("/v1/generate", json={"prompt": "the", "max_chars": 3}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    for path in ("/health", "/info", "/metrics", "/openapi.json"):
        assert c.get(path).status_code == 200, path
    assert keyed_app.extensions["chargen"].openapi()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_cors(keyed_app):
    c = keyed_app.test_client()
    pre = c.options("/v1/generate", headers={"Origin": "https://page.example", "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200
    assert pre.headers["Access-Control-Allow-Origin"] == "https://page.example"
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    # OpenAI's JavaScript client sends headers of its own; a malformed name is not echoed
    sdk = c.options("/v1/chat/completions", headers={"Origin": "https://page.example", "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization, content-type, "
                                                     "x-stainless-os, x-stainless-lang, bad header, x;y"})
    allowed = [h.strip().lower() for h in sdk.headers["Access-Control-Allow-Headers"].split(",")]
    assert {"authorization", "content-type", "x-stainless-os", "x-stainless-lang"} <= set(allowed) and len(allowed) == 4
    assert "X-Incomplete" in sdk.headers["Access-Control-Expose-Headers"]
    r = c.post("/v1/generate", json={"prompt": "the", "max_chars": 3}, headers={"Authorization": "Bearer s3cret",
                                                                                "Origin": "http://localhost:5173"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "Origin" in r.headers["Vary"]
    other = c.post("/v1/generate", json={"prompt": "the"}, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_no_cors_by_default(client):
    r = client.post("/v1/generate", json={"prompt": "the", "max_chars": 3}, headers={"Origin": "https://page.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


# ---------------------------------------------------------------- building the app: no thread, no model


def test_building_the_app_starts_no_thread_and_loads_no_model(tiny_artifact):
    # What a tool that only wants /openapi.json does, in a fresh process so that nothing else loaded TensorFlow.
    code = (
        "import sys, threading\n"
        "from service.app import create_app\n"
        f"app = create_app({{'ARTIFACT': {str(tiny_artifact)!r}}})\n"
        "r = app.test_client().get('/openapi.json')\n"
        "assert r.status_code == 200 and r.get_json()['openapi'].startswith('3.'), r.status_code\n"
        "print([t.name for t in threading.enumerate() if t is not threading.main_thread()],\n"
        "      [m for m in ('tensorflow', 'keras', 'model.runtime.engine', 'model.runtime.artifact') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=server_env(tiny_artifact), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[] []"


def test_the_engine_starts_on_first_use(tiny_artifact):
    app = make_app(tiny_artifact)
    scheduler = app.extensions["chargen"].scheduler
    try:
        assert scheduler.engine is None
        assert app.test_client().get("/openapi.json").status_code == 200
        assert scheduler.engine is None  # the document needs no model
        r = app.test_client().post("/v1/generate", json={"prompt": "the quick", "max_chars": 5, "temperature": 0})
        assert_error(r, 503, "model_loading")  # the first request that needs the model starts loading it
        assert scheduler.wait_ready(120), scheduler.failure
        r = app.test_client().post("/v1/generate", json={"prompt": "the quick", "max_chars": 5, "temperature": 0})
        assert r.get_json()["choices"][0]["text"] == continuation("the quick", 5)
    finally:
        scheduler.close()


# ---------------------------------------------------------------- 503 while loading


def test_503_while_loading(tiny_artifact):
    app = make_app(tiny_artifact, LOAD_DELAY=600)  # the test-only knob: it never gets to load here
    try:
        c = app.test_client()
        for method, path in [("get", "/health"), ("post", "/v1/generate"), ("post", "/v1/completions"), ("get", "/v1/models"),
                             ("get", "/info")]:
            r = getattr(c, method)(path, json={"prompt": "the"})
            assert_error(r, 503, "model_loading")
            assert int(r.headers["Retry-After"]) > 0
        assert c.get("/openapi.json").status_code == 200  # needs no model
        assert_error(c.post("/v1/generate", json={"temprature": 1}), 422, "unknown_field", "temprature")  # input checked first
    finally:
        app.extensions["chargen"].scheduler.close()


def test_missing_artifact_fails_loading_with_the_loaders_message(tmp_path):
    app = make_app(tmp_path / "nothing-here")
    try:
        scheduler = app.extensions["chargen"].scheduler
        assert not scheduler.wait_ready(60)
        assert "no such artifact directory" in str(scheduler.failure)
        error = assert_error(app.test_client().get("/health"), 503, "model_failed")
        assert "nothing-here" in error["message"]
    finally:
        app.extensions["chargen"].scheduler.close()


# ---------------------------------------------------------------- queue full (429), deadline (504), client gone


@pytest.fixture(scope="module")
def tight_app(tiny_artifact):
    """One batch slot, no queue, a 2 s deadline, and max_chars high enough that a request would
    run far longer than that."""
    app = ready(make_app(tiny_artifact, MAX_BATCH=1, MAX_N=1, MAX_QUEUE=0, MAX_CHARS=1_000_000, REQUEST_TIMEOUT=2))
    yield app
    app.extensions["chargen"].scheduler.close()


def test_queue_full_is_429_and_a_dropped_stream_frees_its_slot(tight_app):
    from prometheus_client import REGISTRY

    c = tight_app.test_client()
    scheduler = tight_app.extensions["chargen"].scheduler
    long = c.post("/v1/generate", json={"prompt": "the", "max_chars": 1_000_000, "stream": True}, buffered=False)
    assert long.status_code == 200
    first = next(long.response)  # the stream is generating
    assert first.startswith(b"data: ")
    assert scheduler.engine.active == 1
    busy = c.post("/v1/generate", json={"prompt": "the", "max_chars": 5})
    assert_error(busy, 429, "queue_full")
    assert int(busy.headers["Retry-After"]) >= 1
    long.close()  # the client goes away: the generator is closed, the job cancelled
    assert wait_for(lambda: scheduler.engine.active == 0, interval=0.01)
    assert REGISTRY.get_sample_value("chargen_active_streams", {"model": "run"}) == 0
    assert c.post("/v1/generate", json={"prompt": "the", "max_chars": 5}).status_code == 200


def test_deadline_is_504(tight_app):
    c = tight_app.test_client()
    r = c.post("/v1/generate", json={"prompt": "the", "max_chars": 1_000_000})
    error = assert_error(r, 504, "deadline_exceeded")
    assert "deadline of 2 s (CHARGEN_REQUEST_TIMEOUT)" in error["message"]
    got = events(c.post("/v1/generate", json={"prompt": "the", "max_chars": 1_000_000, "stream": True}))
    assert got[0]["text"]
    assert got[-1]["error"]["code"] == "deadline_exceeded"  # the status line went out before the deadline
    assert tight_app.extensions["chargen"].scheduler.engine.active == 0


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("config, variable", [
    ({"MAX_QUEUE": "lots"}, "CHARGEN_MAX_QUEUE"),
    ({"MAX_BATCH": "0"}, "CHARGEN_MAX_BATCH"),
    ({"DEFAULT_TOP_P": "2"}, "CHARGEN_DEFAULT_TOP_P"),
    ({"CORS_ORIGINS": "page.example"}, "CHARGEN_CORS_ORIGINS"),
    ({"MAX_N": "9", "MAX_BATCH": "8"}, "CHARGEN_MAX_N"),
])
def test_bad_configuration_names_the_variable(tiny_artifact, config, variable):
    with pytest.raises(SettingsError, match=variable):
        create_app({"ARTIFACT": str(tiny_artifact), **config})


def test_configuration_from_the_environment(tiny_artifact, monkeypatch):
    monkeypatch.setenv("CHARGEN_ARTIFACT", str(tiny_artifact))
    monkeypatch.setenv("CHARGEN_API_KEY", "null")  # stays the string "null", not "no key"
    monkeypatch.setenv("CHARGEN_MAX_N", "3")
    monkeypatch.setenv("CHARGEN_LOAD_DELAY", "600")
    app = create_app()
    try:
        settings = app.extensions["chargen"].settings
        assert settings.api_key == "null" and settings.max_n == 3 and settings.artifact == str(tiny_artifact)
        assert_error(app.test_client().post("/v1/generate", json={}), 401, "invalid_api_key")
    finally:
        app.extensions["chargen"].scheduler.close()


# Values that used to pass the check and fail later (a traceback, a worker that cannot boot), or
# change what the server does without a word: each refused with one line that names the variable.
@pytest.mark.parametrize("env, message", [
    ({"CHARGEN_MODELS": " "}, "CHARGEN_MODELS: names no model"),
    ({"CHARGEN_MODELS": ","}, "CHARGEN_MODELS: names no model"),
    ({"CHARGEN_FRAME_ANCESTORS": "abc"}, "CHARGEN_FRAME_ANCESTORS: 'abc' is not an origin"),
    ({"CHARGEN_FRAME_ANCESTORS": "https://blog.example a=b"}, "CHARGEN_FRAME_ANCESTORS: 'a=b' is not an origin"),
    ({"CHARGEN_LOAD_DELAY": "inf"}, "CHARGEN_LOAD_DELAY: Input should be a finite number"),
    ({"CHARGEN_LOAD_DELAY": "1e300"}, "CHARGEN_LOAD_DELAY: Input should be less than or equal to 600"),
    ({"CHARGEN_LOAD_DELAY": "99999999999999999999"}, "CHARGEN_LOAD_DELAY: Input should be less than or equal to 600"),
    ({"CHARGEN_API_KEY": ""}, "CHARGEN_API_KEY: set but empty: unset it to serve without a key"),
    ({"CHARGEN_API_KEY": " "}, "CHARGEN_API_KEY: is only whitespace"),
    ({"CHARGEN_API_KEY": "s3cret\n"}, "CHARGEN_API_KEY: starts or ends with whitespace"),
    ({"CHARGEN_ARTIFACT": ""}, "CHARGEN_ARTIFACT: set but empty"),
    ({"CHARGEN_DEFAULT_MAX_CHARS": "99999999999999999999"},
     "invalid configuration: CHARGEN_DEFAULT_MAX_CHARS (99999999999999999999) is above CHARGEN_MAX_CHARS (4096)"),
    ({"CHARGEN_MAX_N": "9", "CHARGEN_MAX_BATCH": "8"}, "invalid configuration: CHARGEN_MAX_N (9) is above CHARGEN_MAX_BATCH (8)"),
    ({"CHARGEN_MAX_QUEUE": "99999999999999999999"}, "CHARGEN_MAX_QUEUE: Input should be less than or equal to 10000"),
    ({"CHARGEN_THREADS": "99999999999999999999"}, "CHARGEN_THREADS: Input should be less than or equal to 20000"),
    ({"CHARGEN_TIMEOUT": "99999999999999999999"}, "CHARGEN_TIMEOUT: Input should be less than or equal to 3600"),
    ({"CHARGEN_GRACEFUL_TIMEOUT": "99999999999999999999"}, "CHARGEN_GRACEFUL_TIMEOUT: Input should be less than or equal to 86400"),
    ({"CHARGEN_MAX_BODY_BYTES": "99999999999999999999"},
     "CHARGEN_MAX_BODY_BYTES: Input should be less than or equal to 1073741824"),
    ({"CHARGEN_REQUEST_TIMEOUT": "inf"}, "CHARGEN_REQUEST_TIMEOUT: Input should be a finite number"),
    ({"CHARGEN_REQUEST_TIMEOUT": "1e300"}, "CHARGEN_REQUEST_TIMEOUT: Input should be less than or equal to 86400"),
    ({"CHARGEN_STREAM_CHUNK_RATE": "1e-300"}, "CHARGEN_STREAM_CHUNK_RATE: Input should be greater than or equal to 1"),
    ({"CHARGEN_STREAM_CHUNK_RATE": "inf"}, "CHARGEN_STREAM_CHUNK_RATE: Input should be a finite number"),
])
def test_a_setting_that_would_fail_later_is_refused_at_once(env, message):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env)
    assert message in str(refused.value)
    assert "s3cret" not in str(refused.value)  # a key is never repeated in a message or a log


def test_the_settings_in_use_and_the_bounds_are_accepted():
    """The defaults, values deploy/ and the tests use, and each bound itself."""
    assert Settings.from_env({}) == Settings()
    settings = Settings.from_env({
        "CHARGEN_LOAD_DELAY": "600", "CHARGEN_REQUEST_TIMEOUT": "86400", "CHARGEN_GRACEFUL_TIMEOUT": "86400",
        "CHARGEN_TIMEOUT": "3600", "CHARGEN_MAX_QUEUE": "10000", "CHARGEN_THREADS": "20000",
        "CHARGEN_MAX_BODY_BYTES": str(1 << 30), "CHARGEN_STREAM_CHUNK_RATE": "1", "CHARGEN_API_KEY": "a key",
        "CHARGEN_MODELS": "", "CHARGEN_FRAME_ANCESTORS": "https://blog.example/, https://*.example.org:8443 *"})
    assert settings.api_key == "a key" and settings.models_to_serve().names == ["default"]
    assert settings.frame_ancestors == ["https://blog.example", "https://*.example.org:8443", "*"]
    assert Settings.from_env({"CHARGEN_REQUEST_TIMEOUT": "42.5", "CHARGEN_MAX_QUEUE": "0"}).request_timeout == 42.5
    assert Settings.from_env({"CHARGEN_API_KEY": "null"}).api_key == "null"
    assert Settings().api_key is None  # unset: no key
