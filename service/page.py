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
"*" allows any site; checked with the other settings, service/config.py, so `chargen serve` refuses a
bad one before gunicorn starts). Which origins may call the API from their own JavaScript is CORS,
configured separately by CHARGEN_CORS_ORIGINS (service/app.py).
"""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

bp = Blueprint("page", __name__, template_folder="templates")

_BASE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                "manifest-src 'self'; base-uri 'none'; form-action 'none'; object-src 'none'")


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
    extra = current_app.extensions["chargen"].settings.frame_ancestors  # CHARGEN_FRAME_ANCESTORS
    return _page("embed.html", " ".join(["'self'", *extra]))
