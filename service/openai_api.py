"""OpenAI's API over the one pipeline (service/api.py): /v1/completions, /v1/chat/completions and
/v1/models.

Only the adaptation lives here: how a request maps onto a Generation (one token is one character;
several prompts x n choices; a chat's messages written into a transcript, service/chat.py), and the
shapes of OpenAI's answers, chunks and model cards. With stream_options.include_usage a stream
ends with a chunk holding the usage (choices empty) and every other chunk has "usage": null, as
OpenAI's reference says; without it no chunk has a usage field. A choice of a constrained request
(grammar, json_schema, response_format) has `incomplete` beside its finish_reason, in the answer and
in the stream's chunk that carries the finish_reason.
"""

from __future__ import annotations

import secrets
import time
from typing import Callable, Iterator

from flask import Blueprint, jsonify

from service.api import Choice, Generation, Result, authorize, constraint_for, incomplete, reading, require_ready, sampling_of, sse, state
from service.chat import ChatTemplate
from service.reading import read_json
from service.scheduler import Chunk

bp = Blueprint("openai", __name__, url_prefix="/v1")
bp.before_request(authorize)


def _usage(result: Result) -> dict:
    prompt, completion = result.usage["prompt_chars"], result.usage["completion_chars"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _include_usage(req) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _ending(result: Result, head: dict, include_usage: bool, finished: Callable[[int, Choice], bytes]) -> Iterator[bytes]:
    """How an OpenAI stream ends: a chunk with each choice's finish_reason (`finished` writes it in
    the endpoint's shape), the usage when the request asked for it, then [DONE]."""
    for k, c in enumerate(result.choices):
        yield finished(k, c)
    if include_usage:
        yield sse({**head, "choices": [], "usage": _usage(result)})
    yield sse("[DONE]")


# ---------------------------------------------------------------- /v1/completions


@bp.post("/completions")
def completions():
    st = state()
    req = read_json(st.schemas.completion)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    served = st.served(req.model)
    logprobs = req.logprobs or 0
    gen = Generation(prompts, req.n, served=served, max_chars=req.max_tokens, sampling=sampling_of(req, served),
                     seed=req.seed, stop=req.stop, logprobs=logprobs, stream=bool(req.stream),
                     prompt_logprobs=logprobs if req.echo and logprobs else None, best_of=req.best_of,
                     constraint=constraint_for(req, served))
    head = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()), "model": gen.model}
    echo = [prompt if req.echo else "" for prompt in prompts for _ in range(req.n)]
    headers = {"X-Seed": str(gen.seed)}
    if req.stream:
        return gen.respond(_events(gen, head, echo, _include_usage(req)), "text/event-stream", headers)
    result = gen.result()
    choices = [{"text": echo[k] + c.text, "index": k, "logprobs": _choice_logprobs(gen, echo[k], c) if gen.logprobs else None,
                "finish_reason": c.finish_reason, **incomplete(c)} for k, c in enumerate(result.choices)]
    return jsonify({**head, "choices": choices, "usage": _usage(result)}), 200, headers


def _choice_logprobs(gen: Generation, echo: str, choice) -> dict:
    """The logprobs of a choice's text: with echo its prompt's characters first (null for the first,
    which nothing predicts), then the completion's; text_offset counts in the text returned."""
    completion = _logprobs(choice.logprobs, len(echo))
    return _joined(_prompt_logprobs(gen, echo, choice.prompt_score), completion) if echo else completion


def _prompt_logprobs(gen: Generation, prompt: str, scored) -> dict:
    if scored is None or not scored.chars:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return {"tokens": list(scored.chars),
            "token_logprobs": [None] + scored.logprobs[1:].tolist(),
            "top_logprobs": [None] + [_with_chosen(scored.alternatives(t), scored.chars[t], float(scored.logprobs[t]))
                                      for t in range(1, len(scored.chars))],
            "text_offset": reading(prompt, gen.vocab).offsets}


def _joined(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def _events(gen: Generation, head: dict, echo: list[str], include_usage: bool) -> Iterator[bytes]:
    usage = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, logprobs=None, finish_reason=None, ended: dict | None = None) -> bytes:
        return sse({**head, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason,
                                         **(ended or {})}], **usage})

    offsets = [len(text) for text in echo]  # text_offset counts in the whole text: echo, then the completion
    echoed = False
    for item in gen.run():
        if not echoed:  # the prompt, scored once the job has started (the loop read it before any chunk)
            echoed = True
            for k, text in enumerate(echo):
                if text:
                    scored = gen.job.streams[k - k % gen.n].prompt_score  # its prompt's first choice scored it (no best_of here)
                    yield chunk(k, text, _prompt_logprobs(gen, text, scored) if gen.logprobs else None)
        if isinstance(item, Chunk):
            yield chunk(item.index, item.text, _logprobs(item.logprobs, offsets[item.index]) if gen.logprobs else None)
            offsets[item.index] += len(item.text)
        else:
            yield from _ending(item, head, include_usage, lambda k, c: chunk(k, "", None, c.finish_reason, incomplete(c)))


