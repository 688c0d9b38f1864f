"""``evidencemap batch --engine ray`` and :mod:`evidencemap.distributed`: the same outputs as the
local engine, on one local Ray cluster (2 CPUs) that this module starts and stops."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import write_photos
from evidencemap import methods as method_names
from evidencemap.cli import main
from evidencemap.distributed import RAY_MISSING, BatchSpec, Explainer, plan_pool

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

SRC = Path(__file__).resolve().parents[1] / "src"

# Manifest fields that legitimately differ between two runs of the same inputs (docs/distributed.md).
TIMING = ("seconds",)
BATCH_TIMING = ("seconds",)
ENGINE = "engine"

# A small image CNN as a user module, loaded by its import string from the working folder.
TINY_NETS = textwrap.dedent(
    """
    import torch
    from torch import nn


    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )
    """
)


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging past ``seconds``."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[object]:
    """One local 2-CPU Ray cluster for the module, shut down at the end."""
    ray = pytest.importorskip("ray", reason="the ray tests need pip install '.[ray]'")
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    try:
        with deadline(120):
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                logging_level="ERROR",
                runtime_env={"env_vars": {"PYTHONPATH": path}},
            )
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three real photos (one in a subfolder), a text file and a truncated JPEG."""
    folder = write_photos(tmp_path_factory.mktemp("photos"))
    (folder / "c_text.jpg").write_text("not an image at all")
    (folder / "d_truncated.jpg").write_bytes((folder / "a_chelsea.jpg").read_bytes()[:2000])
    return folder


def _run(capsys, *argv: object) -> tuple[int, str, str]:
    with deadline(240):
        status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.out, captured.err


