"""vLLM's tokenizer endpoints at the server root: GET /tokenizer_info, POST /tokenize, POST /detokenize.

Clients written for vLLM ask the server for its tokenizer instead of downloading one: above all
lm-evaluation-harness with `tokenizer_backend=remote`, which needs token counts to split a
log-likelihood request into context and continuation. Here one token is one character of the
model's vocabulary, read by the prompt's rule (service/api.py `reading`: the rule /v1/completions
follows), so the ids /tokenize gives line up one to one with the characters /v1/completions scores
with echo. The native /v1/tokenize and /v1/detokenize are unchanged; these take vLLM's shapes.

The start: a character model has no end-of-text or padding token, but it has a start, the state an
empty prompt begins in (after a newline; engine.start_id). lm-eval conditions the first character of
a text on the tokenizer's bos_token (its prefix token), so /tokenizer_info names one: START, a
special token with the id after the vocabulary's (a newline may well be id 0, which lm-eval reads
as "no token"), which /detokenize writes as the start's character, so that the text lm-eval sends
to /v1/completions begins in the start state and the first character is scored from there. Like a
Hugging Face tokenizer's special tokens, /tokenize gives its id when asked for the token itself;
inside a longer text its characters are read as /v1/completions reads them (so ids keep lining up).
"""

from __future__ import annotations

import json

from flask import Blueprint, jsonify, request

from service.api import Reading, authorize, reading, state
from service.chat import ChatTemplate
from service.openai_api import chat_template
from service.reading import read_json

bp = Blueprint("tokenizer", __name__)  # at the root, where vLLM has them
bp.before_request(authorize)

START = "<|start|>"
UNKNOWN_CHARACTERS = ("read as the prompts of /v1/completions are: replaced by their unaccented base form when the "
                      "vocabulary has it (listed in replaced), otherwise dropped (listed in dropped); \\r\\n and \\r "
                      "become \\n")


def jinja_chat_template(template: ChatTemplate) -> str:
    """The chat template as Jinja (what vLLM's clients render): the same layout as service/chat.py
    writes, one message after another and the assistant's opening; a message's name replaces its
    role's. (The server's cut of a transcript longer than CHARGEN_MAX_TRANSCRIPT_CHARS is not in it.)"""
    def text(piece: str) -> str:  # literal text, with {name} where the speaker's name goes
        return "{{ name }}".join("{{ " + json.dumps(part) + " }}" if part else "" for part in piece.split("{name}"))

    before, after = template.template.split("{content}")
    names = "{" + ", ".join(f"{json.dumps(role)}: {json.dumps(name)}" for role, name in template.names.items()) + "}"
    return ("{% set names = " + names + " %}"
            "{% for message in messages %}{% set name = message.name or names[message.role] %}"
            + text(before) + "{{ message.content }}" + text(after) + "{% endfor %}"
            "{% if add_generation_prompt %}{% set name = names['assistant'] %}" + text(before) + "{% endif %}")


@bp.get("/tokenizer_info")
def tokenizer_info():
    """What vLLM's /tokenizer_info gives (the tokenizer's configuration), for a character model."""
    st = state()
    served = st.served(request.args.get("model"))
    served.require_ready()
    engine = served.engine
    return jsonify({
        "tokenizer_class": "CharacterTokenizer", "model": served.name, "vocab_size": len(engine.vocab),
        "chars_per_token": 1,  # each token is one character of the vocabulary
        "bos_token": START, "bos_token_id": len(engine.vocab), "bos_token_reads_as": engine.vocab.chars[engine.start_id],
        "eos_token": None, "pad_token": None, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": None,  # a recurrent network has no context window: its state carries everything read
        "max_prompt_chars": st.settings.max_prompt_chars,
        "chat_template": jinja_chat_template(chat_template(served)),
        "unknown_characters": UNKNOWN_CHARACTERS,
    })


@bp.post("/tokenize")
def tokenize():
    st = state()
    req = read_json(st.schemas.root_tokenize)
    served = st.served(req.model)
    served.require_ready()
    vocab = served.engine.vocab
    if req.prompt == START:
        read = Reading([len(vocab)], [0], [], [])
    else:
        read = reading(req.prompt, vocab)
    body = {"count": len(read.ids), "max_model_len": st.settings.max_prompt_chars, "tokens": read.ids}
    if req.return_token_strs:
        body["token_strs"] = [_token_str(i, vocab) for i in read.ids]
    body["replaced"] = [{"offset": o, "char": c, "as": a} for o, c, a in read.replaced]
    body["dropped"] = [{"offset": o, "char": c} for o, c in read.dropped]
    return jsonify(body)


@bp.post("/detokenize")
def detokenize():
    st = state()
    req = read_json(st.schemas.root_detokenize)
    served = st.served(req.model)
    served.require_ready()
    engine = served.engine
    chars = [*engine.vocab.chars, engine.vocab.chars[engine.start_id]]  # the start token reads as the start's character
    return jsonify({"prompt": "".join(chars[i] for i in req.tokens if i < len(chars)),
                    "dropped": [{"index": k, "id": i} for k, i in enumerate(req.tokens) if i >= len(chars)]})


def _token_str(i: int, vocab) -> str:
    return START if i == len(vocab) else vocab.chars[i]
