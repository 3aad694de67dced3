"""The pages people use, / and /embed, tested the way a person uses them: headless Chromium
(Playwright driving Debian's `chromium`) against the real gunicorn server and conftest's tiny model,
whose greedy text is known exactly (server.continuation).

The markup and headers are checked first through Flask's test client; the browser tests skip, saying
why, where /usr/bin/chromium or the playwright package is missing (scripts/test installs both).
The screenshots are taken into a temporary directory; scripts/screenshots refreshes the README's
(docs/screenshot-*.png, tests/browser.py).
"""

from __future__ import annotations

import json
import math
import re
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from browser import DESKTOP, TIMEOUT_MS, Tab, screenshots
from conftest import OTHER, PERIODIC
from polling import wait_for
from server import ROOT, continuation, running_server
from service.app import create_app
from service.config import SettingsError

LONG = 100_000  # max_chars of the "long generation" (the server's limit is raised to it)
STATIC = ROOT / "service" / "static"


# ---------------------------------------------------------------- markup and headers (test client)


@pytest.fixture(scope="module")
def client(tiny_artifact):
    app = create_app({"ARTIFACT": str(tiny_artifact), "TESTING": True})
    yield app.test_client()
    app.extensions["chargen"].scheduler.close()


def csp(response) -> dict[str, list[str]]:
    policy = {}
    for directive in response.headers["Content-Security-Policy"].split(";"):
        name, *sources = directive.split()
        policy[name] = sources
    return policy


class Markup(HTMLParser):
    """What the checks below need from a page: elements with their attributes, script bodies, labels."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.script_text: list[str] = []
        self.label_for: set[str] = set()
        self.open: list[tuple[str, dict]] = []
        self.text_in: dict[int, str] = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "label" and attrs.get("for"):
            self.label_for.add(attrs["for"])
        if tag not in ("input", "img", "meta", "link", "br"):
            self.open.append((tag, attrs))

    def handle_endtag(self, tag):
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self.open and self.open[-1][0] == "script":
            self.script_text.append(data)
        for _, attrs in self.open:
            self.text_in[id(attrs)] = self.text_in.get(id(attrs), "") + data


@pytest.mark.parametrize("path, ancestors", [("/", ["'none'"]), ("/embed", ["'self'"])])
def test_pages_are_sent_with_a_strict_content_security_policy(client, path, ancestors):
    r = client.get(path)
    assert r.status_code == 200 and r.mimetype == "text/html"
    policy = csp(r)
    assert "unsafe" not in r.headers["Content-Security-Policy"]
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ancestors
    if path == "/":
        assert r.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("path", ["/", "/embed"])
def test_markup_holds_no_inline_code_and_only_local_assets(client, path):
    page = Markup(client.get(path).get_data(as_text=True))
    assert "".join(page.script_text).strip() == "", "inline script"
    assets = []
    for tag, attrs in page.elements:
        assert tag != "style", "inline <style>"
        assert "style" not in attrs, f"style attribute on <{tag}>"
        assert not [a for a in attrs if a.startswith("on")], f"event handler attribute on <{tag}>: {attrs}"
        for name in ("src", "href"):
            url = attrs.get(name)
            if url is not None:
                assert url.startswith(("/", "#")) and not url.startswith("//"), f"<{tag} {name}={url!r}> is not on this server"
                if url.startswith("/static/"):
                    assets.append(url)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for url in assets:
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("path", ["/", "/embed"])
def test_every_control_has_a_label(client, path):
    page = Markup(client.get(path).get_data(as_text=True))
    controls = 0
    for tag, attrs in page.elements:
        if tag in ("input", "textarea", "select"):
            controls += 1
            assert attrs.get("id") in page.label_for or attrs.get("aria-label"), f"<{tag} id={attrs.get('id')}> has no label"
        elif tag == "button":
            controls += 1
            assert page.text_in.get(id(attrs), "").strip() or attrs.get("aria-label"), f"button without a name: {attrs}"
    assert controls >= (12 if path == "/" else 7)


def test_scripts_and_styles_need_no_internet(client):
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} >= {"chat.js", "api.js", "answer.js", "style.css", "icon.svg"}
    for f in files:
        text = f.read_text(encoding="utf-8")
        # xmlns names a namespace; it is never fetched
        urls = [u for u in re.findall(r"https?://[^\s\"')]+", text) if u != "http://www.w3.org/2000/svg"]
        assert urls == [], f"{f.name} refers to {urls}"
        r = client.get(f"/static/{f.name}")
        assert r.status_code == 200
        if f.suffix == ".js":
            assert r.mimetype == "text/javascript"  # module scripts are refused with any other type
            for module in re.findall(r"""from\s+["'](.+?)["']""", text):
                assert module.startswith("./") and (STATIC / module).is_file(), f"{f.name} imports {module}"


def test_framing_of_the_embed_is_configured_by_environment(tiny_artifact):
    app = create_app({"ARTIFACT": str(tiny_artifact), "FRAME_ANCESTORS": "https://blog.example, https://*.example.org:8443"})
    try:
        c = app.test_client()
        assert csp(c.get("/embed"))["frame-ancestors"] == ["'self'", "https://blog.example", "https://*.example.org:8443"]
        assert csp(c.get("/"))["frame-ancestors"] == ["'none'"]  # the full page is never framed
    finally:
        app.extensions["chargen"].scheduler.close()


@pytest.mark.parametrize("value", ["blog.example", "https://blog.example/path", "'unsafe-inline'", "https://a.example;script-src *"])
def test_a_bad_frame_ancestor_stops_start_up_naming_the_variable(tiny_artifact, value):
    with pytest.raises(SettingsError, match="CHARGEN_FRAME_ANCESTORS"):
        create_app({"ARTIFACT": str(tiny_artifact), "FRAME_ANCESTORS": value})


# ---------------------------------------------------------------- in the browser (Chromium, real gunicorn: slow)


class HostSite:
    """Another site on this machine (its own origin: another loopback port) whose page frames /embed."""

    def __init__(self):
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = (f'<!doctype html><title>a site</title><h1>A site</h1>'
                        f'<iframe src="{site.embed_url}" width="480" height="360" title="chargen"></iframe>').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.embed_url = ""
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def sites():
    allowed, other = HostSite(), HostSite()
    yield allowed, other
    allowed.close()
    other.close()


@pytest.fixture(scope="module")
def server(tiny_artifact, browser, sites):
    allowed, other = sites
    # float32: the page's probabilities are compared with the same seeded request's made apart, which an
    # int8 graph's batch-dependent quantization does not promise (README.md, "Precision")
    env = {"CHARGEN_MAX_CHARS": str(LONG), "CHARGEN_FRAME_ANCESTORS": allowed.url, "CHARGEN_PRECISION": "float32"}
    with running_server(tiny_artifact, env=env) as s:
        allowed.embed_url = other.embed_url = s.url + "/embed"
        yield s


@pytest.fixture
def tab(browser, server):
    t = Tab(browser, server.url + "/")
    yield t
    t.close()


@pytest.mark.slow
def test_the_page_loads_without_console_errors_and_names_the_model(tab):
    page = tab.page
    assert page.title().startswith("chargen")
    assert "LSTM 1×32" in page.text_content("#model")
    assert page.is_visible("#prompt") and page.is_visible("#send") and page.is_hidden("#stop")
    assert page.get_by_label("Temperature").input_value() == "0.8"
    assert page.input_value("#max-chars") == "200"  # the server's default, from /info
    assert page.is_hidden("#model-field")  # one model: nothing to pick
    page.wait_for_timeout(300)  # anything the modules do after load
    assert tab.console_errors == []


# Records the length of the last answer at every change while it streams.
RECORD = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const turn = document.querySelector('.turn:last-child');
    if (turn && turn.dataset.state === 'streaming') window.lengths.push(turn.querySelector('.generated').textContent.length);
  }).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@pytest.mark.slow
