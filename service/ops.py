"""Routes for operators and tools: /health, /info, /metrics, /openapi.json (no API key needed)."""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app, jsonify

from service import metrics
from service.errors import ApiError, loading

bp = Blueprint("ops", __name__)


def state():
    return current_app.extensions["chargen"]


@bp.get("/health")
def health():
    scheduler = state().scheduler
    if scheduler.failure is not None:
        raise ApiError(503, f"the model could not be loaded: {scheduler.failure}", type="unavailable_error",
                       code="model_failed")
    if not scheduler.ready:
        raise loading()
    return jsonify({"status": "ok", "pid": os.getpid()})


@bp.get("/info")
def info():
    if not state().scheduler.ready:
        raise loading()
    return jsonify(state().info())


@bp.get("/metrics")
def prometheus():
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
def openapi():
    return jsonify(state().openapi())