def _files(folder: Path) -> dict[Path, Path]:
    return {p.relative_to(folder): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _comparable(manifest: dict, name: Path) -> dict:
    """The manifest ``name`` (relative to its output folder) without its timings and engine,
    with the output folder in its paths replaced by ``OUT/``."""
    prefix = manifest["outputs"]["manifest"][: -len(str(name))]
    kept = json.loads(json.dumps(manifest).replace(json.dumps(prefix)[1:-1], "OUT/"))
    for key in (*TIMING, ENGINE):
        kept.pop(key)
    for key in BATCH_TIMING:
        kept["batch"].pop(key)
    return kept


def assert_same_outputs(local: Path, other: Path, engine: str = "ray") -> None:
    """Same files; maps bit for bit, pictures byte for byte, manifests field for field."""
    left, right = _files(local), _files(other)
    assert sorted(left) == sorted(right)
    assert any(name.suffix == ".npz" for name in left)
    for name, path in left.items():
        if name.suffix == ".npz":
            a, b = np.load(path), np.load(right[name])
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                assert a[key].dtype == b[key].dtype
                assert np.array_equal(a[key], b[key]), (name, key)
        elif name.suffix == ".png":
            assert path.read_bytes() == right[name].read_bytes(), name
        else:
            a = json.loads(path.read_text(encoding="utf-8"))
            b = json.loads(right[name].read_text(encoding="utf-8"))
            assert (a[ENGINE], b[ENGINE]) == ("local", engine)
            assert _comparable(a, name) == _comparable(b, name), name


# --------------------------------------------------------------------------- without a cluster


def test_plan_pool_sizes_from_the_cluster_and_refuses_what_cannot_start():
    assert plan_pool({"CPU": 2.0}).describe() == "2 actors × 1 CPU"
    assert plan_pool({"CPU": 2.0}, cpus_per_actor=0.5).actors == 4
    assert plan_pool({"CPU": 16.0, "GPU": 2.0}, gpus_per_actor=0.5).actors == 4
    assert plan_pool({"CPU": 3.0, "GPU": 4.0}, gpus_per_actor=1).actors == 3  # CPU-bound
    assert plan_pool({"CPU": 2.0}, actors=1).describe() == "1 actor × 1 CPU"
    with pytest.raises(ValueError, match="do not fit the cluster's 2 CPUs: at most 2"):
        plan_pool({"CPU": 2.0}, actors=3)
    with pytest.raises(ValueError, match="the cluster has 0 GPUs"):
        plan_pool({"CPU": 8.0}, gpus_per_actor=1)
    with pytest.raises(ValueError, match="cpus_per_actor must be > 0"):
        plan_pool({"CPU": 2.0}, cpus_per_actor=0)
    with pytest.raises(ValueError, match="at most 0"):
        plan_pool({"CPU": 0.5})


def test_batch_spec_checks_its_fields():
    assert BatchSpec(method="grad-cam").method == "gradcam"  # canonical name
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        BatchSpec(batch_size=0)
    with pytest.raises(ValueError, match="exclude each other"):
        BatchSpec(target=3, top_k=2)
    with pytest.raises(ValueError, match="unknown method"):
        BatchSpec(method="nope")
    with pytest.raises(TypeError, match="model spec string"):
        BatchSpec(model=None)  # type: ignore[arg-type]


def test_batch_spec_builds_the_engine_settings_without_the_command_line(monkeypatch, tmp_path):
    from evidencemap.engine import Settings, output_stem

    (tmp_path / "tinynets.py").write_text(TINY_NETS)
    monkeypatch.chdir(tmp_path)
    spec = BatchSpec(
        model="tinynets:build", input_size=(32,), target="1", options={"relu": False}, frame=None
    )
    loaded = spec.load()
    settings = spec.settings(loaded, engine="ray")
    assert isinstance(settings, Settings)
    assert (settings.target, settings.target_name, settings.engine) == (1, "1", "ray")
    assert dict(settings.options) == {"relu": False}
    with pytest.raises(AttributeError):
        settings.engine = "local"  # type: ignore[misc]  # frozen
    assert output_stem(Path("out/cat"), settings).name.startswith("cat_gradcam_t1_o")
    with pytest.raises(ValueError, match="frame must be an index >= 0"):
        BatchSpec(frame=-1)
    with pytest.raises(ValueError, match="--device|device cuda:7"):
        BatchSpec(model="tinynets:build", device="cuda:7").load()


def test_the_library_never_imports_the_command_line():
    """The engine and the Ray module are library code: no import of evidencemap.cli, even
    inside functions (the import cycle cli ↔ distributed is gone)."""
    import ast

    package = SRC / "evidencemap"
    files = [*sorted((package / "engine").glob("*.py")), package / "distributed.py"]
    assert len(files) > 2
    for path in files:
        name = path.name
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not [m for m in imported if m and m.startswith("evidencemap.cli")], name
        assert "argparse" not in imported, name


def test_engine_ray_without_ray_is_one_line_naming_the_extra(capsys, monkeypatch, photos, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    status, _, stderr = _run(capsys, "batch", photos, "--out", tmp_path, "--engine", "ray")
    assert status == 1
    assert stderr == f"evidencemap batch: error: {RAY_MISSING}\n"
    assert "evidencemap[ray]" in stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--actors", "2"], "--actors: only with --engine ray"),
        (["--gpus-per-actor", "1", "--address", "auto"], "--address, --gpus-per-actor: only with"),
        (["--engine", "ray", "--device", "cuda"], "give --gpus-per-actor F for CUDA actors"),
        (["--engine", "ray", "--cpus-per-actor", "0"], "expected a number > 0"),
    ],
)
def test_engine_options_that_do_not_go_together(capsys, photos, tmp_path, argv, message):
    status, _, stderr = _run(capsys, "batch", photos, "--out", tmp_path, *argv)
    assert status == 2
    assert message in stderr


