"""The page's Format control (service/static/format.js) in headless Chromium against the real gunicorn
and conftest's tiny model: the ready examples offered are those the model's vocabulary can write, an
example gives an answer that matches it, a grammar works as a regex does, the probabilities shown are
those after the mask, and a pattern the server refuses shows its message under the box."""

from __future__ import annotations

import re

import pytest

from browser import Tab
from conftest import PERIODIC
from server import running_server

pytestmark = pytest.mark.slow  # Chromium and a real gunicorn

OFFERED = "() => document.querySelectorAll('#format-example option').length > 1"


@pytest.fixture(scope="module")
def server(tiny_artifact, browser):
    with running_server(tiny_artifact) as s:
        yield s


@pytest.fixture
def tab(browser, server):
    t = Tab(browser, server.url + "/")
    t.page.click("#format summary")
    yield t
    t.close()


def test_an_example_the_model_can_write_gives_an_answer_that_matches_it(tab):
    page = tab.page
    page.wait_for_function(OFFERED)
    offered = page.eval_on_selector_all("#format-example option", "options => options.map(o => o.value)")
    # the tiny model writes lowercase text only: the examples that need capitals (a speaker, an
    # acrostic, a name) are not offered
    assert offered == ["", "fourteen"]
    page.select_option("#format-example", "fourteen")
    assert page.input_value("#format-kind") == "regex" and page.input_value("#format-pattern") == r"(.{10,60}\n){14}"
    assert page.input_value("#max-chars") == "900"  # enough for a whole match
    tab.send("", temperature=0)
    assert tab.wait_ended() == "done"
    text = tab.generated()
    assert re.fullmatch(r"(.{10,60}\n){14}", text) and text == PERIODIC * 14  # greedy: the lines the model knows
    assert tab.turn().locator(".finish").text_content() == "finish: stop (the format is complete)"  # no stop sequence
    assert tab.console_errors == []


def test_an_answer_cut_by_max_characters_says_its_format_was_not_finished(tab):
    page = tab.page
    page.fill("#format-pattern", "[a-z ]{50}")
    tab.send("the quick", temperature=0, max_chars=10)
    assert tab.wait_ended() == "done" and len(tab.generated()) == 10
    assert tab.turn().locator(".finish").text_content() == "finish: length (reached max characters; the format was not finished)"


def test_a_grammar_and_the_probabilities_after_the_mask(tab):
    page = tab.page
    page.select_option("#format-kind", "grammar")
    page.fill("#format-pattern", 'root ::= [aeiou]{6} "\\n"')
    page.check("#probabilities")
    tab.send("the quick", temperature=1)
    assert tab.wait_ended() == "done"
    assert re.fullmatch("[aeiou]{6}\n", tab.generated())
    # every alternative the tooltip would show is one the grammar allowed there
    alternatives = tab.turn().locator(".generated .ch").evaluate_all(
        "spans => spans.map(s => (s.top || []).filter(a => a.logprob > -1e9).map(a => a.char).join(''))")
    assert len(alternatives) == 7 and all(set(a) <= set("aeiou") for a in alternatives[:6]) and alternatives[6] == "\n"
    assert tab.console_errors == []


def luminance(colour: str) -> float:
    """WCAG's relative luminance of a computed "rgb(r, g, b)"."""
    channels = [float(x) / 255 for x in re.findall(r"[\d.]+", colour)[:3]]
    r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_the_format_selects_are_readable_in_dark_mode_and_stay_in_their_fields(browser, server):
    t = Tab(browser, server.url + "/", color_scheme="dark")
    try:
        page = t.page
        page.click("#format summary")
        page.wait_for_function(OFFERED)  # the longest label is in the list
        for select in ("#format-example", "#format-kind"):
            text, background = page.locator(select).evaluate("s => [getComputedStyle(s).color, getComputedStyle(s).backgroundColor]")
            assert background.startswith("rgb("), background  # a background of its own, not the page's through it
            lighter, darker = sorted((luminance(text), luminance(background)), reverse=True)
            assert (lighter + 0.05) / (darker + 0.05) >= 4.5, (select, text, background)
        example, kind = page.locator("#format-example").bounding_box(), page.locator("#format-kind").bounding_box()
        assert example["x"] + example["width"] <= kind["x"], (example, kind)
    finally:
        t.close()


@pytest.mark.parametrize("kind, pattern, says", [
    ("regex", "(a|b", "regex is malformed"),
    ("regex", "[A-Z]+ dog", "needs characters the model's vocabulary lacks: 'A'"),
    ("grammar", "root ::= missing", "grammar is malformed"),
])
def test_a_pattern_the_server_refuses_shows_its_message_under_the_box(tab, kind, pattern, says):
    page = tab.page
    page.select_option("#format-kind", kind)
    page.fill("#format-pattern", pattern)
    tab.send("the quick")
    assert tab.wait_ended() == "error"
    error = page.locator("#format-error")
    assert error.is_visible() and says in error.text_content() and error.text_content().startswith(f"{kind} ")
    assert page.get_attribute("#format-pattern", "aria-invalid") == "true"
    assert tab.generated() == ""  # refused before anything was generated
    page.fill("#format-pattern", "[a-z ]{3}")  # editing the pattern clears the message
    assert page.is_hidden("#format-error") and page.get_attribute("#format-pattern", "aria-invalid") is None
    page.select_option("#format-kind", "regex")
    tab.send("the quick")
    assert tab.wait_ended() == "done" and re.fullmatch("[a-z ]{3}", tab.generated())