def test_the_answer_streams_in_and_ends_with_a_finish_reason(tab):
    tab.page.evaluate(RECORD)
    tab.send("the quick", temperature=0, max_chars=1500)
    assert tab.wait_ended() == "done"
    text = tab.generated()
    assert text == continuation("the quick", 1500)
    partial = {n for n in tab.page.evaluate("window.lengths") if 0 < n < len(text)}
    assert len(partial) >= 2, f"the answer did not grow in steps: {sorted(partial)}"
    turn = tab.turn()
    assert turn.locator(".finish").get_attribute("data-reason") == "length"
    assert "length" in turn.locator(".finish").text_content()
    assert re.search(r"[\d,]+ chars/s", turn.locator(".speed").text_content())
    assert turn.locator(".prompt-text").text_content() == "the quick"
    assert tab.console_errors == []

    tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
    turn.locator(".copy").click()
    assert tab.page.evaluate("navigator.clipboard.readText()") == "the quick" + text


@pytest.mark.slow
def test_stop_ends_a_long_generation_and_the_server_frees_its_slot(tab, server):
    page = tab.page
    tab.send("the", temperature=0, max_chars=LONG)
    page.wait_for_function("() => document.querySelector('.turn:last-child .generated').textContent.length > 200")
    assert page.is_visible("#stop") and page.is_hidden("#send")
    assert wait_for(lambda: server.metric("chargen_active_streams") == 1), "the stream never showed in the gauge"
    page.click("#stop")
    assert tab.wait_ended() == "stopped"
    stopped_at = len(tab.generated())
    assert 200 < stopped_at < LONG
    assert wait_for(lambda: server.metric("chargen_active_streams") == 0), "the server kept generating after Stop"
    assert len(tab.generated()) == stopped_at  # nothing more arrived
    assert "stopped" in tab.turn().locator(".finish").text_content()
    assert page.is_visible("#send") and page.is_hidden("#stop")


