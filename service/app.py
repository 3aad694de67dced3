"""The application factory: `create_app()` builds one worker's Flask application.

    gunicorn -c python:service.gunicorn_conf        (what `chargen serve` runs)
    flask --app 'service.app:create_app()' run      (development: one process)

Configuration comes from CHARGEN_* environment variables (service/config.py has the table), then
from `config` (tests). Building the application starts no thread and loads no model: each model's
scheduler thread starts with `app.extensions["chargen"].start()` (gunicorn's post_worker_init)
or on the first request that needs that model. A model loads in its thread; until it has, requests
for it answer 503, and /health answers 503 until every model has loaded.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from datetime import datetime

from flask import Flask, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from service import errors, metrics
from service.config import Models, Settings, unknown_variables
from service.errors import ApiError, loading
from service.schemas import ADJUSTMENTS, BOUNDS, Schemas
from service.scheduler import Scheduler, WorkerReadiness

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
DRAIN_MARGIN = 2.0  # seconds a drain leaves for the last answers to be written before the worker is stopped

log = logging.getLogger("chargen")


class Served:
    """One model as requests use it: its name, its engine loop and, once loaded, its engine and
    artifact. Chargen.served(name) picks one; every endpoint that takes `model` goes through it."""

    def __init__(self, name: str, scheduler: Scheduler, default: bool):
        self.name, self.scheduler, self.default = name, scheduler, default

    @property
    def engine(self):
        return self.scheduler.engine

    @property
    def artifact(self):
        return self.scheduler.artifact

    @property
    def ready(self) -> bool:
        return self.scheduler.ready

    def require_ready(self) -> None:
        """503 (model_loading) until this model is loaded."""
        if not self.scheduler.ready:
            raise loading()

    def created(self) -> int:
        created = (self.artifact.meta.created if self.artifact else None) or ""
        try:
            return int(datetime.fromisoformat(created).timestamp())
        except ValueError:
            return 0

    def card(self) -> dict:
        """The model in /v1/models: OpenAI's fields, then chargen's (what it learned from, its size,
        how well it predicts text it never saw); the model must be loaded."""
        meta, config = self.artifact.meta, self.artifact.config
        return {"id": self.name, "object": "model", "created": self.created(), "owned_by": "chargen",
                "default": self.default, "corpus": meta.corpus.name if meta.corpus else None,
                "corpus_chars": meta.corpus.chars if meta.corpus else None, "parameters": meta.parameters,
                "bits_per_char": meta.validation.bits_per_char if meta.validation else None,
                "cell": config.cell, "layers": config.layers, "units": config.units, "vocab_size": len(self.artifact.vocab),
                "precision": self.artifact.precision, "graph": self.artifact.graph.name}

    def section(self) -> dict:
        """The model in /info (the model must be loaded)."""
        artifact = self.artifact
        meta, config = artifact.meta, artifact.config
        sections = meta.to_dict()  # corpus, validation, training as meta.json has them
        return {"name": self.name, "default": self.default, "path": str(artifact.path), "cell": config.cell,
                "layers": config.layers, "units": config.units, "embedding": config.embedding,
                "parameters": meta.parameters, "vocab_size": len(artifact.vocab), "corpus": sections["corpus"],
                "validation": sections["validation"], "training": sections["training"], "created": meta.created,
                "precision": artifact.precision, "graph": artifact.graph.name, "int8": sections.get("int8")}


def model_not_found(name: str, available: list[str]) -> ApiError:
    shown = name if len(name) <= 80 else name[:77] + "..."
    return ApiError(404, f"no model {shown!r}; this server serves {', '.join(repr(n) for n in available)} "
                         "(GET /v1/models lists them)", param="model", code="model_not_found")


class Chargen:
    """What one application holds: its settings, request schemas and one engine loop per model."""

    def __init__(self, settings: Settings, models: Models):
        self.settings = settings
        readiness = WorkerReadiness(len(models.sources))  # the worker is ready when every model is
        self.models: dict[str, Served] = {
            m.name: Served(m.name, Scheduler(settings, m, readiness), m.name == models.default) for m in models.sources}
        self.default = self.models[models.default]
        self.schemas = Schemas(settings, models)
        self._openapi: dict | None = None

    def served(self, name: str | None) -> Served:
        """The model a request names (None: the default); 404 model_not_found listing the names otherwise."""
        if name is None:
            return self.default
        served = self.models.get(name)
        if served is None:
            raise model_not_found(name, list(self.models))
        return served

    @property
    def scheduler(self) -> Scheduler:
        """The default model's engine loop (what a server of one model has)."""
        return self.default.scheduler

    # ------------------------------------------------------------ every model

    def start(self) -> None:
        """Start loading every model and its engine loop (done on first use otherwise)."""
        for m in self.models.values():
            m.scheduler.start()

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.models.values())

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every model is loaded (True), or one failed, or the time is up (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for m in self.models.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not m.scheduler.wait_ready(left):
                return False
        return True

    def failed(self) -> Served | None:
        """The first model whose loading failed or whose loop stopped, if any."""
        return next((m for m in self.models.values() if m.scheduler.failure is not None), None)

    def on_failure(self, callback) -> None:
        """Call `callback(served, error, loaded)` when a model fails to load or its loop dies."""
        for m in self.models.values():
            m.scheduler.on_failure(lambda error, loaded, m=m: callback(m, error, loaded))

    @property
    def draining(self) -> bool:
        return any(m.scheduler.draining for m in self.models.values())

    def drain(self) -> None:
        """SIGTERM: requests get CHARGEN_GRACEFUL_TIMEOUT to finish; those that would not are ended a
        little before it with a 503 (an error event when streamed), which a client can retry, rather
        than cut when the worker is stopped."""
        left = self.settings.graceful_timeout
        for m in self.models.values():
            m.scheduler.drain(max(0.5, left - min(DRAIN_MARGIN, left / 10)))

    def close(self, timeout: float = 5.0) -> None:
        for m in self.models.values():
            m.scheduler.close(timeout)

    # ------------------------------------------------------------ documents

    def info(self, name: str | None = None) -> dict:
        """/info for one model (default: the default model), with every model in `models`; every
        model must be loaded."""
        from model.runtime.inside import MAX_CHARS as MAX_INSPECT_CHARS  # as service/schemas.py, when it is asked

        served, s = self.served(name), self.settings
        engine = served.engine
        return {
            "model": served.section(),
            "engine": {"max_batch": engine.max_batch, "active": engine.active, "queue_depth": served.scheduler.queue_depth(),
                       **{k: v for k, v in s.public().items() if k != "max_batch"}},
            "limits": {"max_prompt_chars": s.max_prompt_chars, "max_chars": s.max_chars, "max_n": s.max_n,
                       "max_queue": s.max_queue, "max_body_bytes": s.max_body_bytes, "request_timeout": s.request_timeout,
                       "max_inspect_chars": MAX_INSPECT_CHARS},
            "bounds": BOUNDS,
            "defaults": {"max_chars": s.default_max_chars, "temperature": s.default_temperature,
                         "top_k": s.default_top_k, "top_p": s.default_top_p, **ADJUSTMENTS},
            "unknown_characters": "replaced by their unaccented base form when the vocabulary has it, otherwise dropped "
                                  "(usage.dropped_chars); \\r\\n and \\r become \\n",
            "models": [m.section() for m in self.models.values()],
        }

    def openapi(self) -> dict:
        if self._openapi is None:
            from importlib.metadata import PackageNotFoundError, version

            from service.openapi import document

            try:
                v = version("chargen")
            except PackageNotFoundError:
                v = "0"
            self._openapi = document(self.schemas, v)
        return self._openapi


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__)
    # Values stay strings here (Flask would JSON-parse them: CHARGEN_API_KEY=null would become None);
    # Settings converts and checks them, naming the variable when one is wrong.
    app.config.from_prefixed_env("CHARGEN", loads=str)
    if config:
        app.config.update(config)
    settings = Settings.from_mapping(app.config)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    _use_gunicorn_logging()
    for name in unknown_variables():
        log.warning("ignoring unknown setting %s (see the configuration table in README.md)", name)

    chargen = Chargen(settings, settings.models_to_serve())
    app.extensions["chargen"] = chargen

    errors.register(app)
    _register_request_hooks(app, settings)

    from service.api import bp as api
    from service.inspect import bp as inspect
    from service.openai_api import bp as openai_api
    from service.ops import bp as ops
    from service.page import bp as page
    from service.responses_api import bp as responses_api
    from service.tokenizer_api import bp as tokenizer_api

    app.register_blueprint(api)
    app.register_blueprint(inspect)
    app.register_blueprint(openai_api)
    app.register_blueprint(ops)
    app.register_blueprint(page)
    app.register_blueprint(tokenizer_api)
    app.register_blueprint(responses_api)
    return app


