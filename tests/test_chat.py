"""POST /v1/chat/completions: messages written into a transcript by the chat template
(service/chat.py), the reply up to where the next message would begin, OpenAI's shapes streamed and
not, the unsupported fields refused by name, and the official openai client against real gunicorn.
(response_format's json_object and json_schema: tests/test_structured_api.py.)"""

from __future__ import annotations

import pytest

from server import REQUEST_TIMEOUT, running_server
from service.chat import ChatTemplate
from service.config import CHAT_NAMES, CHAT_TEMPLATE, Settings, chat_names
from conftest import assert_error, events, loaded_app

# The tiny model knows lowercase text only: a template it can continue, speakers without names.
PLAIN = {"CHAT_TEMPLATE": "{name}{content}\\n", "CHAT_NAMES": "system=,developer=,user=,assistant="}
ASK = [{"role": "user", "content": "the quick brown fox"}]
REPLY = " jumps over the lazy dog."  # what greedy sampling of the tiny model gives after "the quick brown fox\n"


@pytest.fixture(scope="module")
def app(tiny_artifact):
    with loaded_app(tiny_artifact, MAX_N=4, MAX_BATCH=16, **PLAIN) as app:
        yield app


# ---------------------------------------------------------------- the transcript


def test_the_default_template_writes_a_play():
    template = ChatTemplate(CHAT_TEMPLATE, chat_names(CHAT_NAMES), 10_000)
    transcript = template.render([("system", "Be brief.", None), ("user", "Who goes there?\r\nSpeak.", None),
                                  ("assistant", "A friend.", None), ("user", "Stand.", "BARNARDO")])
    assert transcript.text == ("SYSTEM:\nBe brief.\n\nUSER:\nWho goes there?\nSpeak.\n\nASSISTANT:\nA friend.\n\n"
                               "BARNARDO:\nStand.\n\nASSISTANT:\n")
    assert template.stop == "\n\n"  # where the next speaker would begin
    ends = [transcript.text.index(t) + len(t) for t in ("Be brief.\n\n", "Speak.\n\n", "A friend.\n\n", "Stand.\n\n")]
    assert transcript.cache_at == tuple(ends) and transcript.cut == 0


def test_other_templates_and_names():
    template = ChatTemplate("<{name}> {content}\n", chat_names("user=ROMEO, assistant=JULIET"), 10_000)
    transcript = template.render([("user", "Hi", None)])
    assert transcript.text == "<ROMEO> Hi\n<JULIET> " and template.stop == "\n<"
    assert Settings.from_mapping({"CHAT_TEMPLATE": "{name}: {content}\\n"}).chat_template == "{name}: {content}\n"
    assert ChatTemplate("{content}\n", chat_names(""), 100).stop == "\n"


def test_a_transcript_too_long_keeps_its_end():
    template = ChatTemplate(CHAT_TEMPLATE, chat_names(CHAT_NAMES), 40)
    transcript = template.render([("user", "a" * 30, None), ("assistant", "b" * 10, None), ("user", "c" * 5, None)])
    assert len(transcript.text) == 40 and transcript.text.endswith("c" * 5 + "\n\nASSISTANT:\n") and transcript.cut > 0
    assert all(0 < at < 40 for at in transcript.cache_at) and len(transcript.cache_at) == 2  # the first turn's end was cut


# ---------------------------------------------------------------- answers


def test_a_chat_completion(client):
    r = client.post("/v1/chat/completions", json={"model": "run", "messages": ASK, "temperature": 0, "max_tokens": 100})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "run"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": REPLY, "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]  # it stopped where the next message would begin
    assert body["usage"] == {"prompt_tokens": len("the quick brown fox\n"), "completion_tokens": len(REPLY),
                             "total_tokens": len("the quick brown fox\n") + len(REPLY)}
    # max_completion_tokens before max_tokens; text parts are joined
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "text", "text": "the quick "},
                                                                                           {"type": "text", "text": "brown fox"}]}],
                                                  "temperature": 0, "max_tokens": 100, "max_completion_tokens": 6})
    assert r.get_json()["choices"][0]["message"]["content"] == REPLY[:6]


def test_n_seed_and_stop(client):
    ask = {"messages": ASK, "temperature": 2.0, "max_tokens": 40, "n": 3, "seed": 7}
    first, again = (client.post("/v1/chat/completions", json=ask).get_json() for _ in range(2))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]] and len(set(texts)) > 1
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    one = client.post("/v1/chat/completions", json={**ask, "n": 1, "seed": 8}).get_json()["choices"][0]["message"]["content"]
    assert one == texts[1]  # choice i uses seed + i
    stopped = client.post("/v1/chat/completions", json={"messages": ASK, "temperature": 0, "stop": ["lazy"]}).get_json()
    assert stopped["choices"][0]["message"]["content"] == " jumps over the " and stopped["choices"][0]["finish_reason"] == "stop"


