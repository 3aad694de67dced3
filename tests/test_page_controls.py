"""The page's Advanced panel: the sampling controls (min-p, the repetition, presence and frequency
penalties, character biases) start from the server's defaults, go into the request, and change the
answer; a bias the page cannot read is explained at its control. Headless Chromium, real gunicorn."""

from __future__ import annotations

import json

import pytest

from browser import Tab
from server import continuation, running_server

pytestmark = pytest.mark.slow  # Chromium and real gunicorn

CONTROLS = {"#min-p": "min_p", "#repetition-penalty": "repetition_penalty", "#repetition-window": "repetition_window",
            "#presence-penalty": "presence_penalty", "#frequency-penalty": "frequency_penalty"}


@pytest.fixture(scope="module")
def server(tiny_artifact, browser):
    with running_server(tiny_artifact) as s:
        yield s


def test_the_advanced_controls_start_at_the_servers_defaults_and_reach_the_request(browser, server):
    defaults = server.get("/info").json()["defaults"]
    t = Tab(browser, server.url + "/")
    try:
        page = t.page
        page.click("summary")  # Advanced
        for control, field in CONTROLS.items():
            assert float(page.input_value(control)) == defaults[field], control
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/generate") else None)
        page.fill("#repetition-penalty", "1.5")
        page.fill("#frequency-penalty", "0.25")
        page.fill("#logit-bias", "z=100\n\\n=-3")
        t.send("the quick", temperature=0, max_chars=20)
        assert t.wait_ended() == "done"
        assert t.generated() == "z" * 20  # +100 forces it
        body = sent[-1]
        assert body["repetition_penalty"] == 1.5 and body["frequency_penalty"] == 0.25
        assert body["logit_bias"] == {"z": 100, "\n": -3} and body["repetition_window"] == defaults["repetition_window"]

        page.fill("#logit-bias", "z 100")  # not character=bias
        t.send("the quick", temperature=0, max_chars=20)
        assert t.wait_ended() == "error"
        assert "is not character=bias" in t.turn().locator(".error").text_content()
        assert page.get_attribute("#logit-bias", "aria-invalid") == "true"
        page.fill("#logit-bias", "")
        page.fill("#repetition-penalty", "1")
        page.fill("#frequency-penalty", "0")
        t.send("the quick", temperature=0, max_chars=20)
        assert t.wait_ended() == "done" and t.generated() == continuation("the quick", 20)
        assert not t.console_errors, t.console_errors
    finally:
        t.close()