def _logprobs(lps: list, offset: int) -> dict:
    offsets, at = [], offset
    for lp in lps:
        offsets.append(at)
        at += len(lp.char)
    return {"tokens": [lp.char for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [_with_chosen(lp.top, lp.char, lp.logprob) for lp in lps], "text_offset": offsets}


def _with_chosen(top, char: str, logprob: float) -> dict:
    """The most likely characters and the one chosen, where it is not among them (OpenAI's legacy
    completions: "the logprob of the sampled token" always, "up to logprobs+1 elements")."""
    alternatives = dict(top)
    alternatives.setdefault(char, logprob)
    return alternatives


# ---------------------------------------------------------------- /v1/chat/completions


def chat_template(served) -> ChatTemplate:
    """How the model `served` writes a conversation down: the configured template and names (one
    place to give a model its own)."""
    settings = state().settings
    return ChatTemplate(settings.chat_template, settings.chat_speakers, settings.max_transcript_chars)


def chat_generation(served, messages: list[tuple[str, str, str | None]], *, sampling, seed: int | None, stop,
                    max_chars: int, n: int = 1, logprobs: int = 0, stream: bool = False, constraint=None) -> Generation:
    """The chat pipeline (/v1/chat/completions, /v1/responses): (role, text, name) messages written
    into the transcript the model continues as the assistant; the reply ends where the next message
    would begin, or at one of the `stop` texts."""
    template = chat_template(served)
    transcript = template.render(messages)
    stops = [template.stop] if template.stop else []
    stops += [stop] if isinstance(stop, str) else list(stop or ())
    return Generation([transcript.text], n, served=served, sampling=sampling, seed=seed, stop=stops, max_chars=max_chars,
                      logprobs=logprobs, stream=stream, cache_at=[transcript.cache_at], constraint=constraint)


@bp.post("/chat/completions")
def chat_completions():
    st = state()
    req = read_json(st.schemas.chat)
    served = st.served(req.model)
    top = req.top_logprobs or 0
    gen = chat_generation(served, [(m.role, _content(m.content), m.name) for m in req.messages], n=req.n,
                          sampling=sampling_of(req, served), seed=req.seed, stop=req.stop,
                          max_chars=req.max_completion_tokens or req.max_tokens or st.settings.default_max_chars,
                          logprobs=max(top, 1) if req.logprobs else 0, stream=bool(req.stream),
                          constraint=constraint_for(req, served))
    head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": gen.model}
    headers = {"X-Seed": str(gen.seed)}
    if req.stream:
        return gen.respond(_chat_events(gen, {**head, "object": "chat.completion.chunk"}, top, _include_usage(req)),
                           "text/event-stream", headers)
    result = gen.result()
    choices = [{"index": k, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": _chat_logprobs(c.logprobs, top) if gen.logprobs else None, "finish_reason": c.finish_reason,
                **incomplete(c)} for k, c in enumerate(result.choices)]
    return jsonify({**head, "object": "chat.completion", "choices": choices, "usage": _usage(result)}), 200, headers


def _content(content) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _chat_events(gen: Generation, head: dict, top: int, include_usage: bool) -> Iterator[bytes]:
    usage = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, ended: dict | None = None) -> bytes:
        return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                                         **(ended or {})}], **usage})

    for k in range(gen.n):
        yield chunk(k, {"role": "assistant", "content": ""})
    for item in gen.run():
        if isinstance(item, Chunk):
            yield chunk(item.index, {"content": item.text}, _chat_logprobs(item.logprobs, top) if gen.logprobs else None)
        else:
            yield from _ending(item, head, include_usage, lambda k, c: chunk(k, {}, None, c.finish_reason, incomplete(c)))


def _chat_logprobs(lps: list, top: int) -> dict:
    def entry(char: str, logprob: float) -> dict:
        return {"token": char, "logprob": logprob, "bytes": list(char.encode())}

    return {"content": [{**entry(lp.char, lp.logprob), "top_logprobs": [entry(c, v) for c, v in lp.top[:top]]} for lp in lps],
            "refusal": None}


# ---------------------------------------------------------------- /v1/models


@bp.get("/models")
def models():
    require_ready()
    return jsonify({"object": "list", "data": [m.card() for m in state().models.values()]})


@bp.get("/models/<path:model_id>")
def model(model_id: str):
    served = state().served(model_id)
    served.require_ready()
    return jsonify(served.card())
