"""The generation API: one request pipeline, and its native formats on /v1/generate (JSON, plain
text, streamed or not), /v1/score, /v1/tokenize and /v1/detokenize.

Every generation endpoint takes the same path (as llama.cpp's server does): the handler reads and
validates its request (service/reading.py), turns it into a Generation (one Job: the request's
choices, submitted to the engine loop), and formats what the one pipeline, Generation.run(), yields:
a Chunk per choice as text arrives, then the Result. The formatters below write native JSON, plain
text and server-sent events; service/openai_api.py writes OpenAI's shapes. A new endpoint is a new
formatter over run(). Scoring is the same pipeline: a choice that reads its prompt with
prompt_logprobs and generates nothing (max_chars 0).

A request's constraint (regex, grammar, json_schema, response_format: service/schemas.py) is compiled
over the model's vocabulary by constraint_for() before its Generation is submitted, so a pattern the
model cannot write is a 422 (the HTTP status, streamed requests too) before anything is generated.
Each choice of a constrained request says whether its text is a whole match (Choice.incomplete).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request

from service import metrics
from model.runtime.constraints import ConstraintError, compile_constraint
from service.errors import ApiError, bad_field, deadline_exceeded, loading, queue_full, shutting_down
from service.reading import read_generate, read_json
from service.scheduler import Chunk, ClientGone, Job, NotReady, QueueFull
from service.schemas import constraint_of

bp = Blueprint("api", __name__, url_prefix="/v1")
log = logging.getLogger("chargen")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A plain-text answer ends with one newline after the text, whatever the text ends with, so that a
# terminal's prompt starts on a line of its own (as after JSON answers) and a client that wants the
# exact text drops exactly one "\n". The text, X-Completion-Chars and JSON answers are unchanged.
PLAIN_END = "\n"


def state():
    return current_app.extensions["chargen"]


def authorize():
    """The API key check of every /v1 blueprint (a before_request hook)."""
    key = state().settings.api_key
    if key is None or request.method == "OPTIONS":  # CORS preflights carry no credentials
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": 'Bearer realm="chargen"'})


bp.before_request(authorize)


@bp.app_errorhandler(ClientGone)
def _client_gone(_):
    # nginx's "client closed request": no client reads it, the access log and metrics do
    return Response(status=499)


def require_ready() -> None:
    """503 until every model is loaded (for answers about all of them; one model: Served.require_ready)."""
    if not state().ready:
        raise loading()


def internal_error(request_id: str) -> ApiError:
    """The 500 of a generation that failed after it was accepted; the server log has the cause."""
    return ApiError(500, f"internal server error (request id {request_id}); the server log has details",
                    type="server_error", code="internal_error")


def sse(data) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def client_gone_check(environ) -> Callable[[], bool]:
    """A cheap test of whether the client closed its connection: gunicorn hands us the socket, and a
    peek that reads end-of-file means the peer is gone. Without a socket (test client), never."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except ValueError:  # TLS sockets refuse flags; rely on failed writes there
            return False
        except OSError:
            return True

    return gone


# ---------------------------------------------------------------- the pipeline


@dataclass
class Choice:
    text: str
    finish_reason: str
    logprobs: list  # [CharLogprob] of every character when asked for; empty for streamed answers (the chunks had them)
    prompt_score: object = None  # model.runtime.streams.PromptScore of the choice's prompt, when asked for (prompt_logprobs)
    incomplete: bool | None = None  # constrained: whether the text stopped short of a whole match; None: unconstrained
    constraint_error: str | None = None  # constrained: why a limit on the constraint's work ended the text


@dataclass
class Result:
    seed: int
    choices: list[Choice]  # in request order: prompt by prompt, n each
    usage: dict  # prompt_chars and dropped_chars count each prompt once
    timings: dict