# The answer has grown past n characters, or ended.
GROWN = """n => {
  const turn = document.querySelector('.turn:last-child');
  return turn.dataset.state !== 'streaming' || turn.querySelector('.generated').textContent.length > n;
}"""


@pytest.mark.slow
def test_escape_stops_the_generation_only_when_it_closes_nothing_else(tab):
    page = tab.page
    tab.send("the", temperature=0, max_chars=LONG)
    page.wait_for_function(GROWN, arg=200)

    def escape_goes_on_streaming():
        page.keyboard.press("Escape")
        page.wait_for_function(GROWN, arg=len(tab.generated()) + 200)
        assert tab.turn().get_attribute("data-state") == "streaming"

    page.click("#inside-open")  # the header's Look inside, over the answer being written
    page.wait_for_function("() => document.activeElement.id === 'inside-text'")
    escape_goes_on_streaming()  # closes the dialog
    assert not page.locator("#inside").evaluate("d => d.open")
    page.focus("#max-chars")  # another field
    escape_goes_on_streaming()
    page.focus("#prompt")
    page.keyboard.press("Escape")
    assert tab.wait_ended() == "stopped"


@pytest.mark.slow
@pytest.mark.parametrize("control", ["#temperature", "#probabilities"])
def test_escape_on_a_slider_or_a_checkbox_stops_the_generation(tab, control):
    page = tab.page
    tab.send("the", temperature=0, max_chars=LONG)
    page.wait_for_function(GROWN, arg=200)
    page.focus(control)  # neither gives Escape a meaning of its own, as a text field may
    page.keyboard.press("Escape")
    assert tab.wait_ended() == "stopped"


@pytest.mark.slow
def test_a_prompt_over_the_limit_stays_in_the_box_and_the_pages_own_checks_are_said_plainly(tab, server):
    page = tab.page
    asked = []
    page.on("request", lambda r: asked.append(r.url) if r.url.endswith("/v1/generate") else None)
    too_long = "the quick brown fox " * 205  # 4,100 characters: over the server's 4,096
    assert server.get("/info").json()["limits"]["max_prompt_chars"] == 4096
    tab.send(too_long, temperature=0, max_chars=20)
    error = page.locator("#prompt-error")
    assert error.is_visible() and "4,100 characters" in error.text_content() and "at most 4,096" in error.text_content()
    assert page.input_value("#prompt") == too_long and page.get_attribute("#prompt", "aria-invalid") == "true"
    assert page.locator(".turn").count() == 0 and asked == []  # refused before it was sent
    page.fill("#prompt", too_long[:4096])  # shortened: sent
    page.press("#prompt", "Enter")
    assert tab.wait_ended() == "done" and len(tab.generated()) == 20
    assert error.is_hidden() and page.get_attribute("#prompt", "aria-invalid") is None

    # what the page itself finds wrong with a setting reads as a message about it, not as a fault of the page
    page.fill("#max-chars", "1e400")
    page.fill("#prompt", "the quick")
    page.press("#prompt", "Enter")
    assert tab.wait_ended() == "error"
    assert tab.turn().locator(".error").text_content() == "Max characters is not a number."
    assert page.get_attribute("#max-chars", "aria-invalid") == "true"


@pytest.mark.slow
@pytest.mark.parametrize("control, value, field", [("#top-p", "1.5", "top_p"), ("#max-chars", str(LONG + 1), "max_chars")])
def test_an_out_of_range_setting_shows_the_servers_message_and_the_page_keeps_working(tab, server, control, value, field):
    body = {"prompt": "the", "temperature": 0, "max_chars": 20, field: json.loads(value)}
    expected = server.post("/v1/generate", json=body).json()["error"]["message"]
    assert field in expected

    page = tab.page
    page.click("summary")  # Advanced
    page.fill("#max-chars", "20")
    page.fill(control, value)
    tab.send("the", temperature=0)
    assert tab.wait_ended() == "error"
    assert tab.turn().locator(".continue").is_hidden()  # nothing to continue
    error = tab.turn().locator(".error")
    assert error.is_visible() and expected in error.text_content()
    assert page.get_attribute(control, "aria-invalid") == "true"

    page.fill(control, "" if control == "#top-p" else "30")
    assert page.get_attribute(control, "aria-invalid") is None
    tab.send("the quick", temperature=0)
    assert tab.wait_ended() == "done"
    assert tab.generated() == continuation("the quick", 30 if control == "#max-chars" else 20)


SSE = "text/event-stream"