def test_logprobs_in_chats_shape(client):
    body = client.post("/v1/chat/completions", json={"messages": ASK, "temperature": 0, "max_tokens": 5, "logprobs": True,
                                                     "top_logprobs": 2}).get_json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == list(REPLY[:5]) and body["choices"][0]["logprobs"]["refusal"] is None
    for c in content:
        assert c["bytes"] == list(c["token"].encode()) and c["logprob"] <= 0
        assert len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["token"] == c["token"]  # greedy: the likeliest
        assert set(c["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    only = client.post("/v1/chat/completions", json={"messages": ASK, "temperature": 0, "max_tokens": 5, "logprobs": True}).get_json()
    assert all(c["top_logprobs"] == [] for c in only["choices"][0]["logprobs"]["content"])


def test_streamed_as_openai_streams_chat(client):
    ask = {"messages": ASK, "temperature": 0, "max_tokens": 100, "stream": True, "n": 2}
    got = events(client.post("/v1/chat/completions", json=ask))
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)  # no usage unless asked for
    for k in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == k]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == REPLY
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "stop"
    with_usage = events(client.post("/v1/chat/completions", json={**ask, "stream_options": {"include_usage": True}}))
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 2 * len(REPLY)
    assert all(c["usage"] is None for c in with_usage[:-2])  # OpenAI: every other chunk has usage: null


@pytest.mark.parametrize("fields, param, code, says", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported", "calls no tools"),
    ({"tool_choice": "auto"}, "tool_choice", "unsupported", "calls no tools"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported", "not supported"),
    ({"response_format": {"type": "xml"}}, "response_format", "wrong_type", "tag 'xml'"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported", "audio"),
    ({"modalities": ["text", "audio"]}, "modalities", "out_of_range", "modalities"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages", "unsupported", "'image_url' are not supported"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages", "unsupported", "role 'tool'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}]}, "messages",
     "unsupported", "tool_calls is not supported in a message"),
    ({"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a1"}}]}, "messages", "unsupported", "audio"),
    ({"messages": [{"role": "assistant", "content": "x", "reasoning": "hm"}]}, "messages", "unknown_field", "messages.0.reasoning"),
    ({"messages": []}, "messages", "out_of_range", "messages"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value", "needs logprobs"),
    ({"max_tokens": 0}, "max_tokens", "out_of_range", "max_tokens"),
    ({"temprature": 1}, "temprature", "unknown_field", "temprature"),
    ({"store": True}, "store", "unsupported", "stores no completions"),
])
def test_what_chat_cannot_do_is_a_422_naming_it(client, fields, param, code, says):
    error = assert_error(client.post("/v1/chat/completions", json={"messages": ASK, **fields}), 422, code, param)
    assert says in error["message"], error["message"]


def test_a_reply_sent_back_as_openais_client_sends_it_is_part_of_the_transcript(client):
    # messages.append(reply.choices[0].message): the client's model_dump() of the server's own message
    first = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, "temperature": 0}).get_json()
    reply = first["choices"][0]["message"]
    assert "refusal" in reply
    dumped = {**reply, "annotations": None, "audio": None, "function_call": None, "tool_calls": None}
    with_reply = ASK + [dumped, {"role": "user", "content": "again"}]
    as_text = ASK + [{"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "again"}]
    answers = [client.post("/v1/chat/completions", json={"messages": m, "max_tokens": 20, "temperature": 0}) for m in (with_reply, as_text)]
    assert [a.status_code for a in answers] == [200, 200], answers[0].get_json()
    assert answers[0].get_json()["choices"][0]["message"] == answers[1].get_json()["choices"][0]["message"]
    assert answers[0].get_json()["usage"] == answers[1].get_json()["usage"]


def test_the_accepted_neutral_values(client):
    r = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 3, "response_format": {"type": "text"},
                                                  "modalities": ["text"], "tools": None, "user": "u", "store": False,
                                                  "temperature": None, "presence_penalty": None, "logprobs": None})
    assert r.status_code == 200, r.get_json()


# ---------------------------------------------------------------- the official openai client, real gunicorn


@pytest.mark.slow
def test_the_openai_client_chats_streamed_and_not(tiny_artifact):
    openai = pytest.importorskip("openai")
    with running_server(tiny_artifact, env={f"CHARGEN_{k}": v for k, v in PLAIN.items()}) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", timeout=REQUEST_TIMEOUT, max_retries=0)
        reply = client.chat.completions.create(model="run", messages=ASK, temperature=0, max_completion_tokens=100)
        assert reply.choices[0].message.content == REPLY and reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == len(REPLY)
        stream = client.chat.completions.create(model="run", messages=ASK, temperature=0, max_tokens=100, stream=True,
                                                stream_options={"include_usage": True}, logprobs=True, top_logprobs=1)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens and chunks[-1].choices == []
        tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        assert "".join(tokens) == REPLY
        with pytest.raises(openai.UnprocessableEntityError, match="calls no tools"):
            client.chat.completions.create(model="run", messages=ASK, tools=[{"type": "function", "function": {"name": "f"}}])