class Generation:
    """One request's generations, submitted to the engine loop of the model `served`
    (state().served(name) picks it from the request's `model`).

    Built in the request context, which run() does not need: a streamed body is read after the view
    has returned. Choice k = i * n + j (prompt i, its j-th choice) uses seed + k. With best_of,
    best_of choices per prompt are sampled (candidate k = i * best_of + j uses seed + k) and the n
    with the highest mean log-probability per character are the answer, best first. The first
    choice of each prompt scores it when `prompt_logprobs` is given (k alternatives per character);
    `cache_at` gives each prompt's positions for the prompt cache (a chat's turn ends); every choice
    keeps to `constraint` (constraint_for), when given.
    """

    def __init__(self, prompts: list[str], n: int, *, served, max_chars: int, sampling, seed: int | None,
                 stop: str | list[str] | tuple[str, ...] | None, logprobs: int, stream: bool, prompt_logprobs: int | None = None,
                 best_of: int | None = None, cache_at: list[tuple[int, ...]] | None = None, constraint=None):
        from model.runtime.engine import GenerationRequest

        served.require_ready()
        st = state()
        self.vocab = served.engine.vocab  # for formatters, which may run after the request context (streams)
        vocab_size = len(self.vocab)
        self.seed = secrets.randbits(32) if seed is None else seed
        self.logprobs = min(logprobs, vocab_size)
        self.stream, self.n = stream, n
        self.constrained = constraint is not None
        self.candidates = max(n, best_of or 1)  # sampled per prompt
        self.request_id, self.model = g.request_id, served.name
        stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
        scored = None if prompt_logprobs is None else min(prompt_logprobs, vocab_size)
        per_prompt = self.candidates
        requests = [GenerationRequest(prompt, max_chars=max_chars, sampling=sampling, seed=self.seed + i * per_prompt + j,
                                      stop=stop, logprobs=self.logprobs, prompt_logprobs=scored if j == 0 else None,
                                      cache_at=cache_at[i] if cache_at else (), rank=per_prompt > n, constraint=constraint)
                    for i, prompt in enumerate(prompts) for j in range(per_prompt)]
        sock = request.environ.get("gunicorn.socket")
        self.job = Job(requests, incremental=stream or self.logprobs > 0, deadline=g.arrived + st.settings.request_timeout,
                       arrived=g.arrived, fd=sock.fileno() if sock is not None else None)
        self._scheduler, self._timeout = served.scheduler, st.settings.request_timeout
        self._gone = client_gone_check(request.environ)
        try:
            served.scheduler.submit(self.job)
        except NotReady:
            raise loading() from None
        except QueueFull:
            raise queue_full() from None

    def run(self) -> Iterator[Chunk | Result]:
        """Chunks as text is generated (streamed answers only), then the Result. Raises ClientGone when
        the client hangs up (the job is cancelled), and the ApiError (504, 500) of a job the loop ended."""
        job = self.job
        kept = [[] for _ in job.requests]  # logprobs of an answer that is not streamed
        try:
            for chunks in self._scheduler.events(job, self._gone):
                for c in chunks:
                    if self.stream:
                        yield c
                    else:
                        kept[c.index].extend(c.logprobs)
            if job.error == "deadline":
                raise deadline_exceeded(self._timeout)
            if job.error == "shutdown":
                raise shutting_down()
            if job.error:
                raise internal_error(self.request_id)
            yield Result(self.seed, self._choices(kept), _usage(job, self.candidates), _timings(job))
        finally:
            _observe(job, self._scheduler.metrics)

    def _choices(self, kept: list[list]) -> list[Choice]:
        streams, per_prompt = self.job.streams, self.candidates
        choices = []
        for i in range(0, len(streams), per_prompt):
            scored = streams[i].prompt_score
            candidates = list(range(i, i + per_prompt))
            if per_prompt > self.n:  # best_of: the highest mean logprob per character first (OpenAI's "best")
                candidates.sort(key=lambda k: -streams[k].logprob_sum / max(streams[k].generated, 1))
            choices += [Choice(streams[k].text, streams[k].finish_reason, kept[k], scored,
                               streams[k].incomplete if self.constrained else None, streams[k].constraint_error)
                        for k in candidates[: self.n]]
        return choices

    def result(self) -> Result:
        """Wait for the whole answer (not streamed)."""
        *_, result = self.run()
        return result

    def respond(self, body: Iterable[bytes], mimetype: str, headers: dict, *, error: Callable[[dict], bytes] = sse) -> Response:
        """A streamed response of the formatter's `body`. The status line goes out first, so an error
        becomes the stream's last item, written by `error`; a client that hung up just ends it."""
        def guarded():
            try:
                yield from body
            except ClientGone:
                return
            except ApiError as e:
                yield error(e.body())
            except Exception:
                log.exception("unexpected error while streaming request %s", self.request_id)
                yield error(internal_error(self.request_id).body())

        return Response(guarded(), mimetype=mimetype, headers={**headers, **SSE_HEADERS})


