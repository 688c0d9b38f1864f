"""End to end in headless Chromium: the page uploads a real photo and shows the method × class
grid, its downloads, progress and cancellation, with no console error it did not ask for.

Needs the Debian packages ``chromium`` (``/usr/bin/chromium``) and the pip package
``playwright`` (its driver only: browsers are never downloaded, the system Chromium is used).
Set ``EVIDENCEMAP_SCREENSHOT=path.png`` to keep a screenshot of the page.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evidencemap.io import load_maps
from server_helpers import decode_array, live_server, photo_bytes

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
# Console errors the page causes on purpose: the bad file (415) and the cancelled request (499).
EXPECTED_STATUSES = ("status of 415", "status of 499")
LABELS_IN_PANELS = """() => {
    const bad = [];
    const selectors = ["#grid .class-head", "#grid .method-head", "#methods label.method",
                       "#prediction-list li", "figure.cell figcaption", ".downloads a", "#error",
                       "#progress-text", "#input-caption"];
    for (const selector of selectors) {
        for (const node of document.querySelectorAll(selector)) {
            if (!node.getClientRects().length) continue;
            const panel = node.closest("figure, section, form, #grid") || document.body;
            const r = node.getBoundingClientRect(), p = panel.getBoundingClientRect();
            if (node.scrollWidth > node.clientWidth + 1 || r.left < p.left - 1 ||
                r.right > p.right + 1) bad.push(selector + ": " + node.textContent.slice(0, 60));
        }
    }
    return bad;
}"""


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
            accept_downloads=True,
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def canvas_pixels(page, index: int) -> list[int]:
    """RGB bytes of the ``index``-th overlay canvas (every 97th pixel)."""
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


def download(page, selector: str) -> Path:
    """Click ``selector`` and return the path of the file the page saved."""
    with page.expect_download() as info:
        page.click(selector)
    return Path(info.value.path())


def test_page_explains_a_photo(page, lite0, tmp_path):
    from evidencemap.server import create_app

    photo = tmp_path / "chelsea.png"
    photo.write_bytes(photo_bytes("chelsea", "PNG"))
    text = tmp_path / "notes.png"
    text.write_text("not a picture at all\n")
    errors: list[str] = []
    failed: list[tuple[int, str]] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    # the page's own scripts, styles and images run under its Content-Security-Policy, and no
    # resource is missing (a 404 is logged as a console error, as is any failed request)
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else None)

    with live_server(create_app(model=lite0, workers=2)) as url:
        page.goto(url + "/")
        page.wait_for_selector("input[name=method][value=gradcam]")
        assert page.is_checked("input[name=method][value=gradcam]")
        # only the methods that apply to this CNN can be ticked: the attention methods come
        # last, greyed out with the reason, never ticked
        shown = page.eval_on_selector_all(
            "#methods label.method",
            "ls => ls.map(l => [l.dataset.method, l.querySelector('input').disabled])",
        )
        offered = [name for name, disabled in shown if not disabled]
        refused = [name for name, disabled in shown if disabled]
        assert sorted(refused) == ["attention_gradient", "attention_rollout"]
        assert [name for name, _ in shown] == offered + refused
        assert "gradcam" in offered
        assert "transformer" in page.inner_text("#methods .unavailable-group .reason")
        for name in refused:
            assert not page.is_checked(f"input[name=method][value={name}]")
            page.click(f"label.method[data-method={name}]", force=True)  # it stays unticked
            assert not page.is_checked(f"input[name=method][value={name}]")
        page.evaluate("() => window.scrollTo(0, 0)")
        # each method's expected cost is on the page before anything runs
        page.locator("label.method[data-method=fgvis] .cost").filter(has_text="passes").wait_for()
        assert "≤ 300 passes" in page.inner_text("label.method[data-method=fgvis] .cost")
        assert "s" in page.inner_text("label.method[data-method=gradcam] .cost")
        page.check("input[name=method][value=hirescam]")
        page.check("input[value=topk]")
        page.fill("#top-k", "3")
        assert "2 methods × 3 classes" in page.inner_text("#estimate")
        page.set_input_files("#file", str(photo))
        page.click("#explain")
        # (a locator, not wait_for_function: the page's CSP forbids the string eval it uses)
        page.locator("canvas.overlay").nth(5).wait_for(timeout=120_000)  # slow on a loaded CI

        # the grid: one row per method, one column per class, in request order
        assert page.locator("canvas.overlay").count() == 6
        cells = page.eval_on_selector_all(
            "figure.cell", "cs => cs.map(c => [c.dataset.method, Number(c.dataset.target)])"
        )
        heads = page.eval_on_selector_all(
            "#grid .class-head", "hs => hs.map(h => Number(h.dataset.target))"
        )
        assert len(heads) == 3
        assert cells == [[m, t] for m in ("gradcam", "hirescam") for t in heads]
        boxes = [page.locator("figure.cell").nth(i).bounding_box() for i in range(6)]
        assert boxes[0]["y"] == boxes[2]["y"] < boxes[3]["y"]  # gradcam above hirescam
        assert boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"]

        # the top-5 with probabilities, visible at 1280×800 without scrolling
        assert page.evaluate("() => window.scrollY") == 0  # Explain was in view, too
        items = page.locator("#prediction-list li")
        assert items.count() == 5
        for i in range(5):
            box = items.nth(i).bounding_box()
            assert box["y"] >= 0, box
            assert box["y"] + box["height"] <= 800, box
            assert "%" in items.nth(i).inner_text()
        top = items.first.inner_text()
        assert any(label in top for label in CAT_LABELS), top
        assert page.is_hidden("#error")
        assert "done" in page.inner_text("#progress-text")
        assert not page.evaluate(LABELS_IN_PANELS)

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

        # downloads: the whole answer as JSON, each map as .npz (its arrays) and as PNG
        answer = json.loads(download(page, "#download-json").read_text())
        first = answer["explanations"][0]
        # the library's one maps schema, as the command line writes it
        saved = load_maps(download(page, "figure.cell >> nth=0 >> a[data-kind=npz]"))
        np.testing.assert_array_equal(saved.maps[0, 0], decode_array(first["map"]))
        np.testing.assert_array_equal(saved.raw[0, 0], decode_array(first["raw"][0]))
        assert saved.targets.tolist() == [first["target"]] == [heads[0]]
        assert saved.method == first["method"]
        assert saved.options == first["options"]
        png = Image.open(
            io.BytesIO(download(page, "figure.cell >> nth=0 >> a[data-kind=png]").read_bytes())
        )
        assert png.format == "PNG"
        assert png.size == (answer["image"]["display_size"],) * 2

        page.screenshot(path=str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
        keep = os.environ.get("EVIDENCEMAP_SCREENSHOT")
        if keep:
            page.screenshot(path=keep)

        # a long class name and a long method name stay inside their panels
        page.uncheck("input[name=method][value=hirescam]")
        page.check("input[name=method][value=integrated_gradients]")
        page.click("summary")
        page.fill("#options", json.dumps({"integrated_gradients": {"steps": 4}}))
        page.fill("#class-index", "180")  # American Staffordshire terrier
        page.check("input[value=class]")
        page.click("#explain")
        page.locator("#grid .class-head").filter(has_text="Staffordshire").wait_for()
        page.locator("canvas.overlay").nth(1).wait_for()
        assert page.locator("canvas.overlay").count() == 2
        assert not page.evaluate(LABELS_IN_PANELS)

        # a slow method: elapsed time and progress while it runs, the old results gone at
        # once, and Cancel stops the work on the server
        page.uncheck("input[name=method][value=gradcam]")
        page.uncheck("input[name=method][value=integrated_gradients]")
        page.check("input[name=method][value=scorecam]")  # all 1280 channels: about a minute
        page.fill("#options", json.dumps({"scorecam": {"internal_batch_size": 8}}))
        page.check("input[value=top1]")
        page.click("#explain")
        assert page.locator("canvas.overlay").count() == 0
        assert page.is_hidden("#results")
        # (under the service's budget the first chunk is one channel, measured, then chunks of
        # at most 8; the page polls, so wait for any count from 9 on)
        at_least_9 = re.compile(r"scorecam (9|[1-9]\d+) / ")
        page.locator("#progress-text").filter(has_text=at_least_9).wait_for(timeout=30_000)
        elapsed = float(page.inner_text("#elapsed").split()[0])
        assert elapsed > 0
        assert float(page.get_attribute("#progress", "value") or 0) > 0
        request_id = page.get_attribute("#run", "data-request-id")
        page.click("#cancel")
        # at once: "cancelling…" and a disabled button that says so, which no progress poll
        # overwrites until the request has stopped
        clicked = time.monotonic()
        # (unless the cancel already ended the request: the page then says "cancelled")
        assert page.inner_text("#progress-text").startswith(("cancelling…", "cancelled"))
        label, status = page.inner_text("#cancel"), page.inner_text("#progress-text")
        assert label == "Cancelling…" or status == "cancelled", (label, status)
        assert page.is_disabled("#cancel") or page.is_hidden("#cancel")
        while (status := page.inner_text("#progress-text")) != "cancelled":
            assert status.startswith("cancelling…"), status
            assert time.monotonic() - clicked < 15, "the cancel never ended the request"
            time.sleep(0.05)
        assert time.monotonic() - clicked < 3.0
        assert page.is_hidden("#cancel")
        assert page.is_hidden("#error")
        state = page.request.get(f"{url}/api/progress/{request_id}").json()
        assert state["state"] == "cancelled"
        assert state["step"]["desc"] == "scorecam"
        assert 9 <= state["step"]["done"] < state["step"]["total"] <= 1280
        deadline = time.monotonic() + 5
        while page.request.get(f"{url}/health").json()["busy"]:
            assert time.monotonic() < deadline, "the cancelled request still computes"
            time.sleep(0.05)

        # a text file named .png: the server's message appears in the alert element, and the
        # previous results are gone
        page.check("input[name=method][value=gradcam]")
        page.uncheck("input[name=method][value=scorecam]")
        page.fill("#options", "")
        page.click("#explain")
        page.locator("canvas.overlay").first.wait_for()
        page.set_input_files("#file", str(text))
        page.click("#explain")
        page.wait_for_selector("[role=alert]:not([hidden])")
        assert "not a readable" in page.inner_text("[role=alert]")
        assert page.is_hidden("#results")
        assert page.locator("canvas.overlay").count() == 0

    unexpected = [e for e in errors if not any(s in e for s in EXPECTED_STATUSES)]
    assert not unexpected, unexpected
    assert sorted(status for status, _ in failed) == [415, 499], failed
