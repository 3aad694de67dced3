"""The validation layer through Flask's test client: hostile bodies, the bounds of every number, and
the document (/openapi.json) agreeing with the server on what it accepts.

The same through a real gunicorn, and the whole document fuzzed by schemathesis: test_fuzz.py.
"""

from __future__ import annotations

import itertools
import json

import pytest

from model.records.defaults import MAX_TEMPERATURE, MAX_TOP_K
from model.runtime.sampling import MAX_BIAS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_REPETITION_WINDOW
from server import continuation
from service.app import create_app
from service.config import SettingsError
from service.reading import MAX_JSON_DEPTH, json_depth
from service.schemas import BOUNDS, MAX_LOGPROBS, MAX_OPENAI_TEMPERATURE, MAX_SEED, NEUTRAL
from conftest import loaded_app

CHAT = {"messages": [{"role": "user", "content": "the"}]}

MAX_N = 4
BIG_BODY = 4 << 20  # room for 1,000,000 levels of [ and ]


@pytest.fixture(scope="module")
def app(tiny_artifact):
    with loaded_app(tiny_artifact, MAX_N=MAX_N, MAX_BATCH=16, MAX_CHARS=1000, MAX_BODY_BYTES=BIG_BODY) as app:
        yield app


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    return response.get_json()["error"]


# ---------------------------------------------------------------- nesting depth (400, never a 500)


def nested(depth: int, kind: str) -> bytes:
    if kind == "arrays":
        return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "objects":
        return b'{"prompt": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"
    return b'{"prompt": ' + b"[" * depth  # never closed: the parser recursed before it saw the end


@pytest.mark.parametrize("kind, depth", [(kind, depth) for kind in ("arrays", "objects", "unclosed")
                                         for depth in (100, 10_000, 100_000, 1_000_000)
                                         if len(nested(depth, kind)) <= BIG_BODY])  # (a million objects: 7 MB)
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])
def test_json_nested_any_depth_is_a_400_naming_the_limit(client, path, kind, depth):
    body = nested(depth, kind)
    error = error_of(client.post(path, data=body, content_type="application/json"), 400)
    assert error["code"] == "too_deep"
    assert f"at most {MAX_JSON_DEPTH} levels" in error["message"]
    assert str(depth + 1) in error["message"]  # the prompt's own object is a level too


def test_json_within_the_depth_limit_is_parsed_and_judged_by_the_schema(client):
    ok = nested(MAX_JSON_DEPTH - 1, "arrays")  # 32 levels with the body's object
    assert error_of(client.post("/v1/generate", data=ok, content_type="application/json"), 422)["param"] == "prompt"
    deep = nested(MAX_JSON_DEPTH, "arrays")
    assert error_of(client.post("/v1/generate", data=deep, content_type="application/json"), 400)["code"] == "too_deep"


def test_brackets_inside_strings_are_text(client):
    prompt = "[" * 5000 + '\\"{' * 100  # escaped quotes do not end the string
    body = json.dumps({"prompt": prompt[:900], "max_chars": 3, "temperature": 0}).encode()
    assert json_depth(body) == 1
    assert client.post("/v1/generate", data=body, content_type="application/json").status_code == 200
    assert json_depth(b'{"a": "\\\\", "b": [[["x"]]]}') == 4  # an escaped backslash ends nothing early


# ---------------------------------------------------------------- bounds of every number


@pytest.mark.parametrize("path, field, value", [
    ("/v1/generate", "temperature", 1e308),
    ("/v1/generate", "temperature", MAX_TEMPERATURE + 1e-9),
    ("/v1/completions", "temperature", 1e308),
    ("/v1/generate", "top_k", MAX_TOP_K + 1),
    ("/v1/completions", "top_k", 10**30),
    ("/v1/generate", "logprobs", MAX_LOGPROBS + 1),
    ("/v1/completions", "logprobs", MAX_LOGPROBS + 1),
    ("/v1/generate", "seed", MAX_SEED + 1),
    ("/v1/generate", "n", MAX_N + 1),
    ("/v1/generate", "max_chars", 1001),
    ("/v1/completions", "max_tokens", 1001),
    ("/v1/completions", "best_of", MAX_N + 1),
    ("/v1/generate", "presence_penalty", MAX_PENALTY + 0.01),
    ("/v1/completions", "frequency_penalty", MAX_PENALTY + 1),
    ("/v1/chat/completions", "presence_penalty", 1e308),
    ("/v1/generate", "repetition_penalty", MAX_REPETITION_PENALTY + 1),
    ("/v1/chat/completions", "repetition_window", MAX_REPETITION_WINDOW + 1),
    ("/v1/completions", "min_p", 1.5),
    ("/v1/chat/completions", "max_completion_tokens", 1001),
    ("/v1/chat/completions", "max_tokens", 1001),
    ("/v1/chat/completions", "top_logprobs", MAX_LOGPROBS + 1),
    ("/v1/chat/completions", "n", MAX_N + 1),
    ("/v1/score", "top_logprobs", MAX_LOGPROBS + 1),
])
def test_a_number_above_its_bound_is_a_422_naming_it(client, path, field, value):
    base = CHAT if "chat" in path else {"text": "the"} if "score" in path else {"prompt": "the"}
    error = error_of(client.post(path, json={**base, field: value}), 422)
    assert (error["param"], error["code"]) == (field, "out_of_range")
    assert field in error["message"] and "less than or equal" in error["message"]