def test_neither_import_nor_the_command_line_imports_ray():
    code = (
        "import sys, evidencemap, evidencemap.distributed\n"
        "from evidencemap.cli import main\n"
        "assert main(['methods']) == 0\n"
        "print('ray' in sys.modules, 'pyarrow' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False"


# Every method that explains a CNN (the attention methods need a transformer's attention layers).
CNN_METHODS = [m for m in method_names() if not m.startswith("attention")]
QUICK = {"fgvis": {"max_iterations": 4}, "integrated_gradients": {"steps": 4}}
QUICK["smoothgrad"] = {"samples": 3}


DEFAULT_SUITE = ("gradcam", "scorecam", "fgvis", "integrated_gradients")  # the rest: -m slow


@pytest.mark.filterwarnings("ignore::UserWarning")  # FGVis's flat-map notice on a tiny network
@pytest.mark.parametrize(
    "method",
    [m if m in DEFAULT_SUITE else pytest.param(m, marks=pytest.mark.slow) for m in CNN_METHODS],
)
def test_the_actor_code_writes_what_the_local_engine_writes(
    capsys, monkeypatch, photos, tmp_path, method
):
    """The actor's whole path (spec → model → method → pipeline) without Ray's transport, for
    every CNN method on a user model given by its import string."""
    (tmp_path / "tinynets.py").write_text(TINY_NETS)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a_chelsea.jpg", "b_coffee.jpg"):
        shutil.copy(photos / name, folder / name)
    options = [f"--option={k}={v}" for k, v in QUICK.get(method, {}).items()]
    common = ["--model", "tinynets:build", "--input-size", "32", "--method", method]
    status, _, stderr = _run(
        capsys, "batch", "in", "--out", "local", "--threads", "1", *common, *options
    )
    assert status == 0, stderr

    spec = BatchSpec(
        model="tinynets:build",
        method=method,
        input_size=(32,),
        options=QUICK.get(method, {}),
        batch_size=16,
        threads=1,
        workdir=str(tmp_path),
    )
    explainer = Explainer(spec, out="actor", root="in")
    rows = explainer({"path": np.array(["in/a_chelsea.jpg", "in/b_coffee.jpg"], dtype=object)})
    assert list(rows["status"]) == ["done", "done"]
    # the names the local engine gave (with _o… for options other than the defaults)
    local_names = [f"actor/{p.name}" for p in sorted((tmp_path / "local").glob("*.json"))]
    assert list(rows["manifest"]) == local_names
    assert all(name.startswith(f"actor/a_chelsea_{method}") for name in local_names[:1])
    assert rows["label"][0].startswith("class ")  # no labels: classes are "class N"
    assert 0 < rows["probability"][0] <= 1
    assert_same_outputs(tmp_path / "local", tmp_path / "actor")


def test_explainer_refuses_batches_it_cannot_place(monkeypatch, tmp_path):
    (tmp_path / "tinynets.py").write_text(TINY_NETS)
    monkeypatch.chdir(tmp_path)
    explainer = Explainer(BatchSpec(model="tinynets:build", input_size=(32,)))
    with pytest.raises(ValueError, match="needs a 'path' column, got \\['image'\\]"):
        explainer({"image": np.zeros(1)})
    with pytest.raises(ValueError, match=r"needs Explainer\(out=...\)"):
        explainer({"path": np.array(["x.jpg"], dtype=object)})
    with pytest.raises(ValueError, match="method 'gradcam': .*no_such_layer"):
        Explainer(BatchSpec(model="tinynets:build", input_size=(32,), layer="no_such_layer"))
    with pytest.raises(TypeError, match="spec must be a BatchSpec"):
        Explainer({"model": "tinynets:build"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- on the cluster


@pytest.mark.ray
def test_ray_engine_equals_local_reports_bad_files_and_resumes(
    capsys, ray_cluster, photos, tmp_path
):
    local, out = tmp_path / "local", tmp_path / "ray"
    argv = ["batch", photos, "--batch-size", "2", "--threads", "1", "--quiet"]
    status, stdout, _ = _run(capsys, *argv, "--out", local)
    assert status == 1
    assert "done 3, skipped 0" in stdout

    status, stdout, stderr = _run(capsys, *argv, "--out", out, "--engine", "ray")
    assert status == 1
    assert f"{photos / 'c_text.jpg'} is not a readable" in stderr
    assert f"{photos / 'd_truncated.jpg'} is truncated or corrupt" in stderr
    assert "done 3, skipped 0" in stdout
    assert "failed 2" in stdout
    assert stdout.rstrip().endswith("; engine ray, 2 actors × 1 CPU")  # the 2-CPU cluster full
    assert_same_outputs(local, out)
    chelsea = json.loads((out / "a_chelsea_gradcam.json").read_text())
    assert chelsea["batch"]["inputs"] == 2  # the local engine's batches: chelsea with coffee

    # resume: a finished input is skipped, an unfinished one (no manifest) is done again
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    (out / "b_coffee_gradcam.json").unlink()
    status, stdout, _ = _run(capsys, *argv, "--out", out, "--engine", "ray", "--actors", "1")
    assert "done 1, skipped 2" in stdout
    assert stdout.rstrip().endswith("; engine ray, 1 actor × 1 CPU")
    now = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    changed = {p.name for p in now if now[p] != written.get(p)}
    assert changed == {f"b_coffee_gradcam.{ext}" for ext in ("json", "npz", "png")}
    status, stdout, _ = _run(capsys, *argv, "--out", out, "--engine", "ray")
    assert "done 0, skipped 3" in stdout


@pytest.mark.ray
def test_ray_engine_with_a_user_model_top_k_and_half_cpu_actors(
    capsys, monkeypatch, ray_cluster, photos, tmp_path
):
    (tmp_path / "tinynets.py").write_text(TINY_NETS)
    monkeypatch.chdir(tmp_path)  # the actors read the module and the inputs from here too
    shutil.copytree(photos / "sub", tmp_path / "in")
    shutil.copy(photos / "b_coffee.jpg", tmp_path / "in")
    argv = ["batch", "in", "--model", "tinynets:build", "--input-size", "32", "--threads", "1"]
    argv += ["--method", "gradcam++", "--top-k", "2", "--batch-size", "1", "--quiet"]
    assert _run(capsys, *argv, "--out", "local")[0] == 0
    status, stdout, stderr = _run(
        capsys, *argv, "--out", "ray", "--engine", "ray", "--cpus-per-actor", "0.5", "--actors", "2"
    )
    assert status == 0, stderr
    assert stdout.rstrip().endswith("; engine ray, 2 actors × 0.5 CPU")
    assert len(list((tmp_path / "ray").glob("*_top2_2.png"))) == 2
    assert_same_outputs(tmp_path / "local", tmp_path / "ray")


@pytest.mark.ray
def test_explainer_in_a_users_own_ray_data_pipeline(capsys, ray_cluster, photos, tmp_path):
    from ray.data import ActorPoolStrategy

    argv = ["batch", photos, "--batch-size", "1", "--threads", "1", "--quiet"]
    assert _run(capsys, *argv, "--out", tmp_path / "local")[0] == 1
    paths = sorted(str(p) for p in photos.rglob("*") if p.is_file())
    spec = BatchSpec(batch_size=1, threads=1)
    with deadline(240):
        rows = (
            ray_cluster.data.from_items([{"path": p} for p in paths])
            .map_batches(
                Explainer,
                fn_constructor_kwargs={"spec": spec, "out": str(tmp_path / "own"), "root": photos},
                batch_size=1,
                compute=ActorPoolStrategy(size=2),
                num_cpus=0.5,
            )
            .take_all()
        )
    by_path = {row["path"]: row for row in rows}
    assert sorted(by_path) == paths
    assert by_path[str(photos / "c_text.jpg")]["status"] == "failed"
    assert "truncated or corrupt" in by_path[str(photos / "d_truncated.jpg")]["message"]
    rocket = by_path[str(photos / "sub" / "rocket.png")]
    assert (rocket["status"], rocket["label"]) == ("done", "missile")
    assert rocket["manifest"] == str(tmp_path / "own" / "sub" / "rocket_gradcam.json")
    assert_same_outputs(tmp_path / "local", tmp_path / "own")


@pytest.mark.ray
def test_an_actor_that_cannot_build_the_model_stops_the_job_with_its_reason(
    ray_cluster, photos, tmp_path
):
    from evidencemap.distributed import run_on_ray

    spec = BatchSpec(model="no_such_module_here:build", batch_size=2)
    paths = [photos / "a_chelsea.jpg", photos / "b_coffee.jpg"]
    done: list[str] = []
    with deadline(240), pytest.raises(RuntimeError, match="the Ray job stopped: .*no_such_module"):
        run_on_ray(paths, [tmp_path / "a", tmp_path / "b"], spec, done.append, done.append)
    assert done == []
    assert not any(tmp_path.iterdir())