def sampling_of(req, served):
    """The SamplingSettings of a request with the generation fields (the schemas' Adjusting and
    temperature, top_k, top_p); logit_bias is read against the model's vocabulary."""
    from model.runtime.sampling import SamplingSettings

    served.require_ready()
    return SamplingSettings(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                            repetition_penalty=req.repetition_penalty, repetition_window=req.repetition_window,
                            logit_bias=logit_bias(req.logit_bias, served.engine.vocab))


def constraint_for(req, served):
    """The request's constraint compiled over the vocabulary of the model `served` (compile_constraint
    bounds the work and caches by text), or None. What cannot be compiled (malformed, too large,
    characters the vocabulary lacks, no string at all) is a 422 naming the field."""
    found = constraint_of(req)
    if found is None:
        return None
    field, kind, source = found
    # a response_format is named as the client wrote it
    return compiled(served, field, field if field == kind else f"{field} {req.response_format.type}", kind, source)


def compiled(served, field: str, label: str, kind: str, source):
    """compile_constraint(kind, source) over the vocabulary of the model `served`; what cannot be
    compiled is a 422 on `field` whose message names the constraint as `label`."""
    served.require_ready()
    try:
        return compile_constraint(kind, source, served.engine.vocab)
    except ConstraintError as e:
        message = str(e)  # it starts with the kind compiled
        message = label + message[len(kind):] if message.startswith(kind + " ") else f"{label}: {message}"
        raise bad_field(field, message, "invalid_constraint") from None


def logit_bias(biases: dict[str, float], vocab) -> tuple[tuple[int, float], ...]:
    """{key: bias} -> ((id, bias), ...) as schemas.LOGIT_BIAS_DOC says: digits are an id, other keys
    text whose characters follow the prompt's rule; ids beyond the vocabulary name nothing; the
    biases of one character add up, within the bound."""
    from model.runtime.sampling import MAX_BIAS

    total: dict[int, float] = {}
    for key, bias in biases.items():
        ids = [int(key)] if key.isascii() and key.isdigit() else vocab.encode(key).ids.tolist()
        for i in ids:
            if i < len(vocab):
                total[i] = total.get(i, 0.0) + bias
    return tuple((i, max(-MAX_BIAS, min(MAX_BIAS, b))) for i, b in sorted(total.items()))


@dataclass
class Reading:
    """A text as the model reads it, character by character, with where each character came from."""

    ids: list[int]
    offsets: list[int]  # of each read character in the text
    replaced: list[tuple[int, str, str]]  # (offset, character, the vocabulary's character read instead)
    dropped: list[tuple[int, str]]  # (offset, character)