def test_the_highest_temperature_is_accepted(client):
    r = client.post("/v1/generate", json={"prompt": "the", "max_chars": 5, "temperature": MAX_TEMPERATURE, "top_k": MAX_TOP_K})
    assert r.status_code == 200 and len(r.get_json()["choices"][0]["text"]) == 5


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_openai_endpoints_keep_openais_temperature_bound_and_generate_keeps_its_own(client, path):
    base = CHAT if "chat" in path else {"prompt": "the"}
    for too_hot in (5, MAX_OPENAI_TEMPERATURE + 0.01, MAX_TEMPERATURE):
        error = error_of(client.post(path, json={**base, "max_tokens": 5, "temperature": too_hot}), 422)
        assert (error["param"], error["code"]) == ("temperature", "out_of_range"), error
        assert error["message"].startswith("temperature: ") and "less than or equal to 2" in error["message"], error
    assert client.post(path, json={**base, "max_tokens": 5, "temperature": MAX_OPENAI_TEMPERATURE}).status_code == 200
    r = client.post("/v1/generate", json={"prompt": "the", "max_chars": 5, "temperature": 5})
    assert r.status_code == 200 and len(r.get_json()["choices"][0]["text"]) == 5


def test_a_tiny_temperature_is_greedy(client):
    r = client.post("/v1/generate", json={"prompt": "the quick", "max_chars": 40, "temperature": 1e-310, "seed": 3})
    assert r.get_json()["choices"][0]["text"] == continuation("the quick", 40)


def test_a_penalty_below_its_bound_and_a_bias_beyond_its_bound_are_422s(client):
    for body, field in [({"prompt": "the", "presence_penalty": -2.5}, "presence_penalty"),
                        ({"prompt": "the", "repetition_penalty": 0}, "repetition_penalty"),
                        ({"prompt": "the", "logit_bias": {"a": MAX_BIAS + 1}}, "logit_bias"),
                        ({"prompt": "the", "logit_bias": {"a": -MAX_BIAS - 1}}, "logit_bias"),
                        ({"prompt": "the", "min_p": -0.1}, "min_p")]:
        error = error_of(client.post("/v1/generate", json=body), 422)
        assert (error["param"], error["code"]) == (field, "out_of_range"), body


def test_info_and_the_document_state_the_bounds(client):
    info = client.get("/info").get_json()
    assert info["bounds"] == BOUNDS and info["bounds"]["max_temperature"] == MAX_TEMPERATURE
    assert info["bounds"]["max_openai_temperature"] == MAX_OPENAI_TEMPERATURE == 2
    doc = client.get("/openapi.json").get_json()["components"]["schemas"]
    for model in ("GenerateRequest", "CompletionRequest", "ChatRequest"):
        fields = doc[model]["properties"]
        assert fields["temperature"]["maximum"] == (MAX_TEMPERATURE if model == "GenerateRequest" else MAX_OPENAI_TEMPERATURE)
        assert fields["top_k"]["maximum"] == MAX_TOP_K
        assert fields["top_p"]["maximum"] == 1
        assert fields["presence_penalty"]["minimum"] == -MAX_PENALTY and fields["frequency_penalty"]["maximum"] == MAX_PENALTY
        assert fields["repetition_penalty"]["maximum"] == MAX_REPETITION_PENALTY
        assert fields["repetition_window"]["maximum"] == MAX_REPETITION_WINDOW
        assert fields["min_p"]["maximum"] == 1
        assert fields["logit_bias"]["additionalProperties"] == {"type": "number", "minimum": -MAX_BIAS, "maximum": MAX_BIAS}
    for model in ("GenerateRequest", "CompletionRequest", "ChatRequest", "ScoreRequest", "TokenizeRequest", "DetokenizeRequest"):
        for name, field in doc[model]["properties"].items():  # every number and integer has an upper bound, or is pinned by an enum
            for kind in field.get("anyOf", [field, field.get("items", {})]):
                if kind.get("type") in ("number", "integer") or "number" in kind.get("type", []):
                    assert "maximum" in kind or "enum" in field, (model, name)


@pytest.mark.parametrize("variable, value", [("DEFAULT_TEMPERATURE", "11"), ("DEFAULT_TOP_K", str(MAX_TOP_K + 1))])
def test_a_default_beyond_a_bound_stops_start_up(tiny_artifact, variable, value):
    with pytest.raises(SettingsError, match=f"CHARGEN_{variable}"):
        create_app({"ARTIFACT": str(tiny_artifact), variable: value})