def events(*payloads) -> str:
    return "".join(f"data: {json.dumps(p)}\n\n" for p in payloads)


DONE = {"done": True, "id": "gen-x", "model": "run", "seed": 7, "choices": [{"index": 0, "finish_reason": "length"}],
        "usage": {"prompt_chars": 3, "completion_chars": 6, "dropped_chars": 0},
        "timings": {"queue_ms": 0, "prompt_ms": 0, "generation_ms": 1, "chars_per_second": 6000}}


@pytest.mark.slow
@pytest.mark.parametrize("failure, words", [
    ("busy", "The server is busy (every generation slot is taken). Try again in 3 s."),
    ("gone", "The server cannot be reached."),
    ("cut", "The server ended the answer early"),
])
def test_a_busy_gone_or_failing_server_is_explained_and_the_page_recovers(tab, failure, words):
    """What the browser sees of a full queue (429), a server that is down, and a stream cut short,
    made to happen on demand by intercepting the request."""

    def answer(route):
        if failure == "busy":
            error = {"error": {"message": "the server is busy", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
            route.fulfill(status=429, headers={"Retry-After": "3"}, content_type="application/json", body=json.dumps(error))
        elif failure == "gone":
            route.abort("connectionrefused")
        else:
            route.fulfill(status=200, content_type=SSE, body=events({"index": 0, "text": "the qu"}))

    page = tab.page
    page.route("**/v1/generate", answer)
    tab.send("the", temperature=0, max_chars=20)
    assert tab.wait_ended() == "error"
    assert words in tab.turn().locator(".error").text_content()
    if failure == "cut":
        assert tab.generated() == "the qu"  # what did arrive stays
    page.unroute("**/v1/generate")
    tab.send("the quick", temperature=0, max_chars=20)
    assert tab.wait_ended() == "done"
    assert tab.generated() == continuation("the quick", 20)


@pytest.mark.slow
@pytest.mark.parametrize("path, words", [
    ("/", "This server needs an API key: enter it under Advanced."),
    ("/embed", "This server needs an API key, and this embedded page cannot send one: it works only with a server that needs none."),
])
def test_a_server_that_needs_an_api_key_is_explained_in_the_pages_own_terms(browser, server, path, words):
    """The embed has no key field: it says it cannot use such a server rather than pointing to one."""
    error = {"error": {"message": "this server needs an API key", "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
    t = Tab(browser, server.url + path)
    try:
        t.page.route("**/v1/generate", lambda route: route.fulfill(status=401, content_type="application/json", body=json.dumps(error)))
        t.page.fill("#prompt", "the")
        t.page.press("#prompt", "Enter")
        assert t.wait_ended() == "error"
        assert t.turn().locator(".error").text_content() == words
    finally:
        t.close()


EVIL = "<img src=x onerror=alert(1)>"


@pytest.mark.slow
def test_markup_in_prompts_and_in_model_text_is_shown_as_text(tab):
    page = tab.page
    tab.send(EVIL, temperature=0, max_chars=20)
    assert tab.wait_ended() == "done"
    assert tab.turn().locator(".prompt-text").text_content() == EVIL
    assert EVIL in tab.turn().locator(".context").text_content()

    # The model could produce markup too (a model trained on HTML would): its text is text as well,
    # both plainly and as shaded characters.
    evil_text = "<b>x</b>" + EVIL
    logprobs = [{"char": c, "logprob": -0.5, "top": [{"char": c, "logprob": -0.5}]} for c in evil_text]
    for probabilities in (False, True):
        chunk = {"index": 0, "text": evil_text, **({"logprobs": logprobs} if probabilities else {})}
        body = events(chunk, DONE)
        page.route("**/v1/generate", lambda route: route.fulfill(status=200, content_type=SSE, body=body))
        page.set_checked("#probabilities", probabilities)
        tab.send("the", max_chars=20)
        assert tab.wait_ended() == "done"
        assert tab.generated() == evil_text
        page.unroute("**/v1/generate")
    page.wait_for_timeout(300)  # an image's onerror would have fired by now
    assert page.locator("#transcript img, #transcript b").count() == 0
    assert tab.dialogs == []


def alpha(color: str) -> float:
    """The alpha of a computed CSS color: rgba(r, g, b, a), rgb(r, g, b) or color(srgb r g b / a)."""
    numbers = [float(x) for x in re.findall(r"[\d.]+", color)]
    if color.startswith("rgba") or "/" in color:
        return numbers[-1]
    return 1.0 if color.startswith("rgb(") else 0.0


@pytest.mark.slow
def test_probabilities_shade_each_character_and_show_alternatives_on_hover(tab, server):
    settings = {"temperature": 1.4, "seed": 11, "max_chars": 60}
    reference = server.post("/v1/generate", json={"prompt": "the quick", "logprobs": 5, **settings}).json()["choices"][0]

    page = tab.page
    page.check("#probabilities")
    page.click("summary")
    page.fill("#seed", "11")
    tab.send("the quick", temperature=1.4, max_chars=60)
    assert tab.wait_ended() == "done"
    assert tab.generated() == reference["text"]

    chars = tab.turn().locator(".generated .ch")
    shown = chars.evaluate_all("spans => spans.map(s => [s.textContent, Number(s.dataset.p), getComputedStyle(s).backgroundColor])")
    assert "".join(c for c, _, _ in shown) == reference["text"]
    for (char, p, background), lp in zip(shown, reference["logprobs"]):
        assert char == lp["char"]
        assert p == pytest.approx(math.exp(lp["logprob"]), rel=1e-3)
        # the less likely, the darker (answer.js: shade)
        assert alpha(background) == pytest.approx(0.75 * (1 - p) ** 2, abs=0.01), (char, p, background)
    ps = [p for _, p, _ in shown]
    assert min(ps) < 0.8 < max(ps), "the sample should hold both sure and unsure characters"

    # hovering the least likely character shows the model's top alternatives for that position
    i = ps.index(min(ps))
    chars.nth(i).hover()
    tip = page.locator("#tip")
    assert tip.is_visible()
    rows = tip.locator("li").all_text_contents()
    top = reference["logprobs"][i]["top"]
    assert len(rows) == len(top) == 5
    for row, alt in zip(rows, top):
        shown_char = {" ": "␣ space", "\n": "↵ new line"}.get(alt["char"], alt["char"])
        assert row.startswith(shown_char)
        assert row.endswith("%")
    page.mouse.move(2, 2)
    assert tip.is_hidden()

    # from the keyboard: focus the answer, then the arrow keys walk through its characters
    tab.turn().locator(".answer").focus()
    assert tip.is_visible() and "current" in chars.nth(0).get_attribute("class")
    page.keyboard.press("ArrowRight")
    assert "current" in chars.nth(1).get_attribute("class")
    page.keyboard.press("Escape")
    assert tip.is_hidden()

    page.uncheck("#probabilities")  # plain text again: no shading
    assert alpha(chars.nth(i).evaluate("s => getComputedStyle(s).backgroundColor")) == 0


FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"  # scroll events fire meanwhile


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/", "/embed?max_chars=1500"])
def test_walking_an_answer_from_the_keyboard_scrolls_each_character_into_view(browser, server, path):
    t = Tab(browser, server.url + path, viewport={"width": 800, "height": 600})
    try:
        page = t.page
        page.check("#probabilities")
        t.send("the quick", temperature=0, max_chars=None if "embed" in path else 1500)
        assert t.wait_ended() == "done"
        page.mouse.move(0, 0)  # out of the way: a character scrolled under the pointer would take the tip
        answer, tip = t.turn().locator(".answer"), page.locator("#tip")
        chars = answer.locator(".ch")
        answer.focus()
        # where characters can be seen: the window above the composer, or the embed's own box
        view = ("() => { const r = document.getElementById('transcript').getBoundingClientRect(); return [r.top, r.bottom]; }"
                if "embed" in path else "() => [0, document.getElementById('composer').getBoundingClientRect().top]")
        for key, index, away in (("Home", 0, "1e9"), ("End", 1499, "0")):
            page.evaluate(f"document.scrollingElement.scrollTop = document.getElementById('transcript').scrollTop = {away}")
            page.keyboard.press(key)
            page.evaluate(FRAMES)
            top, bottom = page.evaluate(view)
            char = chars.nth(index).bounding_box()
            assert top - 1 <= char["y"] and char["y"] + char["height"] <= bottom + 1, (key, char, top, bottom)
            assert tip.is_visible() and "current" in chars.nth(index).get_attribute("class")
            shown = tip.bounding_box()
            assert min(abs(shown["y"] - char["y"] - char["height"]), abs(shown["y"] + shown["height"] - char["y"])) < 10, (shown, char)
        assert t.console_errors == []
    finally:
        t.close()


SHADED = "spans => spans.map(s => [s.textContent, Number(s.dataset.p), getComputedStyle(s).backgroundColor])"


@pytest.mark.slow
def test_ticking_probabilities_shades_the_answers_on_screen_and_unticking_unshades_them(tab, server):
    settings = {"temperature": 1.4, "seed": 11, "max_chars": 60}
    asks = [("the quick", settings), ("", {**settings, "seed": 12})]  # an empty prompt starts after a newline
    references = [server.post("/v1/generate", json={"prompt": prompt, "logprobs": 5, **ask}).json()["choices"][0]
                  for prompt, ask in asks]

    page = tab.page
    assert not page.is_checked("#probabilities")
    page.click("summary")
    for prompt, ask in asks:
        page.fill("#seed", str(ask["seed"]))
        tab.send(prompt, temperature=1.4, max_chars=60)
        assert tab.wait_ended() == "done"
    for k, reference in enumerate(references):
        assert tab.generated(k) == reference["text"]
        assert tab.turn(k).locator(".generated .ch").count() == 0  # written without probabilities

    page.check("#probabilities")
    for k, reference in enumerate(references):
        chars = tab.turn(k).locator(".generated .ch")
        page.wait_for_function("([k, n]) => document.querySelectorAll('.turn')[k].querySelectorAll('.generated .ch').length === n",
                               arg=[k, len(reference["text"])])
        shown = chars.evaluate_all(SHADED)
        assert tab.generated(k) == reference["text"]
        for (char, p, background), lp in zip(shown, reference["logprobs"]):
            assert char == lp["char"]
            assert p == pytest.approx(math.exp(lp["logprob"]), rel=1e-3)  # what the model gave it when writing it
            assert alpha(background) == pytest.approx(0.75 * (1 - p) ** 2, abs=0.01), (char, p, background)
        assert max(alpha(b) for _, _, b in shown) > 0.05, "some characters should be shaded"

    # the tooltip works on an answer shaded afterwards as on one written with probabilities (the last
    # answer: it is in view, and scrolling the page would close the tooltip)
    chars = tab.turn().locator(".generated .ch")
    shown = chars.evaluate_all(SHADED)
    chars.nth(min((p, i) for i, (c, p, _) in enumerate(shown) if c != "\n")[1]).hover()  # a line break has no width
    assert page.locator("#tip").is_visible() and page.locator("#tip li").count() == 5
    page.mouse.move(2, 2)

    page.uncheck("#probabilities")
    for k in range(len(references)):
        assert all(alpha(b) == 0 for _, _, b in tab.turn(k).locator(".generated .ch").evaluate_all(SHADED))
    page.check("#probabilities")
    assert max(alpha(b) for _, _, b in tab.turn(0).locator(".generated .ch").evaluate_all(SHADED)) > 0.05
    assert tab.console_errors == []


@pytest.mark.slow
def test_keyboard_alone_sends_regenerates_and_continues(tab):
    page, keyboard = tab.page, tab.page.keyboard
    for _ in range(10):  # from the top of the page to the prompt
        keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "prompt":
            break
    assert page.evaluate("document.activeElement.id") == "prompt"
    keyboard.type("the quick")
    keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "temperature"
    keyboard.press("Home")  # the slider's minimum: greedy
    assert page.text_content("#temperature-value") == "0 (greedy)"
    keyboard.press("Shift+Tab")
    keyboard.press("Enter")  # Send
    assert tab.wait_ended() == "done"
    assert tab.generated() == continuation("the quick", 200)

    assert page.evaluate("document.activeElement.id") == "prompt"  # ready for the next prompt
    keyboard.press("Shift+Tab")  # Copy
    keyboard.press("Shift+Tab")  # Continue
    assert page.evaluate("document.activeElement.textContent") == "Continue"
    keyboard.press("Enter")
    assert tab.wait_ended() == "done"
    assert tab.generated() == continuation("the quick", 400)

    keyboard.press("Shift+Tab")
    keyboard.press("Shift+Tab")
    keyboard.press("Shift+Tab")  # Regenerate
    assert page.evaluate("document.activeElement.textContent") == "Regenerate"
    keyboard.press("Enter")
    assert tab.wait_ended() == "done"
    assert tab.generated() == continuation("the quick", 200)
    assert page.locator(".turn").count() == 1


DEFAULTS = {"temperature": 0.3, "max_chars": 25, "top_k": 5, "top_p": 0.9}  # none of them the built-in one


@pytest.fixture(scope="module")
def defaults_server(tiny_artifact, browser):
    env = {f"CHARGEN_DEFAULT_{name.upper()}": str(value) for name, value in DEFAULTS.items()}
    with running_server(tiny_artifact, env=env) as s:
        yield s


def sent(tab: Tab, prompt: str = "the quick") -> dict:
    """The body of the request the page sends for `prompt`, once its answer has ended."""
    with tab.page.expect_request("**/v1/generate") as request:
        tab.page.fill("#prompt", prompt)
        tab.page.press("#prompt", "Enter")
    assert tab.wait_ended() == "done"
    return request.value.post_data_json


@pytest.mark.slow
@pytest.mark.parametrize("path, query, expected", [
    ("/", "", DEFAULTS),
    ("/embed", "", {"temperature": 0.3}),  # no other controls: the server's defaults apply
    ("/", "?temperature=3&max_chars=7", {**DEFAULTS, "temperature": 3, "max_chars": 7}),  # presets win; 3 widens the slider
    ("/embed", "?max_chars=7&top_k=2", {"temperature": 0.3, "max_chars": 7, "top_k": 2}),
    # presets that are no number (no whole number, for max_chars and top_k), or out of the server's bounds, are dropped
    ("/embed", "?max_chars=abc&top_k=1.5&top_p=&temperature=-1", {"temperature": 0.3}),
    ("/", "?max_chars=abc&top_k=1.5&top_p=7", DEFAULTS),
    ("/embed", "?max_chars=0x10&top_k=-5&top_p=7", {"temperature": 0.3}),  # decimal notation only: not hex
    ("/", "?temperature=1e9&max_chars=7", {**DEFAULTS, "max_chars": 7}),
])
def test_the_page_starts_from_the_servers_defaults_unless_the_query_string_presets_them(browser, defaults_server, path, query, expected):
    t = Tab(browser, defaults_server.url + path + query)
    try:
        shown = {"temperature": float(t.page.input_value("#temperature"))}
        if path == "/":
            shown.update({name: float(t.page.input_value(f"#{name.replace('_', '-')}")) for name in ("max_chars", "top_k", "top_p")})
        assert shown == {k: v for k, v in expected.items() if k in shown}
        assert t.page.text_content("#temperature-value") == f"{expected['temperature']:.2f}"
        assert float(t.page.get_attribute("#temperature", "max")) == max(2, expected["temperature"])  # widened only as needed
        body = sent(t)
        assert {k: v for k, v in body.items() if k in DEFAULTS} == expected
        assert len(t.generated()) == expected.get("max_chars", DEFAULTS["max_chars"])  # the server applied the rest
        assert t.console_errors == []
    finally:
        t.close()


NUMERIC = ("temperature", "max_chars", "top_k", "top_p", "min_p", "repetition_penalty", "repetition_window",
           "presence_penalty", "frequency_penalty")  # the settings a query string may preset


def presets_at_the_bounds(info: dict) -> dict[str, str]:
    """A preset for each setting at the edge of what the server takes (/info's bounds and limits)."""
    bounds, penalty = info["bounds"], info["bounds"]["max_penalty"]
    return {"temperature": f"{bounds['max_temperature']:g}", "max_chars": "5", "top_k": "0", "top_p": "1", "min_p": "0",
            "repetition_penalty": f"{bounds['max_repetition_penalty']:g}", "repetition_window": str(bounds["max_repetition_window"]),
            "presence_penalty": f"{-penalty:g}", "frequency_penalty": f"{penalty:g}"}


def presets_beyond_the_bounds(info: dict) -> dict[str, str]:
    """A preset for each setting that the server would refuse (422): out of its bounds, not whole, not decimal."""
    bounds, penalty = info["bounds"], info["bounds"]["max_penalty"]
    return {"temperature": f"{bounds['max_temperature'] + 0.5:g}", "max_chars": str(info["limits"]["max_chars"] + 1),
            "top_k": str(bounds["max_top_k"] + 1), "top_p": "0", "min_p": "1.5", "repetition_penalty": "0",
            "repetition_window": "2.5", "presence_penalty": f"{-penalty - 0.5:g}", "frequency_penalty": "0x1"}


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/", "/embed"])
@pytest.mark.parametrize("kept", [True, False], ids=["at-the-bounds", "beyond-them"])
def test_every_numeric_preset_is_held_to_the_servers_bounds(browser, defaults_server, path, kept):
    info = defaults_server.get("/info").json()
    presets = (presets_at_the_bounds if kept else presets_beyond_the_bounds)(info)
    t = Tab(browser, defaults_server.url + path + "?" + "&".join(f"{k}={v}" for k, v in presets.items()))
    try:
        body = sent(t)  # the server took it
        if kept:
            expected = {name: float(value) for name, value in presets.items()}
        elif path == "/":
            expected = {name: info["defaults"][name] for name in NUMERIC}  # the controls show the server's defaults
        else:
            expected = {"temperature": info["defaults"]["temperature"]}  # the slider's; the server applies the rest
        assert {k: v for k, v in body.items() if k in NUMERIC} == expected
        assert t.console_errors == []
    finally:
        t.close()


@pytest.mark.slow
def test_the_embed_works_in_an_iframe_of_an_allowed_site_and_is_refused_elsewhere(browser, server, sites):
    allowed, other = sites
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(allowed.url + "/")
        frame = page.frame_locator("iframe")
        frame.locator("#model").filter(has_text="×").wait_for()
        frame.locator("#temperature").fill("0")
        frame.locator("#prompt").fill("the quick")
        frame.locator("#prompt").press("Enter")
        frame.locator(".turn[data-state=done]").wait_for()
        assert frame.locator(".generated").text_content() == continuation("the quick", 200)
        assert "length" in frame.locator(".finish").text_content()

        refused = context.new_page()
        with refused.expect_event("requestfailed", lambda r: r.url == server.url + "/embed") as failed:
            refused.goto(other.url + "/")
        assert failed.value.failure == "net::ERR_BLOCKED_BY_RESPONSE"
        assert refused.frame_locator("iframe").locator("#prompt").count() == 0
    finally:
        context.close()


@pytest.mark.slow
def test_screenshots_at_desktop_and_phone_width_in_light_and_dark(browser, tiny_artifact, tmp_path):
    """What scripts/screenshots does with the shipped model, with the tiny one into tmp_path (tests
    never write into the tree); checks the layout fits a phone's width and the colour schemes."""
    tracked = {p: p.read_bytes() for p in (ROOT / "docs").glob("*.png")}
    with running_server(tiny_artifact) as s:
        paths = screenshots(browser, s.url, tmp_path, "the quick")
    assert [p.name for p in paths] == ["screenshot-desktop.png", "screenshot-mobile.png", "screenshot-dark.png"]
    assert {p: p.read_bytes() for p in (ROOT / "docs").glob("*.png")} == tracked


# ---------------------------------------------------------------- several models


@pytest.fixture(scope="module")
def two_models(tiny_artifact, other_artifact, browser):
    """`run` (the default: PERIODIC) and `jugs` (OTHER)."""
    with running_server(tiny_artifact, env={"CHARGEN_MODELS": f"jugs={other_artifact}"}) as s:
        yield s


def answer(tab: Tab, max_chars: int | None = 30) -> tuple[str, dict]:
    """Send a newline greedily (for 30 characters; the embed: as its URL presets): the text and the request's body."""
    with tab.page.expect_request("**/v1/generate") as request:
        tab.send("\n", temperature=0, max_chars=max_chars)
    assert tab.wait_ended() == "done"
    return tab.generated(), request.value.post_data_json


@pytest.mark.slow
def test_the_model_picker_shows_each_model_and_the_answer_comes_from_the_one_picked(browser, two_models):
    cards = {c["id"]: c for c in two_models.get("/v1/models").json()["data"]}
    t = Tab(browser, two_models.url + "/")
    try:
        page = t.page
        assert page.is_visible("#model-picker") and page.input_value("#model-picker") == "run"
        labels = page.locator("#model-picker option").all_text_contents()
        assert [label.split(" · ")[0] for label in labels] == ["run", "jugs"]
        for label, card in zip(labels, cards.values()):
            assert card["corpus"] in label and "parameters" in label
            assert f"{card['bits_per_char']:.2f} bits/char" in label
        assert page.text_content("#model").startswith("run · LSTM 1×32")
        assert f"{cards['run']['corpus_chars']:,} characters" in page.text_content("#model-details")
        page.select_option("#model-picker", "jugs")
        assert page.text_content("#model").startswith("jugs · ")
        assert f"{cards['jugs']['corpus_chars']:,} characters" in page.text_content("#model-details")
        page.select_option("#model-picker", "run")

        text, body = answer(t)  # (the intro with the details goes with the first turn)
        assert text == PERIODIC[:30] and body["model"] == "run"
        page.select_option("#model-picker", "jugs")
        assert page.text_content("#model").startswith("jugs · ")
        text, body = answer(t)
        assert text == OTHER[:30] and body["model"] == "jugs"
        assert t.turn().locator(".seed").text_content().endswith("· jugs")
        t.turn(0).locator(".regenerate").click()  # a turn regenerated now uses the model picked now
        t.page.wait_for_function("() => document.querySelector('.turn').dataset.state === 'done'")
        assert t.generated(0) == OTHER[:30]
        assert t.console_errors == []
    finally:
        t.close()
    phone = Tab(browser, two_models.url + "/", viewport={"width": 360, "height": 640})
    try:
        assert phone.page.is_visible("#model-picker")
        assert phone.page.evaluate("document.documentElement.scrollWidth <= innerWidth"), "the picker is wider than a 360 px phone"
    finally:
        phone.close()


@pytest.mark.slow
def test_the_embed_presets_the_model_from_its_query_string(browser, two_models):
    t = Tab(browser, two_models.url + "/embed?model=jugs&max_chars=30")
    try:
        assert t.page.input_value("#model-picker") == "jugs" and t.page.text_content("#model").startswith("jugs · ")
        text, body = answer(t, None)
        assert text == OTHER[:30] and body["model"] == "jugs"
        assert t.console_errors == []
    finally:
        t.close()
    t = Tab(browser, two_models.url + "/embed?model=nope&max_chars=30")
    try:
        assert t.page.input_value("#model-picker") == "run"
        assert t.page.is_visible("#model-note")
        assert t.page.text_content("#model-note") == "There is no model “nope” here; this is run."
        assert answer(t, None)[0] == PERIODIC[:30]
    finally:
        t.close()