def reading(text: str, vocab) -> Reading:
    """Vocab.encode's rule (model/records/vocab.py) applied one character at a time, keeping offsets:
    newlines normalized first (\r\n and \r are one \n, neither replaced nor dropped), then any
    character outside the vocabulary replaced by what Vocab.encode reads for it, or dropped."""
    index = vocab.index
    ids, offsets, replaced, dropped = [], [], [], []
    i = 0
    while i < len(text):
        c = text[i]
        width = 2 if text.startswith("\r\n", i) else 1
        if c == "\r":
            c = "\n"
        known = index.get(c)
        if known is None:
            read = vocab.encode(c).ids
            if len(read):
                known = int(read[0])
                replaced.append((i, c, vocab.chars[known]))
            else:
                dropped.append((i, c))
        if known is not None:
            ids.append(known)
            offsets.append(i)
        i += width
    return Reading(ids, offsets, replaced, dropped)


def _usage(job: Job, per_prompt: int) -> dict:
    firsts = job.streams[::per_prompt]
    return {"prompt_chars": sum(s.prompt_chars for s in firsts),
            "completion_chars": sum(len(s.text) for s in job.streams),
            "dropped_chars": sum(s.dropped_chars for s in firsts)}


def _timings(job: Job) -> dict:
    if job.generating is None:
        return {"queue_ms": None, "prompt_ms": None, "generation_ms": None, "chars_per_second": None}
    generation = job.finished - job.generating
    chars = sum(len(s.text) for s in job.streams)
    return {"queue_ms": round((job.started - job.submitted) * 1e3, 3),
            "prompt_ms": round(job.prompt_seconds * 1e3, 3),
            "generation_ms": round(generation * 1e3, 3),
            "chars_per_second": round(chars / generation, 1) if generation > 0 else None}


def _observe(job: Job, model_metrics: metrics.ModelMetrics) -> None:
    if job.first_char is not None:
        model_metrics.first_char_seconds.observe(job.first_char - job.arrived)
    if job.started is not None:
        model_metrics.queue_seconds.observe(job.started - job.submitted)


# ---------------------------------------------------------------- /v1/generate


@bp.post("/generate")
def generate():
    req, plain = read_generate()
    served = state().served(req.model)
    gen = Generation([req.prompt], req.n, served=served, max_chars=req.max_chars, sampling=sampling_of(req, served),
                     seed=req.seed, stop=req.stop, logprobs=req.logprobs, stream=req.stream, constraint=constraint_for(req, served))
    gen_id = "gen-" + secrets.token_hex(12)
    headers = {"X-Seed": str(gen.seed)}
    if req.stream:
        if plain:
            return gen.respond(_text(gen), "text/plain", headers, error=_text_error)
        return gen.respond(_events(gen, gen_id), "text/event-stream", headers)
    result = gen.result()
    if plain:
        usage = result.usage
        headers.update({"X-Finish-Reason": result.choices[0].finish_reason, "X-Prompt-Chars": str(usage["prompt_chars"]),
                        "X-Completion-Chars": str(usage["completion_chars"]), "X-Dropped-Chars": str(usage["dropped_chars"])})
        if gen.constrained:
            headers["X-Incomplete"] = "true" if result.choices[0].incomplete else "false"
        return Response(result.choices[0].text + PLAIN_END, mimetype="text/plain", headers=headers)
    choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, **incomplete(c)} for i, c in enumerate(result.choices)]
    if gen.logprobs:
        for choice, c in zip(choices, result.choices):
            choice["logprobs"] = _logprobs(c.logprobs)
    return jsonify({"id": gen_id, "model": gen.model, "seed": result.seed, "choices": choices,
                    "usage": result.usage, "timings": result.timings}), 200, headers


def _events(gen: Generation, gen_id: str) -> Iterator[bytes]:
    for item in gen.run():
        if isinstance(item, Chunk):
            event = {"index": item.index, "text": item.text}
            if gen.logprobs:
                event["logprobs"] = _logprobs(item.logprobs)
            yield sse(event)
        else:
            yield sse({"done": True, "id": gen_id, "model": gen.model, "seed": item.seed,
                       "choices": [{"index": i, "finish_reason": c.finish_reason, **incomplete(c)} for i, c in enumerate(item.choices)],
                       "usage": item.usage, "timings": item.timings})


