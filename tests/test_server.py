"""The web service: answers on real photos, every error path, limits and concurrency."""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import evidencemap as em
from evidencemap.io import MAPS_VERSION, load_maps
from evidencemap.methods import METHODS, Option, register
from evidencemap.methods.gradients import SmoothGrad
from server_helpers import decode_array, decode_png, photo_bytes
from tiny import assert_unchanged, snapshot

pytest.importorskip("fastapi")
pytest.importorskip("multipart")  # python-multipart, needed for uploads

with warnings.catch_warnings():  # starlette's notice that it prefers httpx2 to httpx
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from evidencemap.server import MAX_TOP_K, create_app

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def app(lite0):
    return create_app(model=lite0, workers=2)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def chelsea_png():
    return photo_bytes("chelsea", "PNG")


@pytest.fixture(scope="module")
def chelsea_x(lite0):
    return lite0.preprocess(data.chelsea()).unsqueeze(0)


def post(client, content: bytes | None, name: str = "photo.png", kind: str = "image/png", **form):
    files = None if content is None else {"file": (name, content, kind)}
    return client.post("/api/explain", files=files, data=form)


def assert_error(response, status: int, *words: str) -> None:
    """A JSON ``{"error": message}`` with ``status`` whose message holds ``words``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert body["error"]
    assert "Traceback" not in response.text
    for word in words:
        assert word in body["error"], body["error"]


# --------------------------------------------------------------------------- happy paths


def test_chelsea_gradcam_matches_the_library(client, chelsea_png, lite0, chelsea_x):
    response = post(client, chelsea_png)
    assert response.status_code == 200, response.text
    body = response.json()
    top = body["predictions"]
    assert len(top) == 5
    assert top[0]["class"] in CAT_CLASSES
    assert top[0]["label"] == lite0.labels[top[0]["class"]]
    probabilities = [p["probability"] for p in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1 + 1e-6
    assert body["targets"] == [top[0]]  # top-1 by default
    assert body["methods"] == ["gradcam"]
    assert body["seconds"] > 0
    assert body["model"] == "efficientnet-lite0"
    assert body["image"]["width"] == 451
    assert body["image"]["height"] == 300
    # the crop by hand: 451 × 300 → 385 × 256, 224 square at (80, 16) → photo x 80·451/385 …
    assert body["image"]["crop"] == pytest.approx([36080 / 385, 18.75, 137104 / 385, 281.25])
    (result,) = body["explanations"]
    assert result["method"] == "gradcam"
    assert result["target"] == top[0]["class"]
    assert result["layer"] == "_head_act"

    expected = em.explain(lite0, chelsea_x, "gradcam", target=result["target"])
    values = decode_array(result["map"])
    assert values.shape == (224, 224)
    np.testing.assert_allclose(values, expected.maps[0, 0].numpy(), atol=1e-5)
    (raw,) = result["raw"]
    np.testing.assert_allclose(decode_array(raw), expected.raw[0, 0].numpy(), rtol=1e-5, atol=1e-6)
    assert decode_array(raw).shape == (7, 7)
    assert result["score"] == pytest.approx(float(expected.scores[0]), rel=1e-5)

    side = body["image"]["display_size"]
    photo = decode_png(body["input_png"])
    overlay = decode_png(result["overlay_png"])
    heat = decode_png(result["heatmap_png"])
    assert photo.size == overlay.size == heat.size == (side, side)
    # the overlay is the photo and the heat-map colours blended half and half
    blend = (np.asarray(photo, float) + np.asarray(heat, float)) / 2
    assert np.abs(np.asarray(overlay, float) - blend).max() <= 1.0


@pytest.mark.parametrize(("game", "kind"), [("preserve", "explanation"), ("delete", "deleted")])
def test_fgvis_returns_its_explanation_image_and_the_score_on_it(
    client, chelsea_png, chelsea_x, lite0, game, kind
):
    options = {"game": game, "max_iterations": 5, "lam": 0.5}
    response = post(
        client, chelsea_png, method="fgvis,gradcam", options=json.dumps({"fgvis": options})
    )
    assert response.status_code == 200, response.text
    results = {r["method"]: r for r in response.json()["explanations"]}
    fg, cam = results["fgvis"], results["gradcam"]
    assert fg["explanation_kind"] == kind
    picture = decode_png(fg["explanation_png"])
    assert picture.size == decode_png(fg["overlay_png"]).size
    exp = em.explain(lite0, chelsea_x, "fgvis", target=fg["target"], **options)
    assert fg["explanation_score"] == pytest.approx(float(exp.extras["score"][0]), abs=1e-5)
    assert fg["explanation_top1"] == int(exp.extras["top1"][0])
    assert cam["explanation_png"] is None
    assert cam["explanation_score"] is None


def test_several_methods_and_top_k(client, chelsea_png):
    response = post(client, chelsea_png, method="gradcam, hirescam,grad-cam", top_k="3")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["methods"] == ["gradcam", "hirescam"]  # duplicates (by alias too) dropped
    assert body["targets"] == body["predictions"][:3]
    pairs = [(r["method"], r["target"]) for r in body["explanations"]]
    classes = [t["class"] for t in body["targets"]]
    assert pairs == [(m, c) for m in ("gradcam", "hirescam") for c in classes]
    maps = [decode_array(r["map"]) for r in body["explanations"]]
    assert all(float(m.max()) == 1.0 and float(m.min()) >= 0.0 for m in maps)
    assert not np.array_equal(maps[0], maps[1])  # tiger cat and Egyptian cat differ


def test_explicit_target_matches_the_library(client, chelsea_png, lite0, chelsea_x):
    response = post(client, chelsea_png, method="gradcam++", target="285")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [t["class"] for t in body["targets"]] == [285]
    assert body["targets"][0]["label"] == "Egyptian cat"
    expected = em.explain(lite0, chelsea_x, "gradcam++", target=285)
    np.testing.assert_allclose(
        decode_array(body["explanations"][0]["map"]), expected.maps[0, 0].numpy(), atol=1e-5
    )


@pytest.mark.parametrize(
    "options",
    [
        {"top_k": 4, "weighting": "channel_softmax"},
        {"scorecam": {"top_k": 4, "weighting": "channel_softmax"}, "gradcam": {"relu": False}},
    ],
    ids=["for-all", "per-method"],
)
def test_options_flat_or_per_method(client, chelsea_png, options):
    methods = "scorecam" if "scorecam" not in options else "scorecam,gradcam"
    response = post(client, chelsea_png, method=methods, options=json.dumps(options))
    assert response.status_code == 200, response.text
    results = {r["method"]: r for r in response.json()["explanations"]}
    assert results["scorecam"]["options"]["top_k"] == 4
    assert results["scorecam"]["options"]["weighting"] == "channel_softmax"
    if "gradcam" in results:
        assert results["gradcam"]["options"]["relu"] is False


def test_image_type_is_read_from_the_content_not_the_name(client):
    jpeg = photo_bytes("coffee", "JPEG", quality=90)
    response = post(client, jpeg, name="notes.txt", kind="text/plain")
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "espresso"


def test_greyscale_and_rgba_photos(client):
    grey = io.BytesIO()
    Image.fromarray(data.camera()).save(grey, format="PNG")
    rgba = io.BytesIO()
    Image.fromarray(data.chelsea()).convert("RGBA").save(rgba, format="PNG")
    for content in (grey.getvalue(), rgba.getvalue()):
        assert post(client, content).status_code == 200


def test_model_left_as_found(client, chelsea_png, lite0):
    before = snapshot(lite0)
    for method in ("gradcam", "eigencam", "layercam"):
        assert post(client, chelsea_png, method=method, top_k="2").status_code == 200
    assert_unchanged(lite0, before)


# --------------------------------------------------------------------------- other endpoints


def test_methods_endpoint(client):
    body = client.get("/api/methods").json()
    assert [m["name"] for m in body] == em.methods()
    scorecam = next(m for m in body if m["name"] == "scorecam")
    assert scorecam["options"]["weighting"] == "softmax_prob"
    assert scorecam["options"]["top_k"] is None
    assert scorecam["uses_layer"] is True
    assert "score-cam" in scorecam["aliases"]
    assert scorecam["summary"].startswith("Score-CAM")


def test_models_labels_health(client, lite0):
    models = client.get("/api/models").json()
    served = [m["name"] for m in models if m["served"]]
    assert served == ["efficientnet-lite0"]
    labels = client.get("/api/labels").json()
    assert labels == lite0.labels
    assert labels[282] == "tiger cat"
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["model"] == "efficientnet-lite0"
    assert health["version"] == em.__version__


def test_openapi_documents_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/explain",
        "/api/methods",
        "/api/models",
        "/api/labels",
        "/health",
        "/api/progress/{request_id}",
        "/api/cancel/{request_id}",
    ):
        assert path in paths
    explain = paths["/api/explain"]["post"]
    ok = explain["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/ExplainResponse")
    for status in ("400", "413", "415", "422"):
        error = explain["responses"][status]["content"]["application/json"]["schema"]
        assert error["$ref"].endswith("/ErrorResponse")
    body_ref = explain["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = schema["components"]["schemas"][body_ref.rsplit("/", 1)[1]]["properties"]
    assert {"file", "method", "target", "top_k", "options", "request_id"} <= set(form)
    prediction = schema["components"]["schemas"]["Prediction"]["properties"]
    assert set(prediction) == {"class", "label", "probability"}


def test_page_is_served(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'role="alert"' in response.text
    assert "/api/explain" in client.get("/page.js").text


def test_page_assets_and_a_strict_policy(client):
    kinds = {
        "/page.js": "text/javascript",
        "/page.css": "text/css",
        "/favicon.svg": "image/svg+xml",
        "/favicon.ico": "image/svg+xml",
    }
    for path, kind in kinds.items():
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(kind)
        assert response.content
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy
    assert "style-src 'self';" in policy
    assert "unsafe" not in policy
    # the page holds no inline script or style the policy would block
    assert "<script>" not in page.text
    assert "<style" not in page.text
    assert "style=" not in page.text
    for asset in ("/page.js", "/page.css", "/favicon.svg"):
        assert f'"{asset}"' in page.text


# --------------------------------------------------------------------------- progress, cancel


def wait_for(condition, seconds: float = 30.0, what: str = "the condition"):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_progress_of_a_finished_request(client, chelsea_png):
    assert client.get("/api/progress/notyetsent").json()["state"] == "unknown"
    response = post(client, chelsea_png, method="gradcam,hirescam", request_id="finished-1")
    assert response.status_code == 200, response.text
    state = client.get("/api/progress/finished-1").json()
    assert state["state"] == "done"
    assert state["methods"] == ["gradcam", "hirescam"]
    assert state["method_index"] == 2
    assert state["method"] is None
    assert state["fraction"] == 1.0
    assert 0 < state["elapsed"] < 60
    failed = post(client, b"not an image", request_id="failed-01")
    assert failed.status_code == 415
    assert client.get("/api/progress/failed-01").json()["state"] == "failed"


@pytest.mark.parametrize("bad", ["short", "x" * 65, "has space", "semi;colon"])
def test_bad_request_ids(client, chelsea_png, bad):
    assert_error(post(client, chelsea_png, request_id=bad), 400, "request_id")
    if "/" not in bad and " " not in bad:
        assert_error(client.get(f"/api/progress/{bad}"), 400, "request_id")
        assert_error(client.post(f"/api/cancel/{bad}"), 400, "request_id")


def test_cancel_stops_the_work_on_the_server(client, chelsea_png):
    """A Score-CAM over all channels reports its progress; a cancel stops it within a chunk,
    the request is answered 499 and the service is idle again."""
    options = json.dumps({"internal_batch_size": 8})  # a checkpoint every 8 channels
    answer: dict = {}

    def slow():
        answer["response"] = post(
            client, chelsea_png, method="scorecam", options=options, request_id="slow-cam-1"
        )
        answer["at"] = time.monotonic()

    thread = threading.Thread(target=slow)
    thread.start()

    def running():
        state = client.get("/api/progress/slow-cam-1").json()
        step = state["step"]
        return state if step is not None and step["done"] >= 16 else None

    state = wait_for(running, what="Score-CAM progress")
    assert state["state"] == "running"
    assert state["method"] == "scorecam"
    assert state["step"]["desc"] == "scorecam"
    assert 0 < state["fraction"] < 1
    # the id is taken while the request is in flight
    assert_error(post(client, chelsea_png, request_id="slow-cam-1"), 409, "in use")
    cancelled_at = time.monotonic()
    assert client.post("/api/cancel/slow-cam-1").status_code == 200
    thread.join(60)
    assert_error(answer["response"], 499, "cancelled")
    assert answer["at"] - cancelled_at < 5.0
    final = client.get("/api/progress/slow-cam-1").json()
    assert final["state"] == "cancelled"
    assert final["step"]["done"] < final["step"]["total"]
    time.sleep(0.3)  # nothing computes any more
    assert client.get("/api/progress/slow-cam-1").json()["step"] == final["step"]
    wait_for(lambda: client.get("/health").json()["busy"] == 0, 5, what="an idle service")


def test_a_cancel_that_arrives_first_applies_on_arrival(client, chelsea_png):
    assert client.post("/api/cancel/early-bird").json()["state"] == "cancelled"
    began = time.perf_counter()
    response = post(client, chelsea_png, method="scorecam", request_id="early-bird")
    assert_error(response, 499, "cancelled")
    assert time.perf_counter() - began < 5.0
    state = client.get("/api/progress/early-bird").json()
    assert state["state"] == "cancelled"
    assert state["method_index"] == 0
    assert state["step"] is None  # no channel was computed


def test_progress_fraction_counts_methods_and_steps():
    from evidencemap.server.progress import METHODS_STEP, RequestProgress

    progress = RequestProgress("abcdefgh", ["gradcam", "scorecam"])
    assert progress.snapshot()["fraction"] == 0.0
    progress.state = "running"
    progress.report(1, 2, METHODS_STEP)
    assert progress.snapshot()["method"] == "scorecam"
    progress.report(64, 256, "scorecam")
    state = progress.snapshot()
    assert state["fraction"] == pytest.approx((1 + 64 / 256) / 2)
    assert state["step"] == {"desc": "scorecam", "done": 64, "total": 256}
    progress.report(2, 2, METHODS_STEP)
    assert progress.snapshot()["step"] is None


class _SmoothGuidedGradCAM(SmoothGrad):
    """Test-only preset, registered by its user: SmoothGrad of guided Grad-CAM, 4 copies."""

    name = "test-smooth-guided-gradcam-4"
    aliases = ()
    OPTIONS = (
        Option("method", "str", "guided_gradcam", "the wrapped method", other="a Method"),
        Option("samples", "int", 4, "copies", low=1, cost="work", passes=True),
    )

    def __init__(self, model: Any, layer: Any = None, **kw: Any) -> None:
        kw.setdefault("method", "guided_gradcam")
        kw.setdefault("samples", 4)
        super().__init__(model, layer, **kw)


def test_methods_report_their_expected_cost(lite0, chelsea_png):
    fresh = TestClient(create_app(model=lite0))
    register(_SmoothGuidedGradCAM)
    try:  # a user's method gets the estimate it declares: 4 copies × guided Grad-CAM's 2
        costs = {m["name"]: m["cost"] for m in fresh.get("/api/methods").json()}
    finally:
        METHODS.pop(_SmoothGuidedGradCAM.name)
    user = costs.pop(_SmoothGuidedGradCAM.name)
    assert (user["passes"], user["pass_kind"], user["work_option"]) == (8, "input", "samples")
    assert user["seconds"] == pytest.approx(8 * costs["saliency"]["seconds_per_pass"])
    expected = {  # passes with the default options, and their kind
        "gradcam": (1, "layer"),
        "guided_gradcam": (2, "input"),
        "saliency": (1, "input"),
        "fgvis": (300, "input"),
        "integrated_gradients": (50, "input"),
        "smoothgrad": (25, "input"),  # 25 noisy copies of saliency
        "scorecam": (1280, "forward"),  # all channels of Lite0's _head_act (top_k=None)
    }
    per_pass = {}
    for name, (passes, kind) in expected.items():
        cost = costs[name]
        assert (cost["passes"], cost["pass_kind"]) == (passes, kind), name
        assert 0 < cost["seconds_per_pass"] < 30
        per_pass.setdefault(kind, cost["seconds_per_pass"])
        assert cost["seconds_per_pass"] == per_pass[kind]  # one timing per kind
        assert cost["seconds"] == pytest.approx(passes * cost["seconds_per_pass"])
        assert cost["last_seconds"] is None
    assert costs["fgvis"]["at_most"]
    assert costs["scorecam"]["at_most"]
    assert not costs["gradcam"]["at_most"]
    assert costs["scorecam"]["work_option"] == "top_k"
    assert costs["gradcam"]["work_option"] is None

    response = post(
        fresh,
        chelsea_png,
        method="gradcam,smoothgrad",
        top_k="2",
        options=json.dumps({"smoothgrad": {"samples": 3}}),
    )
    assert response.status_code == 200, response.text
    took = {r["method"]: r["seconds"] for r in response.json()["explanations"]}
    after = {m["name"]: m["cost"] for m in fresh.get("/api/methods").json()}
    assert after["gradcam"]["last_seconds"] == pytest.approx(took["gradcam"] / 2)
    assert after["smoothgrad"]["last_seconds"] == pytest.approx(took["smoothgrad"] / 2)
    assert after["smoothgrad"]["last_work"] == 3
    assert after["scorecam"]["last_seconds"] is None


# --------------------------------------------------------------------------- errors


def truncated(fmt: str) -> bytes:
    whole = photo_bytes("chelsea", fmt)
    return whole[: len(whole) // 2]


@pytest.mark.parametrize(
    ("content", "name", "status", "words"),
    [
        (b"", "photo.png", 400, ("empty",)),
        (b"this is plain text, not a picture\n", "photo.png", 415, ("not a readable",)),
        (b"<!doctype html><html><body>hi</body></html>", "page.jpg", 415, ("not a readable",)),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "doc.webp", 415, ("not a readable",)),
        (truncated("JPEG"), "photo.jpg", 400, ("truncated or corrupt",)),
        (truncated("PNG"), "photo.png", 400, ("truncated or corrupt",)),
    ],
    ids=["empty", "text-named-png", "html", "pdf", "truncated-jpeg", "truncated-png"],
)
def test_bad_files(client, content, name, status, words):
    assert_error(post(client, content, name=name), status, *words)


def test_unsupported_image_format(client):
    gif = io.BytesIO()
    Image.fromarray(data.chelsea()).save(gif, format="GIF")
    assert_error(post(client, gif.getvalue(), name="cat.gif"), 415, "PNG, JPEG")


def test_no_file(client):
    assert_error(client.post("/api/explain", data={"method": "gradcam"}), 400, "'file'")


def test_file_field_sent_as_text(client):
    response = client.post(
        "/api/explain", files={"method": (None, "gradcam"), "file": (None, "not a file")}
    )
    assert_error(response, 422, "file")


def test_multipart_without_boundary(client):
    response = client.post(
        "/api/explain", content=b"abc", headers={"content-type": "multipart/form-data"}
    )
    assert_error(response, 400, "boundary")


def test_json_body_instead_of_multipart(client):
    assert_error(client.post("/api/explain", json={"file": "x"}), 400, "'file'")


@pytest.mark.parametrize(
    ("form", "status", "words"),
    [
        ({"method": "nosuchcam"}, 400, ("unknown method 'nosuchcam'", "gradcam")),
        ({"method": "gradcam,nosuchcam"}, 400, ("nosuchcam",)),
        ({"method": " , "}, 400, ("at least one method",)),
        ({"target": "tiger cat"}, 400, ("target", "0 to 999")),
        ({"target": "1000"}, 400, ("target", "1000")),
        ({"target": "-1"}, 400, ("target",)),
        ({"target": "2.5"}, 400, ("target",)),
        ({"top_k": "0"}, 400, ("top_k", f"1 to {MAX_TOP_K}")),
        ({"top_k": str(MAX_TOP_K + 1)}, 400, ("top_k",)),
        ({"top_k": "many"}, 400, ("top_k",)),
        ({"target": "3", "top_k": "2"}, 400, ("either target or top_k",)),
        ({"options": "{top_k: 3"}, 400, ("options must be a JSON object",)),
        ({"options": "[1, 2]"}, 400, ("JSON object", "list")),
        ({"options": '{"layer": {"a": 1}}'}, 400, ("'layer'",)),
        ({"options": '{"colour": "red"}'}, 422, ("gradcam", "colour", "relu")),
        ({"method": "scorecam", "options": '{"top_k": 0}'}, 422, ("scorecam", "top_k")),
        ({"method": "scorecam", "options": '{"weighting": "max"}'}, 422, ("weighting",)),
        ({"options": '{"relu": "yes", "batch_size": "two"}'}, 422, ("relu", "batch_size")),
        ({"options": '{"layer": "no.such.layer"}'}, 422, ("no.such.layer", "not found")),
        ({"options": '{"layer": "_fc"}'}, 422, ("spatial",)),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_bad_fields(client, chelsea_png, form, status, words):
    assert_error(post(client, chelsea_png, **form), status, *words)


def test_upload_limit(lite0):
    png = photo_bytes("chelsea", "PNG")
    small = TestClient(create_app(model=lite0, max_upload_bytes=len(png) - 1))
    assert_error(post(small, png), 413, str(len(png) - 1))  # file checked exactly
    assert post(small, png[: len(png) - 1]).status_code != 413
    tiny = TestClient(create_app(model=lite0, max_upload_bytes=1000))
    assert_error(post(tiny, png), 413, "upload limit")  # declared Content-Length, unread


def test_upload_limit_without_content_length(lite0):
    png = photo_bytes("chelsea", "PNG")
    tiny = TestClient(create_app(model=lite0, max_upload_bytes=1000))
    boundary = "evidencemapboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks():
        for start in range(0, len(body), 16384):
            yield body[start : start + 16384]

    response = tiny.post(
        "/api/explain",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(response, 413, "upload limit")


def test_pixel_limit(lite0, client):
    small = TestClient(create_app(model=lite0, max_pixels=100_000))
    assert_error(post(small, photo_bytes("chelsea", "PNG")), 413, "451 × 300", "100000")
    # a 42-megapixel PNG of a few kB is refused by the default 40 MP limit before decoding
    bomb = io.BytesIO()
    Image.new("1", (7000, 6000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 100_000
    began = time.perf_counter()
    assert_error(post(client, bomb.getvalue()), 413, "42000000 pixels", "40000000")
    assert time.perf_counter() - began < 2.0  # header only: decoding 42 MP would take longer


def test_unknown_path_and_wrong_verb(client):
    assert_error(client.get("/api/nothing"), 404)
    assert_error(client.get("/api/explain"), 405)


def test_create_app_rejects_bad_arguments(lite0):
    with pytest.raises(ValueError, match="workers"):
        create_app(model=lite0, workers=0)
    with pytest.raises(TypeError, match="max_pixels"):
        create_app(model=lite0, max_pixels=1.5)
    with pytest.raises(ValueError, match="takes volumes"):
        create_app(model=torch.nn.Conv3d(1, 1, 1).eval())
    with pytest.raises(ValueError, match="eval mode"):
        create_app(model=torch.nn.Conv2d(3, 3, 1).train())
    with pytest.raises(TypeError, match="LoadedModel"):
        create_app(model="efficientnet-lite0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot load model .resnet-9000.*Built-in names"):
        create_app("resnet-9000")


# --------------------------------------------------------------------------- concurrency


def run_together(jobs, rounds: int):
    """Run the callables of ``jobs`` simultaneously (a barrier lines them up), ``rounds`` times."""
    barrier = threading.Barrier(len(jobs))
    results = [[] for _ in jobs]
    errors = []

    def worker(i):
        try:
            for _ in range(rounds):
                barrier.wait()
                results[i].append(jobs[i]())
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_concurrent_methods_on_one_model_equal_sequential(lite0, photos):
    """Two threads explain different photos with different methods at the same time on the one
    shared model; each gets exactly what it gets alone (hooks record the calling thread only)."""
    cat, cup = photos[:1], photos[1:]
    jobs = [
        lambda: em.explain(lite0, cat, "gradcam").maps,
        lambda: em.explain(lite0, cup, "layercam").maps,
        lambda: em.explain(lite0, cat, "gradcam++", layer="_blocks.15").maps,
    ]
    alone = [job() for job in jobs]
    before = snapshot(lite0)
    together = run_together(jobs, rounds=12)
    for expected, got in zip(alone, together, strict=True):
        for maps in got:
            torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)
    assert_unchanged(lite0, before)


@pytest.mark.slow
def test_concurrent_methods_stress(lite0, photos):
    """As above with four threads, eight methods between them and many more rounds."""
    cat, cup = photos[:1], photos[1:]
    names = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "cam"]
    jobs = [
        (lambda m=m, x=x: em.explain(lite0, x, m).maps)
        for m, x in zip(names, [cat, cup] * 4, strict=False)
    ]
    jobs.append(lambda: em.explain(lite0, cat, "scorecam", top_k=8).maps)
    alone = [job() for job in jobs]
    together = run_together(jobs, rounds=40)
    for expected, got in zip(alone, together, strict=True):
        for maps in got:
            torch.testing.assert_close(maps, expected, rtol=0, atol=1e-6)


def test_concurrent_requests_equal_sequential(client, lite0):
    cat, cup = photo_bytes("chelsea", "PNG"), photo_bytes("coffee", "PNG")

    def job(content, method):
        def call():
            response = post(client, content, method=method)
            assert response.status_code == 200, response.text
            return decode_array(response.json()["explanations"][0]["map"])

        return call

    jobs = [job(cat, "gradcam"), job(cup, "hirescam"), job(cat, "xgradcam")]
    alone = [j() for j in jobs]
    together = run_together(jobs, rounds=4)
    for expected, got in zip(alone, together, strict=True):
        for values in got:
            np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6)


def test_slow_method_does_not_block_fast_requests(client, chelsea_png):
    """While a Score-CAM computes in one worker, /health and a Grad-CAM answer at once."""
    slow: dict = {}

    def score_cam():
        began = time.perf_counter()
        slow["response"] = post(
            client, chelsea_png, method="scorecam", options=json.dumps({"top_k": 64})
        )
        slow["seconds"] = time.perf_counter() - began

    thread = threading.Thread(target=score_cam)
    thread.start()
    deadline = time.monotonic() + 20
    while client.get("/health").json()["busy"] == 0:
        assert time.monotonic() < deadline, "the Score-CAM request never started"
        time.sleep(0.01)
    began = time.perf_counter()
    assert client.get("/health").status_code == 200
    health_seconds = time.perf_counter() - began
    fast = post(client, chelsea_png, method="gradcam")
    fast_seconds = time.perf_counter() - began
    still_running = thread.is_alive()
    thread.join()
    assert fast.status_code == 200
    assert slow["response"].status_code == 200, slow["response"].text
    assert still_running, "the Score-CAM finished before the Grad-CAM: nothing was shown"
    assert health_seconds < 0.5
    assert fast_seconds < slow["seconds"] / 2


def test_busy_server_answers_503(lite0, chelsea_png):
    busy = TestClient(create_app(model=lite0, workers=1, max_pending=1))
    slow: dict = {}
    thread = threading.Thread(
        target=lambda: slow.update(
            r=post(busy, chelsea_png, method="scorecam", options='{"top_k": 24}')
        )
    )
    thread.start()
    deadline = time.monotonic() + 20
    while busy.get("/health").json()["busy"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert_error(post(busy, chelsea_png), 503, "busy")
    thread.join()
    assert slow["r"].status_code == 200
    assert busy.get("/health").json()["busy"] == 0


def test_shutdown_answers_running_requests_at_once(lite0, chelsea_png, monkeypatch):
    """A request whose work is between two checkpoints when the service stops is answered 503
    at once (not cut off by the server's graceful-shutdown timeout as a 500)."""
    stopping = create_app(model=lite0, workers=1)
    service = stopping.state.service
    release = threading.Event()

    def stuck(*_args: Any, **_kwargs: Any) -> None:  # a long phase with no checkpoint
        release.wait(timeout=30)

    monkeypatch.setattr(service, "explain", stuck)
    answer: dict = {}
    thread = threading.Thread(
        target=lambda: answer.update(r=post(TestClient(stopping), chelsea_png))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while service.pending == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        began = time.monotonic()
        service.shutdown.set()
        thread.join(timeout=5)
        answered = time.monotonic() - began
    finally:
        release.set()
        thread.join()
        service.close()
    assert_error(answer["r"], 503, "shutting down")
    assert answered < 2


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def parser():
    from evidencemap.cli import serve

    top = argparse.ArgumentParser(prog="evidencemap")
    serve.register(top.add_subparsers(dest="command", required=True))
    return top


def test_cli_defaults(parser):
    from evidencemap.cli import serve

    args = parser.parse_args(["serve"])
    assert args.func is serve.run
    assert (args.host, args.port, args.model, args.workers) == (
        "127.0.0.1",
        8000,
        "efficientnet-lite0",
        2,
    )
    assert args.torch_threads is None
    assert args.max_upload_mb == 10.0
    assert args.max_megapixels == 40.0


@pytest.mark.parametrize(
    "argv",
    [["--workers", "0"], ["--port", "70000"], ["--port", "x"], ["--max-upload-mb", "-1"]],
)
def test_cli_rejects_bad_values(parser, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["serve", *argv])
    assert exit_info.value.code == 2
    assert "expected" in capsys.readouterr().err


def record_serving(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Make ``uvicorn.Server.run`` record the app, host and port it was given instead of
    serving; returns the record."""
    import uvicorn

    calls: dict[str, Any] = {}

    def run(server: uvicorn.Server) -> None:
        config = server.config
        calls.update(app=config.app, host=config.host, port=config.port)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return calls


def test_cli_run_builds_the_app_and_serves_it(parser, monkeypatch):
    calls = record_serving(monkeypatch)
    threads = torch.get_num_threads()
    args = parser.parse_args(
        [
            "serve",
            "--port",
            "8123",
            "--workers",
            "3",
            "--torch-threads",
            "1",
            "--max-upload-mb",
            "2",
        ]
    )
    try:
        assert args.func(args) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert calls["host"] == "127.0.0.1"
    assert calls["port"] == 8123
    with TestClient(calls["app"]) as started:
        assert started.get("/health").json()["workers"] == 3
        assert_error(post(started, b"x" * (2 * 1024 * 1024 + 1)), 413)


def test_cli_throttle_and_niceness_flags(parser, monkeypatch, capsys):
    from evidencemap.server.middleware import RefusalThrottle

    calls = record_serving(monkeypatch)
    argv = ["serve", "--refusal-delay", "0.2", "--refusal-allowance", "5"]
    args = parser.parse_args([*argv, "--costly-niceness", "7", "--torch-threads", "1"])
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)
    (throttle,) = [m for m in calls["app"].user_middleware if m.cls is RefusalThrottle]
    assert (throttle.kwargs["delay"], throttle.kwargs["allowance"]) == (0.2, 5)
    assert args.costly_niceness == 7
    assert parser.parse_args(["serve", "--refusal-delay", "0"]).refusal_delay == 0
    for bad in (
        ["--costly-niceness", "20"],
        ["--refusal-delay", "-1"],
        ["--refusal-allowance", "0"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])
    assert "expected" in capsys.readouterr().err


def test_cli_unknown_model_is_a_clear_error(parser, capsys):
    args = parser.parse_args(["serve", "--model", "resnet-9000"])
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 2
    finally:
        torch.set_num_threads(threads)
    assert "resnet-9000" in capsys.readouterr().err


def test_cli_torch_threads_default():
    from evidencemap.cli.serve import torch_threads_for

    assert torch_threads_for(2, 5) == 5
    assert torch_threads_for(10**6) == 1


# --------------------------------------------------------------------------- user models


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_user_torchscript_model_is_served(tmp_path, chelsea_png):
    from cli_helpers import Tiny2D
    from evidencemap.models import load

    path = tmp_path / "tiny.pt"
    eager = Tiny2D().eval()
    torch.jit.save(torch.jit.script(eager), str(path))
    (tmp_path / "labels.txt").write_text("ant\nbee\ncow\n")
    loaded = load(str(path), input_size=32, labels=tmp_path / "labels.txt")
    client = TestClient(create_app(model=loaded))
    assert client.get("/api/labels").json() == ["ant", "bee", "cow"]
    assert client.get("/health").json()["model"] == str(path)
    response = post(client, chelsea_png, method="saliency", target="2")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"]["input_size"] == 32
    # 451 × 300 → shorter side round(32·256/224) = 37: 56 × 37, crop 32 at (12, 2)
    assert body["image"]["crop"] == pytest.approx(
        [12 * 451 / 56, 2 * 300 / 37, 44 * 451 / 56, 34 * 300 / 37]
    )
    (result,) = body["explanations"]
    assert (result["target"], result["label"]) == (2, "cow")
    x = loaded.preprocess(Image.open(io.BytesIO(chelsea_png)))[None]
    expected = em.explain(eager, x, "saliency", target=2)
    np.testing.assert_allclose(decode_array(result["map"]), expected.maps[0, 0].numpy(), atol=1e-5)
    with torch.no_grad():
        probs = eager(x).softmax(1)[0]
    assert body["predictions"][0]["probability"] == pytest.approx(float(probs.max()), rel=1e-5)
    # a layer method cannot hook a TorchScript model: a clear 422, not a 500
    assert_error(post(client, chelsea_png, method="gradcam"), 422, "TorchScript")


def test_serve_command_serves_a_python_module_model(tmp_path, chelsea_png, monkeypatch):
    from cli_helpers import on_sys_path
    from evidencemap.cli import main

    (tmp_path / "user_vision.py").write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))\n"
    )
    served = record_serving(monkeypatch)
    with on_sys_path(tmp_path):
        status = main(
            ["serve", "--model", "user_vision:build", "--input-size", "48", "--port", "8123"]
        )
    assert status == 0
    assert served["port"] == 8123
    client = TestClient(served["app"])
    assert client.get("/api/labels").json() == []  # no labels: targets are indices
    response = post(client, chelsea_png, method="gradcam", target="1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "user_vision:build"
    assert body["image"]["input_size"] == 48
    assert body["explanations"][0]["label"] == "class 1"
    assert body["explanations"][0]["layer"] == "1"
    assert_error(post(client, chelsea_png, target="2"), 400, "from 0 to 1")


# --------------------------------------------------------------------------- the service's parts


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def count_calls(call, *functions):
    """How often each of ``functions`` runs during ``call()``, on every thread started in it."""
    import sys
    from collections import Counter

    codes = {f.__code__: f.__qualname__ for f in functions}
    counts: Counter[str] = Counter()

    def profile(frame, event, _arg):
        if event == "call" and frame.f_code in codes:
            counts[codes[frame.f_code]] += 1

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return counts


@pytest.mark.parametrize("methods", ["gradcam", "gradcam,scorecam,smoothgrad"])
def test_each_method_is_described_and_checked_once_per_request(chelsea_png, methods):
    """One request describes each of its methods once and checks their options once (it
    described a Grad-CAM 7 times and checked its options twice before the service was split)."""
    from evidencemap.methods import registry

    client = TestClient(create_app(model=_Small().eval()))  # its lanes start inside the count
    per_method = {"scorecam": {"top_k": 2}, "smoothgrad": {"samples": 2}}
    options = json.dumps({k: v for k, v in per_method.items() if k in methods})

    def request():
        response = post(client, chelsea_png, method=methods, options=options)
        assert response.status_code == 200, response.text

    counts = count_calls(request, registry.describe, registry.check_options)
    n = len(methods.split(","))
    # SmoothGrad's wrapped method is described once more, to check the options it forwards
    wrapped = "smoothgrad" in methods
    assert counts["describe"] == n + wrapped, counts
    assert counts["check_options"] == n + wrapped, counts


def test_service_config_is_checked_once_and_frozen():
    import dataclasses

    from evidencemap.server import ServiceConfig

    config = ServiceConfig(workers=4, caps={"scorecam.top_k": 8}, allowed_origins=["https://a/"])
    assert (config.costly_workers, config.costly_threads) == (None, 2)  # workers // 2
    assert config.allowed_origins == ("https://a",)
    assert config.caps == {"scorecam.top_k": 8.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.caps["x"] = 1  # type: ignore[index]
    for bad, error, words in [
        ({"workers": 0}, ValueError, "workers"),
        ({"max_pixels": 1.5}, TypeError, "max_pixels"),
        ({"refusal_delay": 61}, ValueError, "refusal_delay"),
        ({"costly_niceness": 20}, ValueError, "costly_niceness"),
        ({"time_limit": 0}, ValueError, "time_limit"),
        ({"caps": {"sampels": 1}}, ValueError, "unknown option"),
        ({"caps": {"nosuchcam.top_k": 1}}, ValueError, "unknown method"),
        ({"device": "gpu"}, ValueError, "cpu, cuda, cuda:N or mps"),
    ]:
        with pytest.raises(error, match=words):
            ServiceConfig(**bad)
    with pytest.raises(TypeError, match="unknown service setting.*wrokers"):
        config.replace(wrokers=2)
    assert config.replace(workers=8).costly_threads == 4
    assert config.replace(costly_workers=3).costly_threads == 3


def test_create_app_takes_a_config(lite0):
    from evidencemap.server import ServiceConfig

    app = create_app(model=lite0, config=ServiceConfig(workers=3, display_size=224), workers=5)
    service = app.state.service
    assert (service.config.workers, service.config.display_size) == (5, 224)
    assert TestClient(app).get("/health").json()["workers"] == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_devices_are_checked_with_a_clear_error(parser, capsys):
    from evidencemap.server.config import check_device

    assert check_device("CPU") == "cpu"
    assert check_device(None) is None
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="mps.*not available"):
            check_device("mps")
    for bad in ("gpu", "cuda:x", "cuda:1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--device", bad])
    err = capsys.readouterr().err
    assert "--device" in err
    assert "cpu, cuda, cuda:N or mps" in err
    assert "CUDA is not available" in err


def test_cli_builds_the_service_config(parser):
    from evidencemap.cli.serve import config_from_args
    from evidencemap.server import ServiceConfig

    args = parser.parse_args(
        ["serve", "--workers", "4", "--max-upload-mb", "2", "--cap", "scorecam.top_k=8"]
    )
    config = config_from_args(args)
    assert config == ServiceConfig(
        model_name="efficientnet-lite0",
        device="cpu",
        workers=4,
        max_upload_bytes=2 * 2**20,
        caps={"scorecam.top_k": 8},
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--cap", "nosuchoption=3"])


def test_methods_say_whether_they_apply_to_the_model(client):
    from evidencemap.methods.registry import applicable_methods

    body = {m["name"]: m for m in client.get("/api/methods").json()}
    assert body["gradcam"]["applies"] is True
    assert body["gradcam"]["reason"] is None
    for name in ("attention_rollout", "attention_gradient"):
        assert body[name]["applies"] is False
        assert "transformer" in body[name]["reason"]
    lite0 = client.app.state.service.model
    assert {n: m["reason"] for n, m in body.items()} == applicable_methods(lite0)


def test_a_method_that_does_not_apply_is_refused_before_any_work(client, monkeypatch):
    import evidencemap.server.service as service_module

    decoded = []
    monkeypatch.setattr(service_module, "load_image_bytes", lambda *a, **k: decoded.append(a))
    response = post(client, b"\x89PNG not really", method="gradcam,attention_rollout")
    assert_error(response, 422, "attention_rollout", "transformer", "methods that apply: gradcam")
    assert decoded == []
    assert client.get("/health").json()["busy"] == 0


def test_progress_says_cancelling_until_the_work_stops():
    from evidencemap.server.progress import RequestProgress

    progress = RequestProgress("abcdefgh", ["scorecam"])
    progress.state = "running"
    progress.report(3, 100, "scorecam")
    progress.cancel.set()
    state = progress.snapshot()
    assert state["state"] == "cancelling"
    assert state["step"] == {"desc": "scorecam", "done": 3, "total": 100}
    progress.state = "cancelled"
    assert progress.snapshot()["state"] == "cancelled"


def test_a_score_cam_stops_within_a_second_or_two_of_a_cancel(lite0, chelsea_png):
    """Chunks of 256 masked inputs took several seconds each, and a cancel waited for the
    chunk to end (11 s on a loaded machine); a stoppable run now keeps its chunks to about
    half a second. (The costly lane at normal priority: this measures the chunks, not how
    the operating system treats a niced thread on a machine busy with other processes.)"""
    client = TestClient(create_app(model=lite0, costly_niceness=0))
    options = json.dumps({"internal_batch_size": 256})
    answer: dict = {}

    def score_cam():
        answer["response"] = post(
            client, chelsea_png, method="scorecam", options=options, request_id="cancel-soon"
        )
        answer["at"] = time.monotonic()

    thread = threading.Thread(target=score_cam)
    thread.start()

    def started():
        step = client.get("/api/progress/cancel-soon").json()["step"]
        return step is not None and step["done"] >= 2

    wait_for(started, 60, what="Score-CAM's second chunk")
    cancelled_at = time.monotonic()
    assert client.post("/api/cancel/cancel-soon").json()["state"] == "cancelling"
    thread.join(60)
    assert_error(answer["response"], 499, "cancelled")
    assert answer["at"] - cancelled_at < 2.0
    assert client.get("/api/progress/cancel-soon").json()["state"] == "cancelled"


def test_npz_download_of_an_answer(client, chelsea_png):
    response = post(client, chelsea_png, method="gradcam")
    result = response.json()["explanations"][0]
    fields = ("map", "raw", "target", "method", "score", "layer", "options")
    body = {key: result[key] for key in fields}
    npz = client.post("/api/download/npz", json=body)
    assert npz.status_code == 200, npz.text
    # The library's one maps schema, read back by its reader (the CLI writes the same).
    saved = load_maps(io.BytesIO(npz.content))
    assert saved.version == MAPS_VERSION
    np.testing.assert_array_equal(saved.maps[0, 0], decode_array(result["map"]))
    np.testing.assert_array_equal(saved.raw[0, 0], decode_array(result["raw"][0]))
    assert saved.targets.tolist() == [result["target"]]
    assert saved.scores[0] == pytest.approx(result["score"])
    assert saved.method == "gradcam"
    assert saved.layers == [result["layer"]]
    assert saved.options == result["options"]
    bad = dict(body, map=dict(body["map"], shape=[3, 3]))
    assert_error(client.post("/api/download/npz", json=bad), 400, "shape")


def test_the_documented_example_route_works(lite0):
    """docs/server.md's "Adding a route" example, as written there."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "server.md").read_text()
    section = text.split("### Adding a route", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 12
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/server.md", "exec"), namespace)
    app = create_app(model=lite0)
    app.include_router(namespace["router"])
    answer = TestClient(app).get("/api/device").json()
    assert answer == {"device": "cpu", "model": "efficientnet-lite0"}


def test_an_abandoned_worker_s_error_is_not_logged_as_never_retrieved(caplog):
    """At shutdown the explain route answers 503 without waiting for the worker; the worker's
    own 503, raised later at its checkpoint, is retrieved, so asyncio logs no traceback (the
    service process's log stays free of "Future exception was never retrieved")."""
    import asyncio
    import gc
    import logging

    from evidencemap.server.errors import ApiError
    from evidencemap.server.routes.explain import abandon

    async def left(with_abandon: bool) -> None:
        future = asyncio.get_running_loop().create_future()
        if with_abandon:
            abandon(future)
        future.set_exception(ApiError(503, "the service is shutting down; retry later"))
        await asyncio.sleep(0)  # the done callbacks run

    for with_abandon, logged in ((False, True), (True, False)):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            asyncio.run(left(with_abandon))
            gc.collect()
        assert ("never retrieved" in caplog.text) is logged, (with_abandon, caplog.text)
