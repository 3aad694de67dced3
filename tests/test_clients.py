"""The client matrix (README "Clients"): the clients people already use, unmodified, against real
gunicorn and a tiny model, on loopback and offline. One test per row: the official openai client
(completions, chat completions, the Responses API), langchain-openai (ChatOpenAI on chat
completions and on the Responses API, OpenAI on completions), litellm (`openai/` and
`text-completion-openai/` models, and its responses()); lm-evaluation-harness is tests/test_lm_eval.py.

Greedy sampling makes the answers exact: the tiny model continues its periodic text, and with a
chat template of bare lines (PLAIN) its reply to "the quick brown fox" is the rest of that line."""

from __future__ import annotations

import os

import pytest

from server import REQUEST_TIMEOUT, continuation, running_server

pytestmark = pytest.mark.slow

# litellm reads its model cost map from GitHub at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PLAIN = {"CHAT_TEMPLATE": "{name}{content}\\n", "CHAT_NAMES": "system=,developer=,user=,assistant="}
ASK = "the quick brown fox"
REPLY = " jumps over the lazy dog."  # greedy after "the quick brown fox\n": the reply ends at the next line
PROMPT = "the quick brown"
CHARS = 30


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with running_server(tiny_artifact, env={f"CHARGEN_{k}": v for k, v in PLAIN.items()}) as server:
        yield server


@pytest.fixture(scope="module")
def api(server) -> str:
    return server.url + "/v1"


@pytest.fixture(scope="module")
def openai_client(api):
    from openai import OpenAI

    return OpenAI(base_url=api, api_key="none", timeout=REQUEST_TIMEOUT, max_retries=0)


# ---------------------------------------------------------------- openai


def test_openai_completions(openai_client):
    done = openai_client.completions.create(model="run", prompt=PROMPT, max_tokens=CHARS, temperature=0)
    assert done.choices[0].text == continuation(PROMPT, CHARS) and done.choices[0].finish_reason == "length"
    streamed = openai_client.completions.create(model="run", prompt=PROMPT, max_tokens=CHARS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == continuation(PROMPT, CHARS)
    # echo scoring, as evaluation harnesses use it: the prompt's logprobs are /v1/score's
    scored = openai_client.completions.create(model="run", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert logprobs.tokens == list(PROMPT) and logprobs.token_logprobs[0] is None
    assert -sum(logprobs.token_logprobs[1:]) == pytest.approx(
        openai_client.post("/score", body={"text": PROMPT}, cast_to=object)["nats_per_char"] * (len(PROMPT) - 1))


def test_openai_chat_completions(openai_client):
    messages = [{"role": "user", "content": ASK}]
    done = openai_client.chat.completions.create(model="run", messages=messages, temperature=0, max_tokens=60)
    assert done.choices[0].message.content == REPLY and done.choices[0].finish_reason == "stop"
    streamed = openai_client.chat.completions.create(model="run", messages=messages, temperature=0, max_tokens=60, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage.completion_tokens == len(REPLY)
    # the usual way on: the reply's message appended as it came (the client sends its fields, nulls included)
    for reply in (done.choices[0].message, done.choices[0].message.model_dump()):
        again = openai_client.chat.completions.create(model="run", messages=messages + [reply, {"role": "user", "content": ASK}],
                                                      temperature=0, max_tokens=10)
        assert again.choices[0].finish_reason in ("stop", "length") and again.usage.prompt_tokens > done.usage.prompt_tokens


def test_openai_responses(openai_client):
    import openai

    done = openai_client.responses.create(model="run", input=ASK, temperature=0, max_output_tokens=60)
    assert done.output_text == REPLY and done.status == "completed" and done.usage.output_tokens == len(REPLY)
    done = openai_client.responses.create(model="run", instructions="over the lazy dog.", temperature=0,
                                          input=[{"role": "user", "content": "the lazy dog."}, {"role": "user", "content": ASK}])
    assert done.output_text == REPLY
    events = list(openai_client.responses.create(model="run", input=ASK, temperature=0, max_output_tokens=60, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert events[-1].response.output_text == REPLY and events[-1].response.usage.total_tokens > len(REPLY)
    with openai_client.responses.stream(model="run", input=ASK, temperature=0, max_output_tokens=60) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        assert "".join(deltas) == REPLY and stream.get_final_response().output_text == REPLY
    for output in (done.output, [item.model_dump() for item in done.output]):  # a previous output passed back
        again = openai_client.responses.create(model="run", input=[{"role": "user", "content": ASK}, *output], temperature=0,
                                               max_output_tokens=10)
        assert again.status in ("completed", "incomplete") and again.usage.input_tokens > len(ASK) + len(REPLY)
    short = openai_client.responses.create(model="run", input=ASK, temperature=0, max_output_tokens=5)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens" and short.output_text == REPLY[:5]
    with pytest.raises(openai.UnprocessableEntityError, match="tools"):
        openai_client.responses.create(model="run", input=ASK, tools=[{"type": "web_search"}])


# ---------------------------------------------------------------- langchain-openai


def test_langchain_chat_openai(api):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=api, api_key="none", model="run", temperature=0, max_tokens=60, timeout=REQUEST_TIMEOUT, max_retries=0)
    assert llm.invoke(ASK).content == REPLY
    assert "".join(chunk.content for chunk in llm.stream(ASK)) == REPLY


def test_langchain_chat_openai_on_the_responses_api(api):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=api, api_key="none", model="run", temperature=0, max_tokens=60, timeout=REQUEST_TIMEOUT, max_retries=0,
                     use_responses_api=True)
    assert llm.invoke(ASK).text == REPLY
    assert "".join(chunk.text for chunk in llm.stream(ASK)) == REPLY


def test_langchain_openai_completions(api):
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=api, api_key="none", model="run", temperature=0, max_tokens=CHARS, timeout=REQUEST_TIMEOUT, max_retries=0)
    assert llm.invoke(PROMPT) == continuation(PROMPT, CHARS)
    assert "".join(llm.stream(PROMPT)) == continuation(PROMPT, CHARS)


# ---------------------------------------------------------------- litellm


def test_litellm_openai_chat(api):
    import litellm

    ask = dict(model="openai/run", api_base=api, api_key="none", messages=[{"role": "user", "content": ASK}], temperature=0,
               max_tokens=60, timeout=REQUEST_TIMEOUT)
    assert litellm.completion(**ask).choices[0].message.content == REPLY
    assert "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(**ask, stream=True)) == REPLY


def test_litellm_text_completion_openai(api):
    import litellm

    done = litellm.completion(model="text-completion-openai/run", api_base=api, api_key="none", temperature=0, max_tokens=CHARS,
                              messages=[{"role": "user", "content": PROMPT}], timeout=REQUEST_TIMEOUT)
    assert done.choices[0].message.content == continuation(PROMPT, CHARS)


def test_litellm_responses(api):
    import litellm

    done = litellm.responses(model="openai/run", api_base=api, api_key="none", input=ASK, temperature=0, max_output_tokens=60,
                             timeout=REQUEST_TIMEOUT)
    assert done.output[0].content[0].text == REPLY
