"""The page's Inside view (service/static/inside.js over POST /v1/inspect), the way a person uses it:
headless Chromium against the real gunicorn server and conftest's tiny LSTM (1x32, which has learned
PERIODIC). What the page shows is checked against what the API answers for the same text."""

from __future__ import annotations

import json
import math
import re

import pytest

from browser import PHONE, Tab, inside_screenshot
from conftest import PERIODIC, train_tiny
from server import ROOT, continuation, running_server

pytestmark = pytest.mark.slow  # Chromium and real gunicorn

RANKED = re.compile(r"^layer \d+, cell \d+( \(cell state\))?: .+, r = −?\d\.\d\d$")
COLOURS = "spans => spans.map(s => getComputedStyle(s).backgroundColor)"


@pytest.fixture(scope="module")
def server(tiny_artifact, browser):
    with running_server(tiny_artifact) as s:
        yield s


@pytest.fixture
def tab(browser, server):
    t = Tab(browser, server.url + "/")
    yield t
    t.close()


def rgba(colour: str) -> tuple[float, float, float, float]:
    """getComputedStyle's "rgb(r, g, b)" or "rgba(r, g, b, a)" as numbers."""
    values = [float(x) for x in re.findall(r"[\d.]+", colour)]
    return (*values[:3], values[3] if len(values) > 3 else 1.0)


def reply_inside(tab: Tab, prompt: str = "the quick", chars: int = 60, embed: bool = False) -> str:
    """Generate greedily, open the reply's Inside view and wait until it is drawn; the text it read.
    (The embed has no max-characters control: its URL presets `chars`.)"""
    tab.send(prompt, temperature=0, max_chars=None if embed else chars)
    assert tab.wait_ended() == "done"
    assert tab.generated() == continuation(prompt, chars)
    # each reply's button is named for its reply, the header's for a text of one's own (screen readers list them)
    assert tab.page.get_by_role("button", name="Look inside this reply", exact=True).count() == 1
    assert tab.page.get_by_role("button", name="Look inside a text of your own", exact=True).count() == (0 if embed else 1)
    tab.turn().get_by_role("button", name="Look inside this reply", exact=True).click()
    tab.page.locator("#inside-view").wait_for(state="visible")
    return prompt + continuation(prompt, chars)


def inspected(server, text: str, layer: int = 1) -> dict:
    answer = server.post("/v1/inspect", json={"text": text, "layers": [layer], "cells": 3})
    assert answer.status_code == 200, answer.text
    return answer.json()


def best(ranking: list[dict]) -> dict:
    return max((c for f in ranking for c in f["cells"]), key=lambda c: abs(c["r"]))


def check_colours(colours: list[str], values: list[float]):
    """Red above zero, blue below, as strong as the value (inside.js: colourChars)."""
    assert len(colours) == len(values)
    for colour, v in zip(colours, values):
        r, g, b, a = rgba(colour)
        assert a == pytest.approx(0.8 * min(1.0, abs(v)), abs=0.01), (colour, v)
        if abs(v) > 0.05:
            assert (r > b) == (v > 0), (colour, v)


def test_a_reply_opens_coloured_by_the_best_ranked_cell_and_another_cell_recolours_it(tab, server):
    text = reply_inside(tab)
    page = tab.page
    assert page.locator("#inside").evaluate("d => d.open")
    chars = page.locator("#inside-chars .ch")
    assert "".join(chars.all_text_contents()) == text

    answer = inspected(server, text)
    top = best(answer["ranking"])
    quantity = top.get("quantity", "hidden")
    assert page.input_value("#inside-layer") == str(top["layer"]) and page.input_value("#inside-cell") == str(top["cell"])
    assert page.input_value("#inside-colour") == quantity

    # the ranked list: one button per ranked cell, in the words of the API's labels
    buttons = page.locator("#inside-ranking button")
    labels = buttons.all_text_contents()
    assert len(labels) == sum(len(f["cells"]) for f in answer["ranking"]) > 0
    assert all(RANKED.match(label) for label in labels), labels
    for feature in answer["ranking"]:
        assert sum(feature["label"] in label for label in labels) >= len(feature["cells"]), feature
    assert page.locator("#inside-ranking button[aria-pressed=true]").count() >= 1

    full = server.post("/v1/inspect", json={"text": text, "layers": [1]}).json()["layers"][0]

    def column(name, cell):  # the cell's values over the text, on the colour scale (the cell state through tanh)
        return [math.tanh(row[cell]) if name == "cell" else row[cell] for row in full[name]]

    first = chars.evaluate_all(COLOURS)
    check_colours(first, column(quantity, top["cell"]))

    other = (top["cell"] + 1) % answer["units"]
    page.fill("#inside-cell", str(other))
    page.press("#inside-cell", "Enter")
    page.wait_for_function(f"() => document.getElementById('inside-picked').textContent.includes('cell {other} ')")
    second = chars.evaluate_all(COLOURS)
    assert second != first
    check_colours(second, column(quantity, other))

    page.fill("#inside-cell", "99")  # beyond the layer's 32 cells: said at the control, the colours stay
    page.press("#inside-cell", "Enter")
    assert page.text_content("#inside-error") == "Cell is a whole number from 0 to 31."
    assert page.get_attribute("#inside-cell", "aria-invalid") == "true" and chars.evaluate_all(COLOURS) == second
    page.fill("#inside-cell", str(other))
    page.press("#inside-cell", "Enter")

    page.select_option("#inside-colour", "hidden")
    page.wait_for_function("() => document.getElementById('inside-picked').textContent.includes('hidden state')")
    check_colours(chars.evaluate_all(COLOURS), column("hidden", other))
    assert tab.console_errors == []


