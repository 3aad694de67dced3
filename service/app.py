"""The application factory: `create_app()` builds one worker's Flask application.

    gunicorn -c python:service.gunicorn_conf        (what `chargen serve` runs)
    flask --app 'service.app:create_app()' run      (development: one process)

Configuration comes from CHARGEN_* environment variables (service/config.py has the table), then
from `config` (tests). Building the application starts no thread and loads no model: the
scheduler's thread starts with `app.extensions["chargen"].start()` (gunicorn's post_worker_init)
or on the first request that needs the model. The model loads in that thread; until it has,
generation routes and /health answer 503.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime

from flask import Flask, g, request

from service import errors, metrics
from service.config import Settings, unknown_variables
from service.schemas import BOUNDS, Schemas
from service.scheduler import Scheduler

log = logging.getLogger("chargen")


class Chargen:
    """What one application holds: its settings, request schemas and engine loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.schemas = Schemas(settings)
        self.scheduler = Scheduler(settings)
        self._openapi: dict | None = None

    def start(self) -> None:
        """Start loading the model and the engine loop (done on first use otherwise)."""
        self.scheduler.start()

    def model_created(self) -> int:
        created = (self.scheduler.artifact.meta.created if self.scheduler.artifact else None) or ""
        try:
            return int(datetime.fromisoformat(created).timestamp())
        except ValueError:
            return 0

    def info(self) -> dict:
        artifact, engine, s = self.scheduler.artifact, self.scheduler.engine, self.settings
        meta, config = artifact.meta, artifact.config
        sections = meta.to_dict()  # corpus, validation, training as meta.json has them
        return {
            "model": {"name": s.name, "path": str(artifact.path), "cell": config.cell, "layers": config.layers,
                      "units": config.units, "embedding": config.embedding, "parameters": meta.parameters,
                      "vocab_size": len(artifact.vocab), "corpus": sections["corpus"], "validation": sections["validation"],
                      "training": sections["training"], "created": meta.created},
            "engine": {"max_batch": engine.max_batch, "active": engine.active, "queue_depth": self.scheduler.queue_depth(),
                       **{k: v for k, v in s.public().items() if k != "max_batch"}},
            "limits": {"max_prompt_chars": s.max_prompt_chars, "max_chars": s.max_chars, "max_n": s.max_n,
                       "max_queue": s.max_queue, "max_body_bytes": s.max_body_bytes, "request_timeout": s.request_timeout},
            "bounds": BOUNDS,
            "defaults": {"max_chars": s.default_max_chars, "temperature": s.default_temperature,
                         "top_k": s.default_top_k, "top_p": s.default_top_p},
            "unknown_characters": "replaced by their unaccented base form when the vocabulary has it, otherwise dropped "
                                  "(usage.dropped_chars); \\r\\n and \\r become \\n",
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

    chargen = Chargen(settings)
    app.extensions["chargen"] = chargen

    errors.register(app)
    _register_request_hooks(app, settings)

    from service.api import bp as api
    from service.openai_api import bp as openai_api
    from service.ops import bp as ops
    from service.page import bp as page

    app.register_blueprint(api)
    app.register_blueprint(openai_api)
    app.register_blueprint(ops)
    app.register_blueprint(page)
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
        route = request.url_rule.rule if request.url_rule else "unmatched"
        method, status, arrived = request.method, str(response.status_code), g.arrived

        def record():  # when the body has been sent: streams count their whole length
            metrics.requests_total.labels(route, method, status).inc()
            metrics.request_seconds.labels(route).observe(time.perf_counter() - arrived)

        response.call_on_close(record)
        return response


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
    response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, X-Seed, X-Finish-Reason, Retry-After"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
