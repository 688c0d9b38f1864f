"""No request may hog the service: caps, memory budget, time limit, cancellation, origins."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import evidencemap as em
from evidencemap import runtime
from evidencemap.memory import PeakMemory
from evidencemap.methods import OptionError
from server_helpers import decode_array, photo_bytes
from tiny import ConvGapFc, seeded

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from evidencemap.server import create_app
from evidencemap.server.app import ApiError
from evidencemap.server.forms import ExplainRequest


@pytest.fixture(scope="module")
def png():
    return photo_bytes("chelsea", "PNG")


@pytest.fixture(scope="module")
def client(lite0):
    return TestClient(create_app(model=lite0, workers=2))


def post(client, png, headers=None, **form):
    return client.post(
        "/api/explain", files={"file": ("c.png", png, "image/png")}, data=form, headers=headers
    )


# ------------------------------------------------------------------ runtime (library level)


def test_checkpoint_is_free_outside_limits_and_stops_inside():
    runtime.checkpoint(1, 2, "x")  # no limits: nothing happens
    event = threading.Event()
    seen = []
    with runtime.limits(cancel=event, progress=lambda d, t, s: seen.append((d, t, s))):
        runtime.checkpoint(1, 4, "step")
        event.set()
        with pytest.raises(runtime.RunCancelledError, match="cancelled"):
            runtime.checkpoint(2, 4, "step")
    assert seen == [(1, 4, "step")]
    with runtime.limits(timeout=0.0):
        time.sleep(0.01)
        with pytest.raises(runtime.RunCancelledError, match="time"):
            runtime.checkpoint()
    assert runtime.current() == runtime.Limits()  # restored


def test_a_stoppable_chunked_run_keeps_its_chunks_short(monkeypatch):
    """A run that can be cancelled (or has a deadline) is stopped only between chunks, so its
    chunks last about CHUNK_SECONDS each: one item first, then as many as that time holds."""
    sizes: list[int] = []

    def step(start: int, stop: int) -> None:
        sizes.append(stop - start)
        time.sleep(0.02 * (stop - start))

    runtime.run_chunked(40, 1, 40, step)  # no limits: the chunk asked for
    assert sizes == [40]
    monkeypatch.setattr(runtime, "CHUNK_SECONDS", 0.1)
    for limits in ({"cancel": threading.Event()}, {"timeout": 60.0}):
        sizes.clear()
        with runtime.limits(**limits):
            runtime.run_chunked(40, 1, 40, step)
        assert sizes[0] == 1
        assert sum(sizes) == 40
        assert max(sizes) <= 5  # 0.1 s / 0.02 s per item
        assert max(sizes) >= 2  # not one item at a time either


def test_nested_limits_combine_to_the_tightest():
    with runtime.limits(memory_budget=1000), runtime.limits(memory_budget=5000):
        assert runtime.current().memory_budget == 1000
        assert runtime.chunk_items(100, 64) == 10
        with pytest.raises(runtime.BudgetExceededError, match="memory budget"):
            runtime.chunk_items(2000, 1)
    assert runtime.chunk_items(2000, 3, budget=100) == 1  # a method's own budget: >= 1 item


def test_limits_are_per_thread():
    seen = []
    with runtime.limits(memory_budget=10):
        worker = threading.Thread(target=lambda: seen.append(runtime.current().memory_budget))
        worker.start()
        worker.join()
    assert seen == [None]


def test_every_chunked_method_stays_inside_the_budget_and_can_be_cancelled():
    model = seeded(ConvGapFc())
    x = torch.randn(2, 3, 8, 8)
    per_input = x[0].numel() * 4
    for name, options in (
        ("scorecam", {"internal_batch_size": 64}),
        ("integrated_gradients", {"internal_batch_size": 64, "steps": 8}),
        ("smoothgrad", {"internal_batch_size": 64, "samples": 8}),
    ):
        with PeakMemory() as free:
            whole = em.explain(model, x, name, **options)
        # a third of what the whole run takes gives the same result in more chunks (the peak
        # itself: test_registry.py's memory test)
        with runtime.limits(memory_budget=free.peak // 3):
            chunked = em.explain(model, x, name, **options)
        assert torch.allclose(whole.maps, chunked.maps, atol=1e-5), name
        with runtime.limits(memory_budget=per_input), pytest.raises(runtime.BudgetExceededError):
            em.explain(model, x, name, **options)
        event = threading.Event()
        event.set()
        with runtime.limits(cancel=event), pytest.raises(runtime.RunCancelledError):
            em.explain(model, x, name, **options)


def test_progress_is_reported_by_the_long_methods():
    model = seeded(ConvGapFc())
    x = torch.randn(1, 3, 8, 8)
    seen: list[tuple[int, int, str]] = []
    with runtime.limits(progress=lambda d, t, s: seen.append((d, t, s))):
        em.explain(model, x, "smoothgrad", samples=6, internal_batch_size=2)
        em.explain(model, x, "integrated_gradients", steps=6, internal_batch_size=2)
    assert [d for d, t, s in seen if s == "smoothgrad"] == [0, 2, 4]
    assert [d for d, t, s in seen if s == "integrated_gradients"] == [0, 2, 4]


def test_caps_refuse_costly_options():
    model = seeded(ConvGapFc())
    with pytest.raises(OptionError, match="samples=10000000 is over this service's cap of 200"):
        em.build("smoothgrad", model, caps={}, samples=10_000_000)
    with pytest.raises(OptionError, match="cap of 5"):
        em.build("integrated_gradients", model, caps={"steps": 5}, steps=6)
    em.build("smoothgrad", model, samples=10_000_000)  # no caps: a library user decides


# ------------------------------------------------------------------ the service


@pytest.mark.parametrize(
    ("method", "options", "word"),
    [
        ("scorecam", {"internal_batch_size": 100000}, "internal_batch_size=100000"),
        ("smoothgrad", {"samples": 10_000_000}, "samples=10000000"),
        ("integrated_gradients", {"internal_batch_size": 1_000_000}, "internal_batch_size"),
        ("integrated_gradients", {"steps": 100000}, "steps=100000"),
    ],
)
def test_hostile_options_are_refused_before_any_work(client, png, method, options, word):
    began = time.perf_counter()
    response = post(client, png, method=method, options=json.dumps(options))
    assert response.status_code == 422, response.text
    assert word in response.json()["error"]
    assert "cap" in response.json()["error"]
    assert time.perf_counter() - began < 5


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("fgvis", {"max_iterations": 100_000_000}),  # over the cap
        ("scorecam", {"top_kk": 8}),  # unknown option
        ("smoothgrad", {"samples": "many"}),  # wrong type
        ("gradcam,smoothgrad", {"smoothgrad": {"samples": 10_000_000}}),  # per method
    ],
)
def test_bad_options_are_refused_before_the_image_is_decoded(client, monkeypatch, method, options):
    import evidencemap.server.service as service_module

    decoded = []
    monkeypatch.setattr(service_module, "load_image_bytes", lambda *a, **k: decoded.append(a))
    garbage = b"\x89PNG not really" + bytes(2_000_000)  # undecodable, 2 MB
    began = time.perf_counter()
    response = client.post(
        "/api/explain",
        files={"file": ("big.png", garbage, "image/png")},
        data={"method": method, "options": json.dumps(options)},
    )
    assert response.status_code == 422, response.text
    assert "method " in response.json()["error"]
    assert decoded == []
    assert time.perf_counter() - began < 5
    # a good request on the same (undecodable) body reaches the decoder
    monkeypatch.undo()
    response = client.post(
        "/api/explain", files={"file": ("big.png", garbage, "image/png")}, data={"method": "fgvis"}
    )
    assert response.status_code == 415, response.text


def test_caps_are_configurable_and_reported(lite0, png):
    app = create_app(model=lite0, caps={"samples": 4, "scorecam.top_k": 8})
    c = TestClient(app)
    specs = {
        m["name"]: {o["name"]: o for o in m["option_specs"]} for m in c.get("/api/methods").json()
    }
    assert specs["smoothgrad"]["samples"]["cap"] == 4
    assert specs["scorecam"]["top_k"]["cap"] == 8
    assert specs["integrated_gradients"]["steps"]["cap"] == 512  # the default cap
    assert specs["gradcam"]["relu"]["cap"] is None
    response = post(c, png, method="smoothgrad", options=json.dumps({"samples": 5}))
    assert response.status_code == 422
    with pytest.raises(ValueError, match="unknown option"):
        create_app(model=lite0, caps={"sampels": 4})


def test_memory_budget_is_a_4xx(lite0, png):
    c = TestClient(create_app(model=lite0, memory_budget=100_000))
    response = post(c, png, method="scorecam", options=json.dumps({"top_k": 4}))
    assert response.status_code == 413, response.text
    assert "memory budget" in response.json()["error"]
    assert post(c, png, method="gradcam").status_code == 200  # cheap methods still answer


def test_a_top_k_request_is_split_by_the_budget_or_refused(lite0, png):
    """The service explains the top-k classes as one batch of k copies of the photo: under a
    budget that holds two Grad-CAM inputs (about 12 MiB each) the batch is split and the maps
    are those computed without a budget; under one that holds none it is a 413, never a 5xx."""
    free = TestClient(create_app(model=lite0, memory_budget=None))
    tight = TestClient(create_app(model=lite0, memory_budget=24 * 2**20))
    tiny = TestClient(create_app(model=lite0, memory_budget=4 * 2**20))
    want = post(free, png, method="gradcam", top_k="3")
    assert want.status_code == 200, want.text
    sizes: list[int] = []
    handle = lite0.module.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    try:
        got = post(tight, png, method="gradcam", top_k="3")
    finally:
        handle.remove()
    assert got.status_code == 200, got.text
    assert max(sizes) == 2, sizes  # never the three copies at once
    pairs = zip(got.json()["explanations"], want.json()["explanations"], strict=True)
    for a, b in pairs:
        assert a["target"] == b["target"]
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
        assert np.allclose(decode_array(a["map"]), decode_array(b["map"]), atol=1e-5)
    refused = post(tiny, png, method="gradcam", top_k="3")
    assert refused.status_code == 413, refused.text
    assert "memory budget" in refused.json()["error"]


def test_time_limit_stops_a_long_request(lite0, png):
    c = TestClient(create_app(model=lite0, time_limit=0.5))
    began = time.perf_counter()
    response = post(c, png, method="smoothgrad", options=json.dumps({"samples": 200}))
    assert response.status_code == 422, response.text
    assert "time limit" in response.json()["error"]
    assert time.perf_counter() - began < 10


def test_cancel_event_stops_the_service_call(lite0, png):
    app = create_app(model=lite0)
    service = app.state.service
    event = threading.Event()
    event.set()
    prepared = service.prepare(ExplainRequest((em.describe("smoothgrad"),)))
    with pytest.raises(ApiError) as err:
        service.explain(png, prepared, event)
    assert err.value.status == 499


def test_cross_origin_posts_are_refused(client, png):
    evil = post(client, png, headers={"Origin": "http://evil.example"}, method="gradcam")
    assert evil.status_code == 403
    assert "cross-origin" in evil.json()["error"]
    same = post(client, png, headers={"Origin": "http://testserver"}, method="gradcam")
    assert same.status_code == 200


def test_allowed_origins(lite0, png):
    c = TestClient(create_app(model=lite0, allowed_origins=["https://tools.example"]))
    ok = post(c, png, headers={"Origin": "https://tools.example"}, method="gradcam")
    assert ok.status_code == 200


def test_security_headers_on_every_answer(client, png):
    for response in (client.get("/"), client.get("/health"), post(client, png)):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_refusals_of_a_client_that_keeps_being_refused_are_held(lite0, png):
    app = create_app(model=lite0, refusal_allowance=3, refusal_delay=0.4)
    c = TestClient(app)
    bad = {"method": "fgvis", "options": json.dumps({"max_iterations": 10**8})}
    times = []
    for _ in range(5):
        began = time.perf_counter()
        assert post(c, png, **bad).status_code == 422
        times.append(time.perf_counter() - began)
    assert max(times[:3]) < 0.35  # within the allowance: answered at once
    assert min(times[3:]) >= 0.4  # over it: each refusal waits the delay
    evil = time.perf_counter()  # a 403 from the origin guard counts and waits as well
    assert post(c, png, headers={"Origin": "http://evil.example"}).status_code == 403
    assert time.perf_counter() - evil >= 0.4
    began = time.perf_counter()  # valid requests from that client are never held
    assert post(c, png, method="gradcam").status_code == 200
    assert c.get("/health").status_code == 200
    assert time.perf_counter() - began < 5
    off = TestClient(create_app(model=lite0, refusal_delay=0, refusal_allowance=1))
    began = time.perf_counter()
    for _ in range(4):
        assert post(off, png, **bad).status_code == 422
    assert time.perf_counter() - began < 1.2


def test_refusal_throttle_counts_per_address_in_a_window():
    from evidencemap.server.middleware import RefusalThrottle

    throttle = RefusalThrottle(None, delay=0.5, allowance=2, window=10.0, max_clients=2)
    assert [throttle.refused("a", now=t) for t in (0.0, 1.0, 2.0, 3.0)] == [0, 0, 0.5, 0.5]
    assert throttle.refused("b", now=3.0) == 0  # another address has its own count
    assert throttle.refused("a", now=11.5) == 0.5  # 2.0, 3.0 and 11.5 are inside the window
    assert throttle.refused("a", now=14.0) == 0  # only 11.5 and 14.0 are
    assert throttle.refused("a", now=30.0) == 0  # after a quiet window it starts over
    throttle.refused("c", now=30.0)  # a third address: the least recently refused is forgotten
    assert set(throttle._refusals) == {"a", "c"}
    assert all(len(times) <= 3 for times in throttle._refusals.values())  # bounded memory


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"refusal_delay": -1}, "refusal_delay"),
        ({"refusal_delay": 100}, "refusal_delay"),
        ({"refusal_allowance": 0}, "refusal_allowance"),
        ({"costly_niceness": 20}, "costly_niceness"),
        ({"costly_niceness": 1.5}, "costly_niceness"),
    ],
)
def test_throttle_and_niceness_arguments_are_checked(lite0, kwargs, word):
    with pytest.raises((TypeError, ValueError), match=word):
        create_app(model=lite0, **kwargs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities: Linux")
def test_the_costly_lane_runs_at_a_lower_priority(lite0):
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = niceness()
    app = create_app(model=lite0, workers=1, costly_workers=1)
    assert app.state.costly_executor.submit(niceness).result() == min(19, base + 19)
    assert app.state.executor.submit(niceness).result() == base
    assert niceness() == base  # the caller's thread is untouched
    same = create_app(model=lite0, workers=1, costly_workers=1, costly_niceness=0)
    assert same.state.costly_executor.submit(niceness).result() == base
    for a in (app, same):
        a.state.executor.shutdown()
        a.state.costly_executor.shutdown()


def test_empty_method_field_is_a_400(client, png):
    response = post(client, png, method="")
    assert response.status_code == 400
    assert "method must name" in response.json()["error"]


# ------------------------------------------------------------------ the command line and API


def test_window_with_a_negative_low_value_parses():
    from evidencemap.cli import _join_negative_values, build_parser

    argv = _join_negative_values(["explain", "scan.nii.gz", "--window", "-1000,400"])
    assert argv[-1] == "--window=-1000,400"
    args = build_parser().parse_args(argv)
    assert args.window == (-1000.0, 400.0)


def test_top_k_is_explained_in_batches(lite0):
    from evidencemap.cli import build_parser
    from evidencemap.cli.explain import settings_from_args
    from evidencemap.models.loading import load_model

    loaded = load_model("efficientnet-lite0")
    args = build_parser().parse_args(["explain", "x.jpg", "--top-k", "1000", "--batch-size", "4"])
    assert settings_from_args(args, loaded).method.batch_size == 4
    args = build_parser().parse_args(["explain", "x.jpg", "--batch-size", "4"])
    assert settings_from_args(args, loaded).method.batch_size is None  # one call per batch


def test_float64_inputs_are_cast_to_the_model_dtype():
    model = seeded(ConvGapFc())
    x = torch.randn(2, 3, 8, 8)
    single = em.explain(model, x, "gradcam")
    double = em.explain(model, x.double(), "gradcam")
    assert double.maps.dtype == torch.float32
    assert torch.allclose(single.maps, double.maps, atol=1e-6)


def test_unknown_option_names_the_method_not_a_constructor():
    model = seeded(ConvGapFc())
    with pytest.raises(OptionError) as err:
        em.explain(model, torch.randn(1, 3, 8, 8), "gradcam", conterfactual=True)
    text = str(err.value)
    assert "method 'gradcam' takes no option 'conterfactual'" in text
    assert "counterfactual" in text
    assert "__init__" not in text


def test_method_progress_shows_a_bar_per_step(capsys):
    from evidencemap.cli.progress import method_progress

    model = seeded(ConvGapFc())
    with method_progress(True):
        em.explain(model, torch.randn(1, 3, 8, 8), "smoothgrad", samples=4, internal_batch_size=1)
    assert "smoothgrad" in capsys.readouterr().err


def test_large_photos_load_without_pil_warnings(monkeypatch):
    import io
    import warnings as w

    from PIL import Image

    from evidencemap.io import load_image_bytes

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 × 40 is between 1× and 2×
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buffer, format="PNG")
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        image = load_image_bytes(buffer.getvalue())
    assert image.size == (40, 40)
    assert not [c for c in caught if issubclass(c.category, Image.DecompressionBombWarning)]


def test_explanation_warning_per_sample():
    from evidencemap.explanation import Explanation

    exp = Explanation(
        maps=torch.zeros(2, 1, 4, 4),
        raw=torch.zeros(2, 1, 4, 4),
        targets=None,
        scores=torch.zeros(2),
        method="fgvis",
        extras={"degenerate": torch.tensor([False, True]), "warning": "flat map: use gradcam"},
    )
    assert exp.warning(0) is None
    assert exp.warning(1) == "flat map: use gradcam"
    assert Explanation(exp.maps, exp.raw, None, exp.scores, "gradcam").warning(0) is None