HEAT = """canvas => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const pixels = [];
  for (let i = 0; i < data.length; i += 4) pixels.push([data[i], data[i + 1], data[i + 2]]);
  return {width: canvas.width, height: canvas.height, pixels};
}"""


def test_the_heatmap_draws_the_layers_gates_and_a_click_picks_a_cell(tab, server):
    text = reply_inside(tab)
    page = tab.page
    full = server.post("/v1/inspect", json={"text": text, "layers": [1]}).json()["layers"][0]
    T, H = len(full["hidden"]), len(full["hidden"][0])
    assert page.input_value("#inside-map-quantity") == "input"  # the first gate

    def drawn(name):
        page.select_option("#inside-map-quantity", name)
        heat = page.locator("#inside-map-heat").evaluate(HEAT)
        assert (heat["width"], heat["height"]) == (T, H)
        values = full["gates"][name]
        for u in range(H):
            for t in range(T):
                r, _, b = heat["pixels"][u * T + t]
                v = values[t][u] * 2 - 1 if name != "candidate" else values[t][u]  # gates 0..1 stretched to -1..1
                if abs(v) > 0.2:
                    assert (r > b) == (v > 0), (name, t, u, values[t][u], (r, b))
        assert "Heatmap of layer 1" in page.get_attribute("#inside-map-heat", "aria-label")
        return heat["pixels"]

    forget = drawn("forget")
    assert len(set(map(tuple, forget))) > 20  # a picture, not a blank
    assert drawn("output") != forget
    drawn("candidate")

    # a click on a row picks that cell, whose row is then marked
    heat = page.locator("#inside-map-heat")
    rows = heat.bounding_box()["height"] / H
    heat.click(position={"x": 5, "y": rows * 7 + rows / 2})
    page.wait_for_function("() => document.getElementById('inside-cell').value === '7'")
    box, mark = heat.bounding_box(), page.locator("#inside-map-mark").bounding_box()
    assert mark["y"] == pytest.approx(box["y"] + rows * 7, abs=1)


