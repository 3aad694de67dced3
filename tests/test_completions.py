"""OpenAI's completions details and the sampling controls through every generation endpoint:
best_of, stream_options.include_usage exactly as OpenAI's reference has it, and the penalties,
min_p and logit_bias reaching the engine's sampler."""

from __future__ import annotations

import numpy as np
import pytest

from model.runtime.artifact import load
from model.runtime.engine import Engine, GenerationRequest
from model.runtime.sampling import SamplingSettings
from conftest import events, loaded_app

CONTROLS = {"presence_penalty": 0.6, "frequency_penalty": 0.3, "repetition_penalty": 1.3, "repetition_window": 32,
            "min_p": 0.05, "logit_bias": {"e": -2.0}}


@pytest.fixture(scope="module")
def app(tiny_artifact):
    with loaded_app(tiny_artifact, MAX_N=8, MAX_BATCH=16) as app:
        yield app


def test_best_of_returns_the_n_candidates_with_the_highest_mean_logprob(client):
    ask = {"prompt": "the", "max_tokens": 30, "temperature": 2.0, "seed": 40}
    every = client.post("/v1/completions", json={**ask, "n": 5, "logprobs": 1}).get_json()["choices"]  # the candidates: seeds 40..44
    means = [np.mean(c["logprobs"]["token_logprobs"]) for c in every]
    assert len(set(np.round(means, 6))) == 5
    best = client.post("/v1/completions", json={**ask, "n": 2, "best_of": 5}).get_json()
    ranked = sorted(range(5), key=lambda k: -means[k])
    assert [c["text"] for c in best["choices"]] == [every[k]["text"] for k in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert best["usage"]["completion_tokens"] == 5 * 30  # every candidate was generated
    with_logprobs = client.post("/v1/completions", json={**ask, "n": 1, "best_of": 5, "logprobs": 1}).get_json()["choices"][0]
    assert with_logprobs["logprobs"]["token_logprobs"] == every[ranked[0]]["logprobs"]["token_logprobs"]
    same = client.post("/v1/completions", json={**ask, "n": 2, "best_of": 2}).get_json()["choices"]
    assert [c["text"] for c in same] == [c["text"] for c in every[:2]]  # best_of = n: every choice, in order
    two = client.post("/v1/completions", json={**ask, "prompt": ["the", "over"], "n": 1, "best_of": 3}).get_json()["choices"]
    assert len(two) == 2 and two[0]["text"] in [c["text"] for c in every[:3]]


def test_include_usage_as_openai_specifies(client):
    ask = {"prompt": "the quick", "max_tokens": 20, "temperature": 0, "stream": True, "n": 2}
    plain = events(client.post("/v1/completions", json=ask))
    assert plain[-1] == "[DONE]" and all("usage" not in c for c in plain[:-1])  # not asked: no usage field at all
    asked = events(client.post("/v1/completions", json={**ask, "stream_options": {"include_usage": True}}))
    *chunks, last, done = asked
    assert done == "[DONE]" and last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49}
    assert chunks and all(c["usage"] is None for c in chunks)  # every other chunk: usage null
    off = events(client.post("/v1/completions", json={**ask, "stream_options": {"include_usage": False}}))
    assert all("usage" not in c for c in off[:-1])
    whole = client.post("/v1/completions", json={**ask, "stream": False, "stream_options": {"include_usage": True}}).get_json()
    assert whole["usage"]["completion_tokens"] == 40  # not streamed: the usage is in the answer as always


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions", "/v1/chat/completions"])
def test_the_sampling_controls_reach_the_engine(client, tiny_artifact, path):
    """The same text as the engine gives for the same settings, on every endpoint; the same seed
    and settings give the same text; the controls change it."""
    prompt = "the quick brown"
    if path == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 80}
        transcript = "USER:\n" + prompt + "\n\nASSISTANT:\n"  # the default template (its capitals are outside the vocabulary)
    else:
        body = {"prompt": prompt, "max_chars" if path == "/v1/generate" else "max_tokens": 80}
        transcript = prompt
    ask = {**body, "temperature": 0.9, "seed": 5, **CONTROLS}

    def text(**fields):
        r = client.post(path, json={**ask, **fields})
        assert r.status_code == 200, r.get_json()
        choice = r.get_json()["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]

    engine = Engine(load(tiny_artifact))
    settings = SamplingSettings(0.9, presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.3, repetition_window=32,
                                min_p=0.05, logit_bias=((engine.vocab.index["e"], -2.0),))
    stop = ("\n\n",) if "chat" in path else ()
    want = engine.generate(GenerationRequest(transcript, max_chars=80, sampling=settings, seed=5, stop=stop)).text
    assert text() == want == text()
    assert text(presence_penalty=0, frequency_penalty=0, repetition_penalty=1, min_p=0, logit_bias={}) != want
    greedy = text(temperature=0, presence_penalty=0, frequency_penalty=0, repetition_penalty=1, min_p=0, logit_bias={})
    assert text(temperature=0, presence_penalty=0, frequency_penalty=0, min_p=0, logit_bias={}, repetition_penalty=10.0,
                repetition_window=8) != greedy
