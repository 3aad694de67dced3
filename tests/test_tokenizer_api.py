"""vLLM's tokenizer endpoints at the root (service/tokenizer_api.py): /tokenizer_info, /tokenize and
/detokenize in vLLM's shapes, characters outside the vocabulary read as /v1/completions reads them,
the start token lm-eval conditions a text on, the chat template as Jinja, and the 4xx contract."""

from __future__ import annotations

import jinja2
import pytest

from service.tokenizer_api import START
from conftest import assert_error, loaded_app

PLAIN = {"CHAT_TEMPLATE": "{name}{content}\\n", "CHAT_NAMES": "system=,developer=,user=,assistant="}


@pytest.fixture(scope="module")
def app(tiny_artifact):
    with loaded_app(tiny_artifact) as app:
        yield app


@pytest.fixture
def vocab(app):
    return app.extensions["chargen"].default.engine.vocab


def test_tokenizer_info_describes_a_character_tokenizer(client, vocab):
    info = client.get("/tokenizer_info").get_json()
    assert info["tokenizer_class"] == "CharacterTokenizer" and info["chars_per_token"] == 1
    assert info["vocab_size"] == len(vocab) and info["model"] == "run"
    assert info["eos_token"] is None and info["pad_token"] is None  # a character model has no end-of-text token
    assert info["model_max_length"] is None and info["max_prompt_chars"] == 4096  # no context window; the request bound
    assert info["bos_token"] == START and info["bos_token_id"] == len(vocab) and info["bos_token_reads_as"] == "\n"
    assert "replaced" in info["unknown_characters"] and "dropped" in info["unknown_characters"]


def test_tokenize_reads_as_completions_read(client, vocab):
    text = "thé\r\nqu€ick"
    body = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False, "return_token_strs": True}).get_json()
    assert body["tokens"] == vocab.encode(text).ids.tolist() and body["count"] == len(body["tokens"]) == 9
    assert body["token_strs"] == list("the\nquick") and body["max_model_len"] == 4096
    assert body["replaced"] == [{"offset": 2, "char": "é", "as": "e"}]
    assert body["dropped"] == [{"offset": 7, "char": "€"}]
    # the same count of characters that /v1/completions scores with echo: one logprob per token
    echo = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1}).get_json()
    assert echo["choices"][0]["logprobs"]["tokens"] == body["token_strs"]
    assert client.post("/tokenize", json={"prompt": text}).get_json()["tokens"] == body["tokens"]  # add_special_tokens: nothing added
    assert "token_strs" not in client.post("/tokenize", json={"prompt": "the"}).get_json()


def test_detokenize_gives_the_text_back(client, vocab):
    ids = client.post("/tokenize", json={"prompt": "the lazy dog"}).get_json()["tokens"]
    assert client.post("/detokenize", json={"tokens": ids}).get_json() == {"prompt": "the lazy dog", "dropped": []}
    body = client.post("/detokenize", json={"tokens": [ids[0], 10**6, ids[1]]}).get_json()
    assert body == {"prompt": "th", "dropped": [{"index": 1, "id": 10**6}]}


def test_the_start_token(client, vocab):
    """lm-eval asks for bos_token's id and puts it before a text it scores from the start: the id is
    the one after the vocabulary's, and it reads as the newline an empty prompt starts after."""
    start = client.post("/tokenize", json={"prompt": START, "add_special_tokens": False, "return_token_strs": True}).get_json()
    assert start["tokens"] == [len(vocab)] and start["token_strs"] == [START]
    ids = client.post("/tokenize", json={"prompt": "the"}).get_json()["tokens"]
    assert client.post("/detokenize", json={"tokens": [len(vocab), *ids]}).get_json()["prompt"] == "\nthe"
    # inside a text, its characters are read as /v1/completions reads them
    inside = client.post("/tokenize", json={"prompt": "a" + START}).get_json()
    assert inside["tokens"] == vocab.encode("a" + START).ids.tolist()


def test_the_chat_template_as_jinja_writes_the_transcript():
    from service.chat import ChatTemplate
    from service.config import CHAT_NAMES, CHAT_TEMPLATE, chat_names
    from service.tokenizer_api import jinja_chat_template

    for template, names in ((CHAT_TEMPLATE, CHAT_NAMES), ("<{name}> {content}\n", "user=ROMEO, assistant=JULIET")):
        chat = ChatTemplate(template, chat_names(names), 10_000)
        messages = [("system", "Be brief.", None), ("user", 'Who "goes" {{ there }}?', None), ("assistant", "A friend.", None),
                    ("user", "Stand.", "BARNARDO")]
        rendered = jinja2.Environment().from_string(jinja_chat_template(chat)).render(
            messages=[{"role": r, "content": c, **({"name": n} if n else {})} for r, c, n in messages], add_generation_prompt=True)
        assert rendered == chat.render(messages).text


def test_tokenizer_info_names_the_chat_template(tiny_artifact):
    with loaded_app(tiny_artifact, **PLAIN) as app:
        info = app.test_client().get("/tokenizer_info").get_json()
    rendered = jinja2.Environment().from_string(info["chat_template"]).render(
        messages=[{"role": "user", "content": "the quick"}], add_generation_prompt=True)
    assert rendered == "the quick\n"


@pytest.mark.parametrize("path, body, param, code", [
    ("/tokenize", {}, "prompt", "missing_field"),
    ("/tokenize", {"prompt": 3}, "prompt", "wrong_type"),
    ("/tokenize", {"prompt": "a" * 4097}, "prompt", "out_of_range"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens", "wrong_type"),
    ("/tokenize", {"prompt": "a", "messages": []}, "messages", "unknown_field"),
    ("/detokenize", {}, "tokens", "missing_field"),
    ("/detokenize", {"tokens": [-1]}, "tokens", "out_of_range"),
    ("/detokenize", {"tokens": ["a"]}, "tokens", "wrong_type"),
    ("/detokenize", {"tokens": [1.5]}, "tokens", "wrong_type"),
])
def test_invalid_requests_are_422_naming_the_field(client, path, body, param, code):
    assert_error(client.post(path, json=body), 422, code, param)


def test_the_4xx_contract(client):
    assert_error(client.post("/tokenize", json={"prompt": "a", "model": "nope"}), 404, "model_not_found", "model")
    assert_error(client.get("/tokenizer_info?model=nope"), 404, "model_not_found", "model")
    assert_error(client.post("/tokenize", data="the", content_type="text/plain"), 415, "unsupported_media_type")
    assert client.post("/detokenize", json={"tokens": [0], "model": "run"}).status_code == 200


def test_the_api_key_guards_them(tiny_artifact):
    with loaded_app(tiny_artifact, API_KEY="sesame") as app:
        client = app.test_client()
        assert_error(client.get("/tokenizer_info"), 401, "invalid_api_key")
        assert_error(client.post("/tokenize", json={"prompt": "a"}), 401, "invalid_api_key")
        ok = client.post("/tokenize", json={"prompt": "a"}, headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200


def test_openapi_documents_them(client):
    doc = client.get("/openapi.json").get_json()
    assert {"/tokenizer_info", "/tokenize", "/detokenize"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert set(schemas["RootTokenizeRequest"]["properties"]) == {"model", "prompt", "add_special_tokens", "return_token_strs"}
    assert schemas["RootDetokenizeRequest"]["required"] == ["tokens"]
    assert "422" in doc["paths"]["/tokenize"]["post"]["responses"]
