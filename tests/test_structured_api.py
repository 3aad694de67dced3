"""Structured output over HTTP: regex, grammar and json_schema on /v1/generate, grammar, json_schema
and response_format on /v1/completions, response_format on /v1/chat/completions (service/schemas.py,
service/api.py). What cannot be compiled for the model is a 422 naming the field, before anything is
generated (streamed requests too); at most one constraint per request; the outputs match their
patterns; /openapi.json states the same rules. The Flask test client first (conftest's tiny model,
whose greedy text is known), then, marked slow, the real gunicorn and the official openai client with
a tiny model trained on JSON-like text (conftest.json_artifact)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import PERIODIC, assert_error, events, loaded_app
from model.runtime.constraints import MAX_SOURCE_CHARS, compile_constraint
from server import REQUEST_TIMEOUT, running_server

# The tiny model knows lowercase text only: a chat template it can continue (as tests/test_chat.py).
PLAIN = {"CHAT_TEMPLATE": "{name}{content}\\n", "CHAT_NAMES": "system=,developer=,user=,assistant="}
ASK = [{"role": "user", "content": "the quick brown fox"}]
GRAMMAR = 'root ::= word (" " word)* "."\nword ::= [a-z]+'
WORDS = r"[a-z]+( [a-z]+)*\."  # the same language as GRAMMAR
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def app(tiny_artifact):
    with loaded_app(tiny_artifact, MAX_N=4, MAX_BATCH=16, **PLAIN) as app:
        yield app


def vocab_of(app):
    return app.extensions["chargen"].served(None).engine.vocab


def generate(client, **fields):
    r = client.post("/v1/generate", json={"prompt": "the quick", "temperature": 0, **fields})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


# ---------------------------------------------------------------- refused: 422 naming the fields


@pytest.mark.parametrize("path, fields, param, code, says", [
    ("/v1/generate", {"regex": "a+", "grammar": GRAMMAR}, "grammar", "invalid_value", "regex and grammar cannot be combined"),
    ("/v1/generate", {"regex": "a+", "json_schema": PERSON}, "json_schema", "invalid_value", "regex and json_schema cannot be combined"),
    ("/v1/generate", {"grammar": GRAMMAR, "json_schema": PERSON}, "json_schema", "invalid_value",
     "grammar and json_schema cannot be combined"),
    ("/v1/completions", {"grammar": GRAMMAR, "json_schema": PERSON}, "json_schema", "invalid_value", "grammar and json_schema"),
    ("/v1/completions", {"grammar": GRAMMAR, "response_format": {"type": "json_object"}}, "response_format", "invalid_value",
     "grammar and response_format"),
    ("/v1/completions", {"json_schema": PERSON, "response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
     "response_format", "invalid_value", "json_schema and response_format"),
    ("/v1/completions", {"grammar": GRAMMAR, "echo": True}, "grammar", "invalid_value", "grammar cannot be combined with echo"),
    ("/v1/completions", {"response_format": {"type": "json_object"}, "echo": True, "logprobs": 1}, "response_format",
     "invalid_value", "response_format cannot be combined with echo"),
    ("/v1/completions", {"json_schema": PERSON, "max_tokens": 0}, "json_schema", "invalid_value",
     "json_schema cannot be combined with max_tokens 0"),
    ("/v1/completions", {"response_format": {"type": "xml"}}, "response_format", "wrong_type", "'text', 'json_object', 'json_schema'"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "response_format",
     "missing_field", "name"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object", "schema": PERSON}}, "response_format", "unknown_field",
     "response_format.json_object.schema"),
    ("/v1/generate", {"regex": ""}, "regex", "out_of_range", "at least 1 character"),
    ("/v1/generate", {"grammar": "x" * (MAX_SOURCE_CHARS + 1)}, "grammar", "out_of_range", f"at most {MAX_SOURCE_CHARS} characters"),
    ("/v1/generate", {"json_schema": [PERSON]}, "json_schema", "wrong_type", "valid dictionary"),
    # where constraints have rules across fields, a constraint field is given or left out, never null (the
    # document's rules look at which fields are there)
    ("/v1/generate", {"regex": None}, "regex", "wrong_type", "valid string"),
    ("/v1/completions", {"grammar": None}, "grammar", "wrong_type", "valid string"),
    ("/v1/completions", {"response_format": None}, "response_format", "wrong_type", "valid dictionary"),
    # a scoring request takes no response_format at all, text too (the document's rule is by presence)
    ("/v1/completions", {"response_format": {"type": "text"}, "echo": True}, "response_format", "invalid_value",
     "response_format cannot be combined with echo"),
])
def test_constraints_combined_or_misshapen_are_a_422_naming_the_fields(client, path, fields, param, code, says):
    body = {"messages": ASK, **fields} if path == "/v1/chat/completions" else {"prompt": "the", **fields}
    error = assert_error(client.post(path, json=body), 422, code, param)
    assert says in error["message"], error["message"]


# Malformed, explosive or impossible for this model (whose vocabulary is PERIODIC's characters: no
# capitals, digits, braces or quotes). Each is refused by compiling it, before anything is generated.
HOSTILE = [
    ("regex", "(a|aa)*(b", "regex is malformed"),
    ("regex", "(?=a)a", "regex is malformed"),
    ("regex", "(a*)*b{1000}{1000}", "regex is too complex"),
    ("regex", "((((a{100}){100}){100}){100})", "regex is"),
    ("regex", "(" * 20_000 + "a" + ")" * 20_000, "regex is"),
    ("regex", "[A-Z]+ [a-z]+", "needs characters the model's vocabulary lacks: 'A'"),
    ("regex", "[^\\s\\S]", "regex admits no text"),
    ("regex", "(\\w|é)|\\w", "regex could not be compiled: llguidance"),  # a valid regex llguidance panics on
    ("grammar", "root ::= foo", "grammar is malformed"),
    ("grammar", "root ::= root", "grammar admits no text"),
    ("grammar", 'root ::= "a" ("b" ' * 3000 + ")" * 3000, "grammar is"),
    ("grammar", 'root ::= "THE END"', "needs characters the model's vocabulary lacks: 'T', 'H', 'E'"),
    ("json_schema", PERSON, "json_schema needs characters the model's vocabulary lacks: '{'"),
    ("json_schema", False, "json_schema false allows no value"),
    ("json_schema", {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "json_schema"),
]


@pytest.mark.parametrize("kind, source, says", HOSTILE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(HOSTILE)])
@pytest.mark.parametrize("stream", [False, True])
def test_what_cannot_be_compiled_is_a_422_before_any_generation(client, kind, source, says, stream):
    r = client.post("/v1/generate", json={"prompt": "the", kind: source, "stream": stream})
    error = assert_error(r, 422, "invalid_constraint", kind)  # the status itself: no stream was started
    assert error["message"].startswith(f"{kind} ") and says in error["message"], error["message"]


@pytest.mark.parametrize("path, field", [("/v1/completions", "grammar"), ("/v1/completions", "response_format"),
                                         ("/v1/chat/completions", "response_format")])
def test_the_openai_endpoints_compile_at_request_time_too(client, path, field):
    source = 'root ::= "THE"' if field == "grammar" else {"type": "json_object"}
    body = {"messages": ASK} if path == "/v1/chat/completions" else {"prompt": "the"}
    for stream in (False, True):
        error = assert_error(client.post(path, json={**body, field: source, "stream": stream}), 422, "invalid_constraint", field)
        named = "grammar" if field == "grammar" else "response_format json_object"
        assert error["message"].startswith(f"{named} needs characters the model's vocabulary lacks: "), error["message"]


def test_json_schema_true_is_any_json_value(client):
    # JSON Schema's true schema allows any value; the tiny model's vocabulary has what null needs
    choice = generate(client, json_schema=True, max_chars=20)["choices"][0]
    assert choice["incomplete"] is False and choice["finish_reason"] == "stop"
    json.loads(choice["text"])
    got = events(client.post("/v1/generate", json={"prompt": "the quick", "json_schema": True, "temperature": 0,
                                                    "max_chars": 20, "stream": True}))
    assert "".join(e.get("text", "") for e in got if isinstance(e, dict)) == choice["text"], got


def test_json_schema_is_read_from_a_json_body_only(client):
    r = client.post("/v1/generate?json_schema=%7B%7D", data="the", headers={"Content-Type": "text/plain"})
    error = assert_error(r, 422, "unsupported", "json_schema")
    assert "JSON body" in error["message"]


# ---------------------------------------------------------------- constrained outputs


def test_a_regex_holds_the_text_and_the_model_ends_it(client, app):
    # greedy, the tiny model writes " brown fox jumps over the lazy dog.\n": the regex keeps what it
    # allows and ends at the match's only possible end
    got = generate(client, regex=r" [a-z ]+\.")
    choice = got["choices"][0]
    assert choice["text"] == " brown fox jumps over the lazy dog."
    assert choice["finish_reason"] == "stop" and choice["incomplete"] is False
    # a mask that departs from the model's own choice: only vowels, five of them
    choice = generate(client, regex="[aeiou]{5}", seed=3, temperature=1.0)["choices"][0]
    assert re.fullmatch("[aeiou]{5}", choice["text"]) and choice["finish_reason"] == "stop"
    assert choice["incomplete"] is False


def test_a_text_ended_by_the_bound_on_the_constraints_work_says_so(client, app, monkeypatch):
    from model.runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "CONSTRAINT_SECONDS", 0.02)
    grammar = 'root ::= e\ne ::= e "," e | e "." e | [a-c] | e e'  # ambiguous: its steps grow with the text
    bias = {c: 30 for c in "abc,."}
    for path, length in (("/v1/generate", "max_chars"), ("/v1/completions", "max_tokens")):
        r = client.post(path, json={"prompt": "the ", "grammar": grammar, length: 2000,
                                    "temperature": 1.0, "seed": 1, "logit_bias": bias})
        assert r.status_code == 200, r.get_json()
        choice = r.get_json()["choices"][0]
        assert choice["finish_reason"] == "stop" and len(choice["text"]) < 2000
        assert "the constraint's work for this text passed its bound (0.02 s)" in choice["constraint_error"]
    assert "constraint_error" not in generate(client, regex="[aeiou]{5}", seed=3, temperature=1.0)["choices"][0]


def test_unconstrained_answers_have_no_incomplete_field(client):
    got = generate(client, max_chars=5)
    assert "incomplete" not in got["choices"][0]


def test_at_max_chars_the_text_is_the_start_of_a_match(client, app):
    constraint = compile_constraint("regex", WORDS, vocab_of(app))
    choice = generate(client, regex=WORDS, max_chars=12, temperature=1.0, seed=5)["choices"][0]
    assert len(choice["text"]) == 12 and choice["finish_reason"] == "length" and choice["incomplete"] is True
    assert constraint.is_prefix(choice["text"]) and not constraint.matches(choice["text"])


@pytest.mark.parametrize("seed", range(4))
def test_sampled_texts_match_their_grammar(client, app, seed):
    constraint = compile_constraint("grammar", GRAMMAR, vocab_of(app))
    got = generate(client, grammar=GRAMMAR, temperature=1.5, seed=seed, max_chars=400, n=2)
    for choice in got["choices"]:
        text = choice["text"]
        if choice["incomplete"]:
            assert choice["finish_reason"] == "length" and constraint.is_prefix(text)
        else:
            assert re.fullmatch(WORDS, text) and constraint.matches(text), text


def test_a_regex_in_the_query_string_of_a_plain_text_request(client):
    r = client.post("/v1/generate?temperature=0&regex=%20[a-z%20]%2B%5C.", data="the quick", headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_data(as_text=True) == " brown fox jumps over the lazy dog.\n"  # the text, then the plain answer's newline
    assert r.headers["X-Incomplete"] == "false" and r.headers["X-Finish-Reason"] == "stop"


def test_a_constrained_stream(client):
    got = events(client.post("/v1/generate", json={"prompt": "the quick", "temperature": 0, "regex": r" [a-z ]+\.",
                                                   "stream": True}))
    assert "".join(e["text"] for e in got[:-1]) == " brown fox jumps over the lazy dog."
    assert got[-1]["done"] and got[-1]["choices"] == [{"index": 0, "finish_reason": "stop", "incomplete": False}]


def test_logprobs_are_of_the_distribution_after_the_mask(client):
    got = generate(client, regex="[aeiou]{8}", logprobs=10, temperature=1.0, seed=1, max_chars=8)
    for lp in got["choices"][0]["logprobs"]:
        assert all(alt["char"] in "aeiou" for alt in lp["top"] if alt["logprob"] > -1e9), lp
        assert sum(2.718281828 ** alt["logprob"] for alt in lp["top"]) == pytest.approx(1.0, abs=1e-6)  # renormalized
    forced = generate(client, regex="the end", logprobs=1, max_chars=7)["choices"][0]
    assert forced["text"] == "the end" and [lp["logprob"] for lp in forced["logprobs"]] == [0.0] * 7


def test_completions_with_grammar_and_json_schema_as_llama_cpp_names_them(client, app):
    r = client.post("/v1/completions", json={"prompt": "the quick", "grammar": GRAMMAR, "temperature": 0, "max_tokens": 200})
    assert r.status_code == 200, r.get_json()
    choice = r.get_json()["choices"][0]
    assert re.fullmatch(WORDS, choice["text"]), choice
    assert choice["finish_reason"] == "stop" and choice["incomplete"] is False
    # response_format text is no constraint, and goes with a grammar
    r = client.post("/v1/completions", json={"prompt": "the quick", "grammar": GRAMMAR, "response_format": {"type": "text"},
                                             "temperature": 0, "max_tokens": 200, "stream": True})
    got = events(r)
    assert got[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in got[:-1])
    assert re.fullmatch(WORDS, text)
    last = got[-2]["choices"][0]
    assert last["finish_reason"] == "stop" and last["incomplete"] is False
    assert all("incomplete" not in c["choices"][0] for c in got[:-2])


def test_chat_with_a_text_response_format_is_unconstrained(client):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "temperature": 0, "max_tokens": 50,
                                                  "response_format": {"type": "text"}})
    assert r.status_code == 200 and "incomplete" not in r.get_json()["choices"][0]


# ---------------------------------------------------------------- the document states the same rules


def test_the_document_states_the_constraint_fields_and_their_rules(client):
    jsonschema = pytest.importorskip("jsonschema")
    doc = client.get("/openapi.json").get_json()
    components = doc["components"]["schemas"]

    def valid(name: str, body: dict) -> bool:  # the request schema, its $refs (#/components/...) resolved in place
        return jsonschema.Draft202012Validator({**components[name], "components": {"schemas": components}}).is_valid(body)

    for field in ("regex", "grammar", "json_schema"):
        assert field in components["GenerateRequest"]["properties"]
    for field in ("grammar", "json_schema", "response_format"):
        assert field in components["CompletionRequest"]["properties"]
    assert "response_format" in components["ChatRequest"]["properties"]
    assert "after the constraint's mask" in components["GenerateRequest"]["properties"]["logprobs"]["description"]
    assert valid("GenerateRequest", {"prompt": "a", "regex": "a+"})
    assert not valid("GenerateRequest", {"prompt": "a", "regex": "a+", "grammar": GRAMMAR})
    assert not valid("GenerateRequest", {"prompt": "a", "regex": None, "grammar": GRAMMAR})
    assert not valid("GenerateRequest", {"prompt": "a", "grammar": GRAMMAR, "json_schema": {}})
    assert valid("CompletionRequest", {"prompt": "a", "grammar": GRAMMAR, "response_format": {"type": "text"}})
    assert not valid("CompletionRequest", {"prompt": "a", "grammar": GRAMMAR, "response_format": {"type": "json_object"}})
    assert not valid("CompletionRequest", {"prompt": "a", "grammar": GRAMMAR, "echo": True})
    assert not valid("CompletionRequest", {"prompt": "a", "json_schema": PERSON, "max_tokens": 0})
    assert not valid("CompletionRequest", {"prompt": "a", "json_schema": PERSON, "response_format": {"type": "json_object"}})
    assert not valid("CompletionRequest", {"prompt": "a", "response_format": {"type": "text"}, "echo": True})
    assert valid("CompletionRequest", {"prompt": "a", "json_schema": PERSON, "response_format": {"type": "text"}, "echo": False,
                                       "max_tokens": None})
    assert valid("ChatRequest", {"messages": ASK, "response_format": None})
    assert valid("ChatRequest", {"messages": ASK, "response_format": {"type": "json_schema",
                                                                      "json_schema": {"name": "person", "schema": PERSON, "strict": True}}})
    assert "incomplete" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["description"]


# ---------------------------------------------------------------- real gunicorn (slow)


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with running_server(tiny_artifact, env={f"CHARGEN_{k}": v for k, v in PLAIN.items()}) as s:
        yield s


@pytest.mark.slow
@pytest.mark.parametrize("kind, source, says", HOSTILE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(HOSTILE)])
def test_the_real_server_refuses_hostile_constraints_within_the_request_timeout(server, kind, source, says):
    # Server.post has a timeout: a compile that hung would fail here, not hang the suite
    asks = [("/v1/generate", {"prompt": "the", kind: source, "stream": True})]
    if kind != "regex":
        asks.append(("/v1/completions", {"prompt": "the", kind: source, "stream": True}))
    for path, body in asks:
        r = server.post(path, json=body)
        assert r.status_code == 422, r.text[:300]
        assert r.headers["Content-Type"].startswith("application/json") and says in r.json()["error"]["message"]
    assert server.get("/health").status_code == 200
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_the_real_server_streams_a_constrained_answer_and_still_answers_the_others(server):
    import requests

    with requests.post(server.url + "/v1/generate", json={"prompt": "", "temperature": 0, "regex": r"(.{10,60}\n){3}",
                                                          "max_chars": 400, "stream": True},
                       stream=True, timeout=REQUEST_TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        got = [json.loads(line[len("data: "):]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert "".join(e.get("text", "") for e in got) == PERIODIC * 3
    assert got[-1]["choices"] == [{"index": 0, "finish_reason": "stop", "incomplete": False}]
    plain = server.post("/v1/generate", json={"prompt": "the quick", "temperature": 0, "max_chars": 9}).json()
    assert plain["choices"][0]["text"] == " brown fo" and "incomplete" not in plain["choices"][0]


@pytest.mark.slow
def test_the_real_server_runs_eight_constrained_choices_in_one_step(server):
    # n=8: eight constrained rows step together, their matchers advancing in the engine's thread beside
    # the network's step (engine.BESIDE_ROWS), inside a gunicorn worker
    import regex as partial_re

    pattern = r"([a-z]+ ){2,5}[a-z]+\."
    body = {"prompt": "the ", "n": 8, "seed": 11, "temperature": 1.5, "regex": pattern, "max_chars": 60}
    first, again = (server.post("/v1/generate", json=body) for _ in range(2))
    assert first.status_code == again.status_code == 200, first.text[:300]
    choices = first.json()["choices"]
    assert len(choices) == 8 and [c["text"] for c in choices] == [c["text"] for c in again.json()["choices"]]
    for c in choices:
        if c["incomplete"]:
            assert c["finish_reason"] == "length" and partial_re.fullmatch(pattern, c["text"], partial=True), c
        else:
            assert c["finish_reason"] == "stop" and re.fullmatch(pattern, c["text"]), c
    assert any(not c["incomplete"] for c in choices)
    assert server.get("/health").status_code == 200 and "Traceback" not in server.log()


@pytest.fixture(scope="module")
def json_server(json_artifact):
    with running_server(json_artifact, env={f"CHARGEN_{k}": v for k, v in PLAIN.items()}) as s:
        yield s


@pytest.mark.slow
def test_the_openai_client_gets_json_valid_under_its_schema(json_server):
    openai = pytest.importorskip("openai")
    jsonschema = pytest.importorskip("jsonschema")
    client = openai.OpenAI(base_url=json_server.url + "/v1", api_key="not-needed", timeout=REQUEST_TIMEOUT, max_retries=0)
    ask = [{"role": "user", "content": '{"name": "ann", "age": 31}'}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    complete = 0
    for seed in range(6):
        reply = client.chat.completions.create(model="run", messages=ask, response_format=fmt, temperature=1.0, seed=seed,
                                               max_completion_tokens=120)
        choice = reply.choices[0]
        text = choice.message.content
        if (choice.model_extra or {}).get("incomplete"):
            continue
        complete += 1
        jsonschema.validate(json.loads(text), PERSON)
        assert text == json.dumps(json.loads(text))  # json.dumps's layout, as the model learned it
    assert complete >= 3  # the model knows how such a record ends; max_completion_tokens is plenty
    # streamed (greedy: the model's own record, under the schema)
    stream = client.chat.completions.create(model="run", messages=ask, response_format=fmt, temperature=0,
                                            max_completion_tokens=120, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["incomplete"] is False
    jsonschema.validate(json.loads(text), PERSON)
    # json_object: any JSON object
    objects = 0
    for seed in range(4):
        choice = client.chat.completions.create(model="run", messages=ask, response_format={"type": "json_object"},
                                                temperature=1.0, seed=seed, max_completion_tokens=120).choices[0]
        if not choice.model_extra["incomplete"]:
            objects += 1
            assert isinstance(json.loads(choice.message.content), dict)
    assert objects >= 2
    # the completions endpoint takes llama.cpp's json_schema (extra_body: the client has no such argument)
    done = client.completions.create(model="run", prompt="", max_tokens=120, temperature=0, extra_body={"json_schema": PERSON})
    if not done.choices[0].model_extra["incomplete"]:
        jsonschema.validate(json.loads(done.choices[0].text), PERSON)
    with pytest.raises(openai.UnprocessableEntityError, match="cannot be combined"):
        client.completions.create(model="run", prompt="", max_tokens=5, extra_body={"json_schema": PERSON, "grammar": GRAMMAR})
    # the Responses API's text.format, streamed and not
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    done = client.responses.create(model="run", input=ask[0]["content"], text={"format": fmt}, temperature=0,
                                   max_output_tokens=120)
    assert done.status == "completed" and done.text.format.type == "json_schema"
    jsonschema.validate(json.loads(done.output_text), PERSON)
    events = list(client.responses.create(model="run", input=ask[0]["content"], text={"format": fmt}, temperature=0,
                                          max_output_tokens=120, stream=True))
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == done.output_text