def test_hover_shows_the_cells_gates_and_the_models_guesses_and_the_keyboard_reaches_everything(tab, server):
    text = reply_inside(tab)
    page, keyboard = tab.page, tab.page.keyboard
    answer = server.post("/v1/inspect", json={"text": text}).json()
    layer = answer["layers"][0]
    cell = int(page.input_value("#inside-cell"))

    chars = page.locator("#inside-chars .ch")
    t = 12
    chars.nth(t).hover()
    tip = page.locator("#inside-tip")
    assert tip.is_visible()
    assert f"(character {t + 1}): layer 1, cell {cell}" in tip.locator(".tip-head").text_content()
    gates, guesses = tip.locator("ol").nth(0), tip.locator("ol").nth(1)
    shown = dict(gates.locator("li").evaluate_all(
        "rows => rows.map(r => [r.querySelector('.alt-char').textContent, r.querySelector('.alt-p').textContent])"))
    expected = {"hidden state": layer["hidden"], "cell state": layer["cell"], **layer["gates"]}
    assert set(shown) == set(expected)
    for name, values in expected.items():  # float16 on the page, rounded to 2 decimals
        assert float(shown[name].replace("−", "-")) == pytest.approx(values[t][cell], abs=0.006), (name, shown[name])
    rows = guesses.locator("li").all_text_contents()
    top = answer["next"][t]["top"]
    assert len(rows) == len(top) == 5
    for row, (char, _) in zip(rows, top):
        assert row.startswith({" ": "␣ space", "\n": "↵ new line"}.get(char, char))
    assert guesses.locator("li.picked").count() == (1 if answer["next"][t]["char"] in [c for c, _ in top] else 0)

    # the keyboard: every control is reached with Tab, in order, from the text box to Close
    page.focus("#inside-text")
    order = []
    for _ in range(60):
        keyboard.press("Tab")
        focused = page.evaluate("document.activeElement.id || document.activeElement.textContent")
        if focused in order:
            break
        order.append(focused)
    for wanted in ("inside-run", "inside-layer", "inside-cell", "inside-colour", "inside-chars", "inside-map-quantity", "inside-close"):
        assert wanted in order, (wanted, order)
    assert any(RANKED.match(f) for f in order), order
    assert order.index("inside-cell") < order.index("inside-chars") < order.index("inside-map-quantity")

    # in the text: the arrows walk the characters and pick the neighbouring cell
    page.focus("#inside-chars")
    assert tip.is_visible() and "(character 1)" in tip.text_content()
    keyboard.press("ArrowRight")
    keyboard.press("ArrowRight")
    assert "(character 3)" in tip.text_content() and "current" in chars.nth(2).get_attribute("class")
    key, neighbour = ("ArrowDown", cell + 1) if cell + 1 < answer["units"] else ("ArrowUp", cell - 1)
    keyboard.press(key)
    page.wait_for_function(f"() => document.getElementById('inside-cell').value === '{neighbour}'")
    assert f"cell {neighbour}" in tip.text_content() and "(character 3)" in tip.text_content()
    keyboard.press("Escape")  # the tip first
    assert tip.is_hidden() and page.locator("#inside").evaluate("d => d.open")
    keyboard.press("Escape")  # then the dialog
    assert not page.locator("#inside").evaluate("d => d.open")
    assert tab.console_errors == []


def test_pasted_text_and_the_servers_refusal_shown_in_the_view(tab, server):
    page = tab.page
    asked = []
    page.on("request", lambda r: asked.append(r.post_data_json) if r.url.endswith("/v1/inspect") else None)
    page.click("#inside-open")  # the header's Look inside: a text box to paste into
    assert page.locator("#inside").evaluate("d => d.open")
    page.wait_for_function("() => document.activeElement.id === 'inside-text'")

    too_long = "the quick brown fox " * 201  # 4,020 characters: over the 4,000 the server reads
    assert server.get("/info").json()["limits"]["max_inspect_chars"] == 4000
    assert server.post("/v1/inspect", json={"text": too_long}).status_code == 422
    page.fill("#inside-text", too_long)
    page.click("#inside-run")
    error = page.locator("#inside-error")
    error.wait_for(state="visible")
    assert "4,020 characters" in error.text_content() and "at most 4,000" in error.text_content()
    assert page.get_attribute("#inside-text", "aria-invalid") == "true"
    assert page.is_hidden("#inside-view") and asked == []  # refused before it was sent

    page.fill("#inside-text", "###")  # no character the model knows: nothing to read
    page.click("#inside-run")
    page.wait_for_function("() => document.getElementById('inside-error').textContent.includes('vocabulary')")
    assert page.is_hidden("#inside-view")

    page.fill("#inside-text", PERIODIC_PASTE)
    page.click("#inside-run")
    page.locator("#inside-view").wait_for(state="visible")
    assert page.is_hidden("#inside-error") and page.get_attribute("#inside-text", "aria-invalid") is None
    assert "".join(page.locator("#inside-chars .ch").all_text_contents()) == PERIODIC_PASTE
    assert "80 characters read" in page.text_content("#inside-status")

    # a server that fails is explained in the view too
    page.route("**/v1/inspect", lambda route: route.fulfill(status=503, body="{}", content_type="application/json"))
    page.click("#inside-run")
    error.wait_for(state="visible")
    assert "still loading" in error.text_content()


FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"  # scroll events fire meanwhile


