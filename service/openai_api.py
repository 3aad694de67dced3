"""OpenAI's completions API over the one pipeline (service/api.py): /v1/completions and /v1/models.

Only the adaptation lives here: how a CompletionRequest maps onto a Generation (one token is one
character; several prompts x n choices), and the shapes of OpenAI's answers, chunks and model cards.
"""

from __future__ import annotations

import secrets
import time
from typing import Iterator

from flask import Blueprint, jsonify

from service.api import Generation, Result, authorize, require_ready, sse, state
from service.errors import ApiError, bad_field
from service.reading import read_json
from service.scheduler import Chunk

bp = Blueprint("openai", __name__, url_prefix="/v1")
bp.before_request(authorize)


@bp.post("/completions")
def completions():
    st = state()
    req = read_json(st.schemas.completion)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) * req.n > st.settings.max_n:
        raise bad_field("n", f"{len(prompts)} prompts x n={req.n} is more than the {st.settings.max_n} choices a request "
                             "may have (CHARGEN_MAX_N)", "out_of_range")
    if req.echo and req.logprobs:
        raise bad_field("echo", "echo with logprobs is not supported (the prompt's characters are not scored)", "unsupported")
    gen = Generation(prompts, req.n, max_chars=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                     top_p=req.top_p, seed=req.seed, stop=req.stop, logprobs=req.logprobs or 0, stream=bool(req.stream))
    head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()), "model": gen.model}
    echo = [prompt if req.echo else "" for prompt in prompts for _ in range(req.n)]
    headers = {"X-Seed": str(gen.seed)}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return gen.respond(_events(gen, head, echo, include_usage), "text/event-stream", headers)
    result = gen.result()
    choices = [{"text": echo[k] + c.text, "index": k, "logprobs": _logprobs(c.logprobs, 0) if gen.logprobs else None,
                "finish_reason": c.finish_reason} for k, c in enumerate(result.choices)]
    return jsonify({**head, "choices": choices, "usage": _usage(result)}), 200, headers


def _events(gen: Generation, head: dict, echo: list[str], include_usage: bool) -> Iterator[bytes]:
    def chunk(index: int, text: str, logprobs=None, finish_reason=None) -> bytes:
        return sse({**head, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}]})

    for k, text in enumerate(echo):
        if text:
            yield chunk(k, text)
    offsets = [0] * len(echo)  # text_offset counts the completion's characters only
    for item in gen.run():
        if isinstance(item, Chunk):
            yield chunk(item.index, item.text, _logprobs(item.logprobs, offsets[item.index]) if gen.logprobs else None)
            offsets[item.index] += len(item.text)
        else:
            for k, c in enumerate(item.choices):
                yield chunk(k, "", None, c.finish_reason)
            if include_usage:
                yield sse({**head, "choices": [], "usage": _usage(item)})
            yield sse("[DONE]")


def _usage(result: Result) -> dict:
    prompt, completion = result.usage["prompt_chars"], result.usage["completion_chars"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(lps: list, offset: int) -> dict:
    offsets, at = [], offset
    for lp in lps:
        offsets.append(at)
        at += len(lp.char)
    return {"tokens": [lp.char for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": offsets}


# ---------------------------------------------------------------- /v1/models


@bp.get("/models")
def models():
    require_ready()
    return jsonify({"object": "list", "data": [_model_card()]})


@bp.get("/models/<path:model_id>")
def model(model_id: str):
    require_ready()
    name = state().settings.name
    if model_id != name:
        raise ApiError(404, f"no model {model_id!r}; this server serves {name!r}", param="model", code="model_not_found")
    return jsonify(_model_card())


def _model_card() -> dict:
    st = state()
    return {"id": st.settings.name, "object": "model", "created": st.model_created(), "owned_by": "chargen"}