# ---------------------------------------------------------------- integers written as 3.0


@pytest.mark.parametrize("path, fields", [
    ("/v1/generate", {"max_chars": 7.0, "n": 2.0, "seed": 5.0, "top_k": 3.0, "logprobs": 1.0}),
    ("/v1/completions", {"max_tokens": 7.0, "n": 2.0, "seed": 5.0, "top_k": 3.0, "logprobs": 1.0, "best_of": 3.0,
                         "repetition_window": 8.0}),
])
def test_a_whole_number_written_with_a_point_is_an_integer(client, path, fields):
    # JSON Schema, and so /openapi.json's "integer", counts 7.0 as an integer
    as_floats = client.post(path, json={"prompt": "the", "temperature": 1.0, **fields})
    as_ints = client.post(path, json={"prompt": "the", "temperature": 1.0, **{k: int(v) for k, v in fields.items()}})
    assert as_floats.status_code == as_ints.status_code == 200, as_floats.get_json()
    texts = [[c["text"] for c in r.get_json()["choices"]] for r in (as_floats, as_ints)]
    assert texts[0] == texts[1] and len(texts[0]) == 2 and all(len(t) == 7 for t in texts[0])


@pytest.mark.parametrize("field", ["max_chars", "n", "seed", "top_k", "logprobs"])
def test_a_fraction_for_an_integer_is_a_422(client, field):
    error = error_of(client.post("/v1/generate", json={"prompt": "the", field: 2.5}), 422)
    assert (error["param"], error["code"]) == (field, "wrong_type") and "2.5" in error["message"]


# ---------------------------------------------------------------- the document and the server agree


def test_415_is_documented_where_it_is_answered(client):
    doc = client.get("/openapi.json").get_json()
    r = client.post("/v1/completions", data=b"the quick", content_type="text/plain")
    assert error_of(r, 415)["code"] == "unsupported_media_type"
    assert "415" in doc["paths"]["/v1/completions"]["post"]["responses"]
    assert "text/event-stream" in doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]


def test_the_document_lists_no_query_settings_for_json_requests(client):
    # OpenAPI has no way to say "these parameters only with a text/plain body", and with a JSON
    # body the server refuses them: so they are described, and not listed as parameters.
    post = client.get("/openapi.json").get_json()["paths"]["/v1/generate"]["post"]
    assert "parameters" not in post and "query string" in post["description"]
    assert error_of(client.post("/v1/generate?temperature=0", json={"prompt": "the"}), 422)["code"] == "unexpected_query"
    r = client.post("/v1/generate?temperature=0&max_chars=5", data=b"the quick", content_type="text/plain")
    assert r.get_data(as_text=True) == continuation("the quick", 5) + "\n"


def validator_of(client, model: str):
    import jsonschema_rs

    doc = client.get("/openapi.json").get_json()
    schema = {**doc["components"]["schemas"][model], "components": doc["components"]}
    return jsonschema_rs.Draft202012Validator(schema)  # its $refs point into the document's components


def test_the_rules_across_fields_are_in_the_document_and_the_server_keeps_them(client):
    """For every number of prompts, n, best_of, stream, echo and logprobs: the document's schema
    accepts the request exactly when the server does."""
    validator = validator_of(client, "CompletionRequest")
    cases = itertools.product(range(1, MAX_N + 1), range(1, MAX_N + 1), [None, 1, 2, MAX_N], [None, True], [None, True], [None, 2])
    for prompts, n, best_of, stream, echo, logprobs in cases:
        body = {"prompt": ["the"] * prompts, "n": n, "best_of": best_of, "stream": stream, "echo": echo, "logprobs": logprobs,
                "max_tokens": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code in (200, 422), r.get_json()
        assert validator.is_valid(body) == (r.status_code == 200), (body, r.get_json())


def test_the_chat_rules_are_in_the_document_and_the_server_keeps_them(client):
    validator = validator_of(client, "ChatRequest")
    for logprobs, top in itertools.product([None, False, True], [None, 0, 2]):
        body = {**CHAT, "logprobs": logprobs, "top_logprobs": top, "max_tokens": 1}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code in (200, 422), r.get_json()
        assert validator.is_valid(body) == (r.status_code == 200), (body, r.get_json())


@pytest.mark.parametrize("field", sorted(NEUTRAL))
def test_unsupported_openai_fields_take_their_neutral_value_as_documented(client, field):
    fields = client.get("/openapi.json").get_json()["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields[field]["enum"] == [NEUTRAL[field], None]
    for value in (NEUTRAL[field], None):
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, field: value}).status_code == 200
    other = {"suffix": "y"}[field]
    error = error_of(client.post("/v1/completions", json={"prompt": "x", field: other}), 422)
    assert error["param"] == field and "not supported" in error["message"]