def test_a_reply_over_what_inside_reads_is_read_from_its_end_and_the_keyboard_walk_scrolls_to_each_character(tab, server):
    limit = server.get("/info").json()["limits"]["max_inspect_chars"]
    page = tab.page
    tab.send((PERIODIC * 100)[:limit - 20], temperature=0, max_chars=60)  # prompt and answer: 40 over the limit
    assert tab.wait_ended() == "done"
    text = (PERIODIC * 100)[:limit - 20] + tab.generated()
    tab.turn().get_by_role("button", name="Look inside").click()
    page.locator("#inside-view").wait_for(state="visible")
    assert page.is_hidden("#inside-error")
    chars = page.locator("#inside-chars .ch")
    assert chars.count() == limit and "".join(chars.all_text_contents()) == text[-limit:]
    note = page.locator("#inside-note")
    assert note.is_visible() and f"shows the last {limit:,} characters" in note.text_content()

    # the characters walked to from the keyboard are scrolled into the text's box, the tip beside them
    page.mouse.move(0, 0)  # out of the way: a character scrolled under the pointer would take the tip
    page.focus("#inside-chars")
    box = page.locator("#inside-chars").bounding_box()
    tip = page.locator("#inside-tip")
    for key, t in (("End", limit - 1), ("Home", 0)):
        page.keyboard.press(key)
        page.evaluate(FRAMES)
        char = chars.nth(t).bounding_box()
        assert box["y"] <= char["y"] and char["y"] + char["height"] <= box["y"] + box["height"], (key, char, box)
        assert tip.is_visible() and f"(character {t + 1})" in tip.text_content()
        shown = tip.bounding_box()
        assert min(abs(shown["y"] - char["y"] - char["height"]), abs(shown["y"] + shown["height"] - char["y"])) < 10, (shown, char)
    assert tab.console_errors == []


PERIODIC_PASTE = ("the lazy dog.\nthe quick brown fox jumps over the lazy dog.\nthe quick brown fox jumps "
                  "over")[:80]


@pytest.fixture(scope="module")
def gru_server(tmp_path_factory, browser):
    """A two-layer GRU: other gates, no cell state, and a second layer to pick."""
    artifact = train_tiny(tmp_path_factory.mktemp("gru") / "run", PERIODIC * 30, cell="gru", layers=2, units=16, epochs=3)
    with running_server(artifact) as s:
        yield s


def test_a_gru_shows_its_own_gates_reads_another_layer_and_asks_in_pieces_when_told_too_large(browser, gru_server):
    t = Tab(browser, gru_server.url + "/")
    try:
        page = t.page
        asked = []  # the arrays per request; above 2 the server's too_large is played, as a long text would get it
        failing = []  # while not empty, the server answers 503

        def bound(route):
            if failing:
                return route.fulfill(status=503, body="{}", content_type="application/json")
            body = route.request.post_data_json
            quantities = body.get("quantities", [])
            arrays = len(quantities) - ("gates" in quantities) + len(body.get("gates", []))
            asked.append(arrays)
            if arrays > 2:
                error = {"message": "the answer would hold too many values", "type": "invalid_request_error", "param": None, "code": "too_large"}
                route.fulfill(status=422, body=json.dumps({"error": error}), content_type="application/json")
            else:
                route.continue_()

        page.route("**/v1/inspect", bound)
        page.click("#inside-open")
        page.fill("#inside-text", PERIODIC_PASTE)
        page.click("#inside-run")
        page.locator("#inside-view").wait_for(state="visible")
        assert max(asked) > 2 and "too many" not in page.text_content("#inside")  # refused, then asked again in pieces
        refused = len([a for a in asked if a > 2])
        assert page.locator("#inside-layer option").all_text_contents() == ["1", "2"]
        assert page.locator("#inside-colour option").evaluate_all("os => os.map(o => o.value)") == ["hidden"]
        assert page.locator("#inside-map-quantity option").evaluate_all("os => os.map(o => o.value)") == ["hidden", "update", "reset", "candidate"]
        # the candidate is a tanh value, not a gate: named so, and counted near -1 and near 1
        assert page.locator("#inside-map-quantity option").all_text_contents() == ["hidden state", "update gate", "reset gate", "candidate"]
        assert page.text_content("#inside-saturation-kind") == "Gate"
        rows = page.locator("#inside-saturation tr").evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.textContent))")
        assert [name for _, name, _, _ in rows] == ["update", "reset", "candidate (tanh)"] * 2
        for _, name, low, high in rows:
            assert low.endswith("near −1" if name == "candidate (tanh)" else "near 0") and high.endswith("near 1"), (name, low, high)

        # the other layer cannot be read: the view says so and stays on the layer it shows
        shown_layer = page.input_value("#inside-layer")
        failing.append(True)
        page.select_option("#inside-layer", "2" if shown_layer == "1" else "1")
        page.locator("#inside-error").wait_for(state="visible")
        assert "still loading" in page.text_content("#inside-error")
        assert page.input_value("#inside-layer") == shown_layer
        failing.clear()

        full = gru_server.post("/v1/inspect", json={"text": PERIODIC_PASTE}).json()["layers"]
        for layer in (1, 2):
            page.select_option("#inside-layer", str(layer))
            page.fill("#inside-cell", "5")
            page.press("#inside-cell", "Enter")
            page.wait_for_function(f"() => document.getElementById('inside-picked').textContent.startsWith('layer {layer}, cell 5 ')")
            check_colours(page.locator("#inside-chars .ch").evaluate_all(COLOURS), [row[5] for row in full[layer - 1]["hidden"]])
            page.locator("#inside-chars .ch").nth(3).hover()
            tip = page.locator("#inside-tip ol").nth(0)
            shown = dict(tip.locator("li").evaluate_all(
                "rows => rows.map(r => [r.querySelector('.alt-char').textContent, r.querySelector('.alt-p').textContent])"))
            assert set(shown) == {"hidden state", "update", "reset", "candidate"}
            assert float(shown["update"].replace("−", "-")) == pytest.approx(full[layer - 1]["gates"]["update"][3][5], abs=0.006)
        assert page.is_hidden("#inside-error")
        assert len([a for a in asked if a > 2]) == refused  # the other layer was asked for in pieces that fit at once
        # Chromium logs each refused request; the page's own code raised nothing
        assert all(e.startswith("Failed to load resource") for e in t.console_errors), t.console_errors
    finally:
        t.close()


