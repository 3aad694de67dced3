"""Routes for operators and tools: /health, /health/live, /info, /metrics, /openapi.json (no API key needed).

/health is readiness: 200 only while this worker's models are all loaded and it is not shutting down (a
load balancer or Kubernetes sends traffic on it). /health/live is liveness: 200 whenever the worker
answers HTTP at all, loading or draining included, so a liveness probe restarts only a process whose
request threads are stuck, never one that is busy loading or finishing its streams.
"""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app, jsonify, request

from service import metrics
from service.errors import ApiError, loading, repeated_setting

bp = Blueprint("ops", __name__)


def state():
    return current_app.extensions["chargen"]


@bp.get("/health")
def health():
    chargen = state()
    failed = chargen.failed()
    if failed is not None:
        raise ApiError(503, f"the model {failed.name!r} could not be loaded: {failed.scheduler.failure}",
                       type="unavailable_error", code="model_failed")
    if chargen.draining:
        raise ApiError(503, "this worker is shutting down and finishes only the requests it has; send new ones elsewhere",
                       type="unavailable_error", code="draining", headers={"Retry-After": "1"})
    if not chargen.ready:
        raise loading()
    return jsonify({"status": "ok", "pid": os.getpid()})


@bp.get("/health/live")
def live():
    return jsonify({"status": "alive", "pid": os.getpid()})


@bp.get("/info")
def info():
    """One model's /info (?model=NAME; default: the default model), every model in `models`."""
    names = request.args.getlist("model")
    if len(names) > 1:
        raise repeated_setting("model", len(names))
    name = names[0] if names else None
    state().served(name)  # an unknown name is a 404 even while loading
    if not state().ready:
        raise loading()
    return jsonify(state().info(name))


@bp.get("/metrics")
def prometheus():
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
def openapi():
    return jsonify(state().openapi())
