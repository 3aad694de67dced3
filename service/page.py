"""The pages people use: `/`, a chat-style page to try the model, and `/embed`, a compact version
for an <iframe> on other sites.

Both are static HTML shells; everything they show comes from the API (/info, /v1/generate) through
plain ES modules in service/static (no build step, no CDN: the page works offline). Model text and
prompts are inserted as text nodes, never as HTML, and the pages are sent with a
Content-Security-Policy without 'unsafe-inline', so a prompt such as <img src=x onerror=...> stays
text even if a bug tried to render it. Assets are served by the app's own static route
(Flask(__name__) in service/app.py serves service/static at /static).

Framing: `/` may not be framed at all; `/embed` may be framed by its own origin and by the origins in
CHARGEN_FRAME_ANCESTORS (space or comma separated, e.g. "https://blog.example https://*.example.org";
"*" allows any site). Which origins may call the API from their own JavaScript is CORS, configured
separately by CHARGEN_CORS_ORIGINS (service/app.py).
"""

from __future__ import annotations

import re

from flask import Blueprint, current_app, render_template

from service.config import SettingsError

bp = Blueprint("page", __name__, template_folder="templates")

# A CSP source for frame-ancestors: a scheme-qualified origin, optionally with a *. subdomain
# wildcard and a port (https://*.example.org:8443), or * for anyone.
_ORIGIN = re.compile(r"^https?://(\*\.)?[A-Za-z0-9.-]+(:\d{1,5})?$")

_BASE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                "manifest-src 'self'; base-uri 'none'; form-action 'none'; object-src 'none'")


def frame_ancestors(value: str | None) -> list[str]:
    """The origins (besides the page's own) that may frame /embed, from CHARGEN_FRAME_ANCESTORS."""
    sources = [v.rstrip("/") for v in re.split(r"[\s,]+", value or "") if v]
    for source in sources:
        if source != "*" and not _ORIGIN.match(source):
            raise SettingsError(f"invalid configuration: CHARGEN_FRAME_ANCESTORS: {source!r} is not an origin like "
                                "https://blog.example (or https://*.example.org, or * for any site)")
    return sources


@bp.record_once
def _check_settings(state):
    # Read once at start-up so a typo stops the server with a message instead of a broken embed.
    state.app.extensions["chargen_frame_ancestors"] = frame_ancestors(state.app.config.get("FRAME_ANCESTORS"))


def _page(template: str, ancestors: str, **context):
    response = current_app.make_response(render_template(template, **context))
    response.headers["Content-Security-Policy"] = f"{_BASE_POLICY}; frame-ancestors {ancestors}"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/")
def index():
    response = _page("index.html", "'none'")
    response.headers["X-Frame-Options"] = "DENY"  # for browsers that predate frame-ancestors
    return response


@bp.get("/embed")
def embed():
    extra = current_app.extensions["chargen_frame_ancestors"]
    return _page("embed.html", " ".join(["'self'", *extra]))