@pytest.fixture(scope="module")
def rnn_server(tmp_path_factory, browser):
    """A vanilla RNN: no gates at all, its one extra quantity the preactivation."""
    artifact = train_tiny(tmp_path_factory.mktemp("rnn") / "run", PERIODIC * 30, cell="rnn", units=16, epochs=3)
    with running_server(artifact) as s:
        yield s


def test_an_rnn_is_shown_without_gates_and_its_saturation_counts_its_tanh_values(browser, rnn_server):
    t = Tab(browser, rnn_server.url + "/")
    try:
        page = t.page
        page.click("#inside-open")
        page.fill("#inside-text", PERIODIC_PASTE)
        page.click("#inside-run")
        page.locator("#inside-view").wait_for(state="visible")
        assert page.locator("#inside-map-quantity option").all_text_contents() == ["hidden state", "preactivation"]
        assert page.input_value("#inside-map-quantity") == "preactivation"
        assert page.get_attribute("#inside-map-heat", "aria-label").startswith("Heatmap of layer 1's preactivation:")
        assert page.text_content("#inside-saturation-kind") == "Value"
        rows = page.locator("#inside-saturation tr").evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.textContent))")
        assert len(rows) == 1
        layer, name, low, high = rows[0]
        assert (layer, name) == ("1", "tanh(preactivation)")
        assert low.endswith("% near −1") and high.endswith("% near 1")
        assert t.console_errors == []
    finally:
        t.close()


def test_the_view_fits_a_phone_and_opens_in_the_embed(browser, server):
    t = Tab(browser, server.url + "/embed?max_chars=120", viewport=PHONE, color_scheme="dark")
    try:
        page = t.page
        text = reply_inside(t, chars=120, embed=True)
        assert "".join(page.locator("#inside-chars .ch").all_text_contents()) == text
        fits = page.locator("#inside").evaluate("d => [d.scrollWidth, d.clientWidth, d.getBoundingClientRect().width, innerWidth]")
        assert fits[0] <= fits[1] and fits[2] <= fits[3], fits
        assert page.locator("#inside-map").evaluate("m => m.scrollWidth > m.clientWidth")  # the heatmap scrolls instead
        background = rgba(page.locator("#inside").evaluate("d => getComputedStyle(d).backgroundColor"))
        assert sum(background[:3]) / 3 < 60  # dark, like the rest of the page
        assert t.console_errors == []
    finally:
        t.close()


def test_the_inside_screenshot(browser, tiny_artifact, tmp_path):
    """What scripts/screenshots does for docs/screenshot-inside.png, with the tiny model into tmp_path."""
    tracked = {p: p.read_bytes() for p in (ROOT / "docs").glob("*.png")}
    with running_server(tiny_artifact) as s:
        path = inside_screenshot(browser, s.url, tmp_path, "the quick")
    assert path.name == "screenshot-inside.png" and path.stat().st_size > 10_000
    assert {p: p.read_bytes() for p in (ROOT / "docs").glob("*.png")} == tracked
