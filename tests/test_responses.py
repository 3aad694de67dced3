"""POST /v1/responses (service/responses_api.py): OpenAI's Responses API over the chat pipeline, its
response object and its event sequence, the fields it refuses by name, and text.format's refusals.
(The official openai client's responses.create: tests/test_clients.py; text.format's JSON formats
held exactly: tests/test_structured_api.py.)"""

from __future__ import annotations

import json

import pytest

from conftest import assert_error, loaded_app

# The tiny model knows lowercase text only: a template it can continue, speakers without names (as tests/test_chat.py).
PLAIN = {"CHAT_TEMPLATE": "{name}{content}\\n", "CHAT_NAMES": "system=,developer=,user=,assistant="}
REPLY = " jumps over the lazy dog."  # greedy after "the quick brown fox\n"


@pytest.fixture(scope="module")
def app(tiny_artifact):
    with loaded_app(tiny_artifact, MAX_BATCH=8, **PLAIN) as app:
        yield app


def sse_events(response) -> list[tuple[str, dict]]:
    """(event line, data) of each server-sent event."""
    out = []
    for block in response.get_data(as_text=True).split("\n\n"):
        if block.strip():
            event, data = block.split("\n")
            assert event.startswith("event: ") and data.startswith("data: "), block
            out.append((event[len("event: "):], json.loads(data[len("data: "):])))
    return out


def test_a_response(client):
    r = client.post("/v1/responses", json={"input": "the quick brown fox", "temperature": 0, "metadata": {"run": "7"}})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    assert body["model"] == "run" and body["metadata"] == {"run": "7"} and body["store"] is False and body["tools"] == []
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": REPLY, "annotations": [], "logprobs": []}]
    usage = body["usage"]
    assert usage["input_tokens"] == len("the quick brown fox\n") and usage["output_tokens"] == len(REPLY)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert r.headers["X-Seed"].isdigit()


def test_input_as_messages_and_instructions_are_the_chat_transcript(client):
    """instructions is a system message before the input: the same reply as chat with those messages."""
    messages = [{"role": "user", "content": "the lazy dog."}, {"role": "assistant", "content": "the quick"},
                {"role": "user", "content": [{"type": "input_text", "text": "the quick brown "}, {"type": "input_text", "text": "fox"}]}]
    chat_messages = [{"role": "system", "content": "over the lazy dog."}, *messages[:2],
                     {"role": "user", "content": "the quick brown fox"}]
    chat = client.post("/v1/chat/completions", json={"messages": chat_messages, "temperature": 0, "max_tokens": 30}).get_json()
    # a previous response's output message, passed back as it came
    previous = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "the quick", "annotations": [], "logprobs": []}]}
    body = client.post("/v1/responses", json={"instructions": "over the lazy dog.", "input": [messages[0], previous, messages[2]],
                                              "temperature": 0, "max_output_tokens": 30}).get_json()
    assert body["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"] and body["instructions"] == "over the lazy dog."


def test_reaching_max_output_tokens_leaves_it_incomplete(client):
    body = client.post("/v1/responses", json={"input": "the quick brown fox", "temperature": 0, "max_output_tokens": 6}).get_json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["output"][0]["content"][0]["text"] == REPLY[:6]
    assert body["usage"]["output_tokens"] == 6 and body["max_output_tokens"] == 6


def test_the_stream_is_openais_event_sequence(client):
    r = client.post("/v1/responses", json={"input": "the quick brown fox", "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r)
    kinds = [kind for kind, _ in events]
    assert all(data["type"] == kind for kind, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = [data for kind, data in events if kind == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
                     *["response.output_text.delta"] * len(deltas), "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert deltas and "".join(d["delta"] for d in deltas) == REPLY
    item_id = events[2][1]["item"]["id"]
    assert all(d["item_id"] == item_id and d["output_index"] == 0 and d["content_index"] == 0 for d in deltas)
    created, completed = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert completed["id"] == created["id"] and completed["status"] == "completed"
    assert completed["output"][0]["content"][0]["text"] == REPLY and completed["output"][0]["id"] == item_id
    assert completed["usage"]["output_tokens"] == len(REPLY)
    assert dict(events)["response.output_text.done"]["text"] == REPLY


def test_a_stream_that_reaches_max_output_tokens_ends_incomplete(client):
    events = sse_events(client.post("/v1/responses", json={"input": "the quick brown fox", "temperature": 0, "stream": True,
                                                           "max_output_tokens": 4}))
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


@pytest.mark.parametrize("body, param, code", [
    ({}, "input", "missing_field"),
    ({"input": 3}, "input", "wrong_type"),
    ({"input": []}, "input", "out_of_range"),
    ({"input": "a", "tools": [{"type": "function", "name": "f"}]}, "tools", "unsupported"),
    ({"input": "a", "tool_choice": "auto"}, "tool_choice", "unsupported"),
    ({"input": "a", "previous_response_id": "resp_1"}, "previous_response_id", "unsupported"),
    ({"input": "a", "reasoning": {"effort": "low"}}, "reasoning", "unsupported"),
    ({"input": "a", "include": ["reasoning.encrypted_content"]}, "include", "unsupported"),
    ({"input": "a", "background": True}, "background", "unsupported"),
    ({"input": "a", "conversation": "conv_1"}, "conversation", "unsupported"),
    ({"input": "a", "store": True}, "store", "unsupported"),
    ({"input": "a", "store": 0}, "store", "wrong_type"),
    ({"input": "a", "text": {"format": {"type": "json_object"}}}, "text", "invalid_constraint"),
    ({"input": "a", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}, "text", "invalid_constraint"),
    ({"input": "a", "text": {"format": {"type": "json_schema", "name": "x y"}}}, "text", "invalid_value"),
    ({"input": "a", "text": {"format": {"type": "xml"}}}, "text", "wrong_type"),
    ({"input": [{"type": "function_call_output", "role": "user", "content": "a"}]}, "input", "unsupported"),
    ({"input": [{"role": "tool", "content": "a"}]}, "input", "invalid_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", "unsupported"),
    ({"input": "a", "temperature": 2.5}, "temperature", "out_of_range"),
    ({"input": "a", "max_output_tokens": 0}, "max_output_tokens", "out_of_range"),
    ({"input": "a", "seed": 1}, "seed", "unknown_field"),
])
def test_invalid_requests_are_422_naming_the_field(client, body, param, code):
    error = assert_error(client.post("/v1/responses", json=body), 422, code, param)
    if code == "invalid_constraint":  # the fixture's model has no '{': the refusal names what it lacks
        assert error["message"].startswith("text.format json_") and "'{'" in error["message"]
    if code == "unsupported" and param in ("tools", "previous_response_id", "reasoning"):
        assert param in error["message"] or "not supported" in error["message"]


def test_what_is_accepted_as_its_default(client):
    body = {"input": "the quick brown fox", "temperature": None, "top_p": None, "store": False, "tools": None,
            "text": {"format": {"type": "text"}}, "user": "u", "max_output_tokens": None}
    assert client.post("/v1/responses", json=body).status_code == 200


def test_openapi_documents_it(client):
    doc = client.get("/openapi.json").get_json()
    post = doc["paths"]["/v1/responses"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert {"200", "422"} <= set(post["responses"])
    props = doc["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert {"input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "text", "tools"} <= set(props)