def incomplete(choice: Choice) -> dict:
    """The fields a choice of a constrained request has (every endpoint): whether its text stopped short
    of a whole match, and why a limit on the constraint's work ended it there if one did; none for
    unconstrained requests."""
    if choice.incomplete is None:
        return {}
    return {"incomplete": choice.incomplete, **({"constraint_error": choice.constraint_error} if choice.constraint_error else {})}


def _text(gen: Generation) -> Iterator[bytes]:
    for item in gen.run():
        if isinstance(item, Chunk):
            yield item.text.encode()
        else:
            yield PLAIN_END.encode()


def _text_error(body: dict) -> bytes:
    return ("\n" + json.dumps(body) + "\n").encode()


def _logprobs(lps: list) -> list:
    return [{"char": lp.char, "logprob": lp.logprob, "top": [{"char": c, "logprob": v} for c, v in lp.top]} for lp in lps]


# ---------------------------------------------------------------- /v1/score, /v1/tokenize, /v1/detokenize


@bp.post("/score")
def score():
    """How well the model predicts a text: the same figures as `chargen evaluate` on it (which
    predicts every character but the first, from the zero state), per character on request."""
    from model.runtime.sampling import LN2
    from model.runtime.sampling import GREEDY
    from model.records.vocab import normalize_newlines

    st = state()
    req = read_json(st.schemas.score)
    served = st.served(req.model)
    gen = Generation([req.text], 1, served=served, max_chars=0, sampling=GREEDY, seed=0, stop=None, logprobs=0,
                     stream=False, prompt_logprobs=req.top_logprobs if req.logprobs else 0)
    result = gen.result()
    scored, vocab = result.choices[0].prompt_score, served.engine.vocab
    nats = scored.nats / scored.scored if scored.scored else None
    text = normalize_newlines(req.text)  # counted as `chargen evaluate` counts a file's characters
    outside = sum(c not in vocab for c in text)
    body = {"id": "score-" + secrets.token_hex(12), "object": "score", "model": gen.model,
            "nats_per_char": nats, "bits_per_char": None if nats is None else nats / LN2, "chars_scored": scored.scored,
            "chars": len(text), "outside_vocabulary": outside, "replaced": outside - result.usage["dropped_chars"],
            "dropped": result.usage["dropped_chars"]}
    if req.logprobs:
        offsets = reading(req.text, vocab).offsets
        body["logprobs"] = [{"char": c, "offset": offsets[t], "logprob": None if t == 0 else float(scored.logprobs[t]),
                             "top": [] if t == 0 else [{"char": a, "logprob": v} for a, v in scored.alternatives(t)]}
                            for t, c in enumerate(scored.chars)]
    body["timings"] = result.timings
    return jsonify(body)


@bp.post("/tokenize")
def tokenize():
    st = state()
    req = read_json(st.schemas.tokenize)
    served = st.served(req.model)
    served.require_ready()
    vocab = served.engine.vocab
    read = reading(req.text, vocab)
    return jsonify({"model": served.name, "ids": read.ids, "tokens": [vocab.chars[i] for i in read.ids], "count": len(read.ids),
                    "replaced": [{"offset": o, "char": c, "as": a} for o, c, a in read.replaced],
                    "dropped": [{"offset": o, "char": c} for o, c in read.dropped]})


@bp.post("/detokenize")
def detokenize():
    st = state()
    req = read_json(st.schemas.detokenize)
    served = st.served(req.model)
    served.require_ready()
    chars = served.engine.vocab.chars
    return jsonify({"model": served.name, "text": "".join(chars[i] for i in req.ids if i < len(chars)),
                    "dropped": [{"index": k, "id": i} for k, i in enumerate(req.ids) if i >= len(chars)]})