def _use_gunicorn_logging() -> None:
    gunicorn = logging.getLogger("gunicorn.error")
    if gunicorn.handlers and not log.handlers:
        log.handlers = gunicorn.handlers
        log.setLevel(gunicorn.level)
        log.propagate = False


def _register_request_hooks(app: Flask, settings: Settings) -> None:
    origins = set(settings.cors_origins)

    @app.before_request
    def _start():
        g.request_id = "req-" + secrets.token_hex(8)
        g.arrived = time.perf_counter()

    @app.after_request
    def _finish(response):
        response.headers["X-Request-Id"] = g.request_id
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if origins and request.path.startswith("/v1/"):
            _cors(response, origins)
        route = _route(app)
        method = request.method if request.method in HTTP_METHODS else "other"  # a label per invented method would grow for ever
        status, arrived = str(response.status_code), g.arrived

        def record():  # when the body has been sent: streams count their whole length
            metrics.requests_total.labels(route, method, status).inc()
            metrics.request_seconds.labels(route).observe(time.perf_counter() - arrived)

        response.call_on_close(record)
        return response


def _route(app: Flask) -> str:
    """The route label of /metrics: the request's rule; for a method the route does not take (405), the
    route's own rule; "unmatched" for a path no route has (a label per path would grow for ever)."""
    if request.url_rule is not None:
        return request.url_rule.rule
    refused = request.routing_exception
    if isinstance(refused, MethodNotAllowed) and refused.valid_methods:
        try:
            rule, _ = app.url_map.bind_to_environ(request.environ).match(method=refused.valid_methods[0], return_rule=True)
            return rule.rule
        except HTTPException:
            pass
    return "unmatched"


def _cors(response, origins: set[str]) -> None:
    origin = request.headers.get("Origin")
    if not origin:
        return
    if "*" in origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin.rstrip("/") in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.vary.add("Origin")
    else:
        return
    response.headers["Access-Control-Expose-Headers"] = ("X-Request-Id, X-Seed, X-Finish-Reason, X-Incomplete, X-Prompt-Chars, "
                                                        "X-Completion-Chars, X-Dropped-Chars, Retry-After")
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        # the headers the browser asks for (OpenAI's JavaScript client sends its own x-stainless-* ones);
        # what they carry is read by no one here, and Authorization still needs the key
        asked = request.headers.get("Access-Control-Request-Headers", "")
        names = [h.strip() for h in asked.split(",") if re.fullmatch(r"[A-Za-z0-9-]{1,64}", h.strip())][:64]
        allowed: dict[str, str] = {}
        for name in ["Authorization", "Content-Type", *names]:
            allowed.setdefault(name.lower(), name)  # one of each, whatever its case
        response.headers["Access-Control-Allow-Headers"] = ", ".join(allowed.values())
        response.headers["Access-Control-Max-Age"] = "600"
