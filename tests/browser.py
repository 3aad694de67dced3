"""The page in headless Chromium (Playwright driving Debian's `chromium`): a Tab with what it logged,
and the README's screenshots with the checks made on the way (the layout fits the screen's width,
the colour scheme applies).

    scripts/screenshots          # refresh docs/screenshot-*.png with the shipped model (artifacts/default)
    scripts/screenshots docs inside   # only some of them: desktop, mobile, dark, inside

tests/test_page.py takes the same screenshots of the tiny test model into a temporary directory:
the test suite never writes into the tree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from server import ROOT, running_server

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections (updates, sync) are refused by
# a closed network and it logs errors; the page itself needs nothing but the server.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 760}
TIMEOUT_MS = 30_000
ENDED = "() => ['done', 'stopped', 'error'].includes(document.querySelector('.turn:last-child')?.dataset.state)"
SHOTS = [("desktop", DESKTOP, "light"), ("mobile", PHONE, "light"), ("dark", DESKTOP, "dark")]
TALL = {"width": 1280, "height": 1400}  # the Inside view whole: the coloured text, the ranking and the heatmap
DOCS = ROOT / "docs"


class Tab:
    """A browser tab on the page, with what it logged: console errors and dialogs opened."""

    def __init__(self, browser, url: str, viewport=DESKTOP, color_scheme="light"):
        self.context = browser.new_context(viewport=viewport, color_scheme=color_scheme)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.page.on("dialog", self._dialog)
        self.page.goto(url)
        # the header describes the model (cell layers×units) once /info has answered
        self.page.wait_for_function("() => document.getElementById('model').textContent.includes('×')")

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def send(self, prompt: str, *, temperature: float | None = None, max_chars: int | None = None):
        if temperature is not None:
            self.page.fill("#temperature", str(temperature))
        if max_chars is not None:
            self.page.fill("#max-chars", str(max_chars))
        self.page.fill("#prompt", prompt)
        self.page.press("#prompt", "Enter")

    def turn(self, index: int = -1):
        return self.page.locator(".turn").nth(index)

    def wait_ended(self) -> str:
        self.page.wait_for_function(ENDED)
        return self.turn().get_attribute("data-state")

    def generated(self, index: int = -1) -> str:
        return self.turn(index).locator(".generated").text_content()

    def close(self):
        self.context.close()


def screenshots(browser, url: str, out: Path, prompt: str, names=("desktop", "mobile", "dark")) -> list[Path]:
    """docs/screenshot-{desktop,mobile,dark}.png of the page at `url` (with probabilities shown and
    the tooltip of the least likely character open) into `out`; checks that the page fits the
    screen's width, the narrowest phone's (360 px) too, and that the colour scheme applies."""
    paths = []
    for name, viewport, scheme in SHOTS:
        if name not in names:
            continue
        t = Tab(browser, url + "/", viewport=viewport, color_scheme=scheme)
        try:
            page = t.page
            page.check("#probabilities")
            page.click("summary")
            page.fill("#seed", "3")
            page.click("summary")
            t.send(prompt, temperature=0.8, max_chars=400 if viewport is DESKTOP else 160)
            assert t.wait_ended() == "done"
            chars = t.turn().locator(".generated .ch")
            ps = chars.evaluate_all("spans => spans.map(s => Number(s.dataset.p))")
            chars.nth(ps.index(min(ps))).hover()
            width = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
            assert width[0] <= width[1], f"the page is wider than the {name} screen: {width}"
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            luminance = sum(float(x) for x in re.findall(r"[\d.]+", background)[:3]) / 3
            assert (luminance < 60) if scheme == "dark" else (luminance > 200), background
            path = out / f"screenshot-{name}.png"
            page.screenshot(path=str(path))
            assert path.stat().st_size > 10_000
            assert t.console_errors == [], t.console_errors
            paths.append(path)
        finally:
            t.close()
    t = Tab(browser, url + "/", viewport={"width": 360, "height": 640})
    try:
        t.page.click("summary")
        assert t.page.evaluate("document.documentElement.scrollWidth <= innerWidth"), "wider than a 360 px phone"
    finally:
        t.close()
    return paths


def inside_screenshot(browser, url: str, out: Path, prompt: str) -> Path:
    """docs/screenshot-inside.png: a reply to `prompt` (seed 3) in the Inside view, coloured by the
    cell the server ranks best, the heatmap of its layer's forget gate and one character's tip open;
    checks that the view fits the screen's width."""
    t = Tab(browser, url + "/", viewport=TALL)
    try:
        page = t.page
        page.click("summary")
        page.fill("#seed", "3")
        page.click("summary")
        t.send(prompt, temperature=0.8, max_chars=400)
        assert t.wait_ended() == "done"
        t.turn().get_by_role("button", name="Look inside").click()
        page.locator("#inside-view").wait_for(state="visible")
        page.select_option("#inside-map-quantity", "forget")
        chars = page.locator("#inside-chars .ch")
        chars.nth(max(0, chars.count() - 25)).hover()  # on the last line: the tip covers the text least
        assert page.locator("#inside-tip").is_visible()
        width = page.locator("#inside").evaluate("d => [d.scrollWidth, d.clientWidth]")
        assert width[0] <= width[1], f"the Inside view is wider than the screen: {width}"
        path = out / "screenshot-inside.png"
        page.screenshot(path=str(path))
        assert t.console_errors == [], t.console_errors
        return path
    finally:
        t.close()


def main() -> None:
    """scripts/screenshots [DIR [NAME...]]: the shipped model's page into docs/ (or DIR); all of
    desktop, mobile, dark and inside, or only the NAMEs given."""
    from playwright.sync_api import sync_playwright

    artifact = ROOT / "artifacts" / "default"
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS
    names = sys.argv[2:] or ["desktop", "mobile", "dark", "inside"]
    if not (artifact / "meta.json").exists():
        sys.exit(f"no shipped model at {artifact}: the screenshots show it")
    if not CHROMIUM.exists():
        sys.exit(f"the screenshots need Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    with running_server(artifact) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for path in screenshots(browser, server.url, out, "ROMEO:\n", names):
                print(path)
            if "inside" in names:
                print(inside_screenshot(browser, server.url, out, "ROMEO:\n"))
        finally:
            browser.close()


if __name__ == "__main__":
    main()
