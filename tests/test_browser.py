"""End to end in headless Chromium: the page uploads a real photo and shows maps and labels.

Needs the Debian packages ``chromium`` (``/usr/bin/chromium``) and the pip package
``playwright`` (its driver only: browsers are never downloaded, the system Chromium is used).
Set ``EVIDENCEMAP_SCREENSHOT=path.png`` to keep a screenshot of the page.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from server_helpers import live_server, photo_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("fastapi")

CAT_LABELS = ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat")


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def canvas_pixels(page, index: int) -> list[int]:
    """RGBA bytes of the ``index``-th overlay canvas (every 97th pixel)."""
    return page.evaluate(
        """(i) => {
            const c = document.querySelectorAll("canvas.overlay")[i];
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const out = [];
            for (let p = 0; p < d.length; p += 4 * 97) out.push(d[p], d[p + 1], d[p + 2]);
            return out;
        }""",
        index,
    )


def test_page_explains_a_photo(page, lite0, tmp_path):
    from evidencemap.server import create_app

    photo = tmp_path / "chelsea.png"
    photo.write_bytes(photo_bytes("chelsea", "PNG"))
    text = tmp_path / "notes.png"
    text.write_text("not a picture at all\n")
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    # the page's own scripts, styles and images run under its Content-Security-Policy
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )

    with live_server(create_app(model=lite0, workers=2)) as url:
        page.goto(url + "/")
        page.wait_for_selector("input[name=method][value=gradcam]")
        assert page.is_checked("input[name=method][value=gradcam]")
        page.check("input[name=method][value=hirescam]")
        page.set_input_files("#file", str(photo))
        page.click("#explain")
        # (a locator, not wait_for_function: the page's CSP forbids the string eval it uses)
        page.locator("canvas.overlay").nth(1).wait_for()
        assert page.locator("canvas.overlay").count() == 2
        page.wait_for_selector("#prediction-list li")

        top = page.inner_text("#prediction-list li:first-child")
        assert any(label in top for label in CAT_LABELS), top
        methods = page.eval_on_selector_all("canvas.overlay", "cs => cs.map(c => c.dataset.method)")
        assert methods == ["gradcam", "hirescam"]
        assert page.is_hidden("#error")

        # the overlay is drawn (not blank), and the opacity slider re-blends it client side
        blended = canvas_pixels(page, 0)
        assert len(set(blended)) > 50
        page.fill("#opacity", "0")
        page.dispatch_event("#opacity", "input")
        photo_only = canvas_pixels(page, 0)
        page.fill("#opacity", "100")
        page.dispatch_event("#opacity", "input")
        heat_only = canvas_pixels(page, 0)
        assert photo_only != blended != heat_only
        mean = [(a + b) / 2 for a, b in zip(photo_only, heat_only, strict=True)]
        assert max(abs(m - b) for m, b in zip(mean, blended, strict=True)) <= 2
        page.fill("#opacity", "50")
        page.dispatch_event("#opacity", "input")

        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        assert (tmp_path / "page.png").stat().st_size > 10_000
        keep = os.environ.get("EVIDENCEMAP_SCREENSHOT")
        if keep:
            page.screenshot(path=keep, full_page=True)

        # a text file named .png: the server's message appears in the alert element
        page.set_input_files("#file", str(text))
        page.click("#explain")
        page.wait_for_selector("[role=alert]:not([hidden])")
        assert "not a readable" in page.inner_text("[role=alert]")

    assert not errors, errors
