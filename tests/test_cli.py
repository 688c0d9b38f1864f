"""The ``evidencemap`` command end to end: real photos, volumes, batches, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import evidencemap
from cli_helpers import (
    Tiny2D,
    blob_volume,
    on_sys_path,
    registered_input_method,
    write_photos,
    write_tiny3d_module,
)
from evidencemap import io
from evidencemap.cli import COMMANDS, main
from evidencemap.cli.common import parse_option
from evidencemap.maps import normalize
from evidencemap.models.loading import load_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

SRC = Path(__file__).resolve().parents[1] / "src"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, MISSILE = 967, 657


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """chelsea and coffee as JPEG (quality 90, like examples/), rocket as PNG in a subfolder."""
    return write_photos(tmp_path_factory.mktemp("photos"))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.out, captured.err


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- explain


def test_explain_real_photos_writes_overlay_maps_and_manifest(capsys, photos, tmp_path):
    out = tmp_path / "out"
    status, stdout, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", photos / "b_coffee.jpg", "--out", out
    )
    assert status == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{photos / 'a_chelsea.jpg'}: ")
    assert "espresso (0.9" in lines[1]
    assert str(out / "b_coffee_gradcam.png") in lines[1]

    cat = _manifest(out / "a_chelsea_gradcam.json")
    coffee = _manifest(out / "b_coffee_gradcam.json")
    assert cat["predictions"][0]["class"] in CAT_CLASSES
    assert coffee["predictions"][0]["class"] == ESPRESSO
    assert coffee["predictions"][0]["label"] == "espresso"
    for manifest, photo in ((cat, "a_chelsea.jpg"), (coffee, "b_coffee.jpg")):
        assert manifest["input"] == str(photos / photo)
        assert manifest["method"] == "gradcam"
        assert manifest["layer"] == "_head_act"
        assert manifest["model"] == "efficientnet-lite0"
        assert len(manifest["predictions"]) == 5
        probs = [p["probability"] for p in manifest["predictions"]]
        assert probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1
        # the default target is the top class, explained with its probability
        assert manifest["targets"][0]["class"] == manifest["predictions"][0]["class"]
        assert manifest["targets"][0]["probability"] == pytest.approx(probs[0])
        assert manifest["versions"] == {
            "evidencemap": evidencemap.__version__,
            "torch": torch.__version__,
            "python": ".".join(map(str, sys.version_info[:3])),
        }
        assert manifest["seconds"] > 0
        assert manifest["batch"]["inputs"] == 2  # both photos went through one call
        for written in (*manifest["outputs"]["pictures"], manifest["outputs"]["maps"]):
            assert Path(written).is_file()

    picture = Image.open(out / "a_chelsea_gradcam.png")
    assert picture.mode == "RGB"
    assert picture.width > 300
    with np.load(out / "a_chelsea_gradcam.npz") as saved:
        assert saved["maps"].shape == (1, 1, 224, 224)
        assert saved["raw"].shape == (1, 1, 7, 7)
        assert saved["targets"].tolist() == [cat["predictions"][0]["class"]]
        assert saved["maps"].min() >= 0
        assert saved["maps"].max() == pytest.approx(1.0)


def test_explain_target_by_label_agrees_with_the_library(capsys, photos, tmp_path):
    status, stdout, stderr = _run(
        capsys,
        "explain",
        photos / "a_chelsea.jpg",
        "--target",
        "Egyptian cat",
        "--method",
        "gradcam++",
        "--out",
        tmp_path,
    )
    assert status == 0, stderr
    manifest = _manifest(tmp_path / "a_chelsea_gradcam++_t285.json")
    assert f": Egyptian cat ({manifest['targets'][0]['probability']:.2f})" in stdout
    assert manifest["targets"][0]["class"] == 285
    assert manifest["targets"][0]["label"] == "Egyptian cat"
    assert "gradcam++ — Egyptian cat" in _title_of(manifest)
    model = evidencemap.models.load()
    x = model.preprocess(io.load_image(photos / "a_chelsea.jpg"))[None]
    expected = evidencemap.explain(model, x, "gradcam++", target=285).maps
    with np.load(tmp_path / "a_chelsea_gradcam++_t285.npz") as saved:
        torch.testing.assert_close(torch.from_numpy(saved["maps"]), expected)


def _title_of(manifest: dict) -> str:
    target = manifest["targets"][0]
    return f"{manifest['method']} — {target['label']} {target['probability']:.2f}"


def test_top_k_explains_each_class_in_one_call(capsys, photos, tmp_path):
    status, stdout, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", "--top-k", "3", "--out", tmp_path
    )
    assert status == 0, stderr
    assert "(+2 more)" in stdout
    manifest = _manifest(tmp_path / "a_chelsea_gradcam_top3.json")
    top3 = [p["class"] for p in manifest["predictions"][:3]]
    assert [t["class"] for t in manifest["targets"]] == top3
    assert manifest["batch"] == {"inputs": 1, "maps": 3, "seconds": manifest["batch"]["seconds"]}
    for rank in (1, 2, 3):
        assert (tmp_path / f"a_chelsea_gradcam_top3_{rank}.png").is_file()
    assert not (tmp_path / "a_chelsea_gradcam.json").exists()  # the top class's own results
    with np.load(tmp_path / "a_chelsea_gradcam_top3.npz") as saved:
        assert saved["maps"].shape == (3, 1, 224, 224)
        assert saved["targets"].tolist() == top3
        # different classes, different evidence
        assert not np.allclose(saved["maps"][0], saved["maps"][1])


def test_explain_unreadable_inputs_are_reported_without_traceback(capsys, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is a text file, not a photo")
    status, _, stderr = _run(capsys, "explain", tmp_path / "missing.jpg", text, "--out", tmp_path)
    assert status == 1
    assert f"{tmp_path / 'missing.jpg'}: no such file" in stderr
    assert f"{text} is not a readable PNG, JPEG" in stderr
    assert "2 of 2 input(s) failed" in stderr
    assert not list(tmp_path.glob("*.png"))


# --------------------------------------------------------------------------- compare


def test_compare_writes_one_grid_and_manifest(capsys, photos, tmp_path):
    status, stdout, stderr = _run(
        capsys,
        "compare",
        photos / "b_coffee.jpg",
        "--methods",
        "gradcam,layercam,grad-cam",
        "--out",
        tmp_path,
    )
    assert status == 0, stderr
    assert "espresso" in stdout
    manifest = _manifest(tmp_path / "b_coffee_compare.json")
    assert [m["method"] for m in manifest["methods"]] == ["gradcam", "layercam"]  # alias deduped
    assert manifest["target"]["class"] == ESPRESSO
    grid = Image.open(tmp_path / "b_coffee_compare.png")
    single = 320  # one panel: 3.2 in at 100 dpi; original + 2 overlays + colour bar
    assert grid.width > 3 * single
    assert not (tmp_path / "b_coffee_compare.npz").exists()
    # one file per method, in the one maps schema, read back by io.load_maps
    paths = manifest["outputs"]["maps"]
    assert sorted(paths) == ["gradcam", "layercam"]
    for entry in manifest["methods"]:
        assert entry["maps"] == paths[entry["method"]]
    assert Path(paths["gradcam"]).name == "b_coffee_compare_gradcam.npz"
    saved = io.load_maps(paths["gradcam"])
    assert saved.version >= 1
    assert saved.method == "gradcam"
    assert saved.maps.shape == (1, 1, 224, 224)
    assert saved.targets.tolist() == [ESPRESSO]
    assert saved.layers == [manifest["methods"][0]["layer"]]
    layercam = io.load_maps(paths["layercam"])
    assert layercam.method == "layercam"
    assert not np.array_equal(layercam.maps, saved.maps)
    assert float(saved.maps.max()) == pytest.approx(1.0)


def _colour_bars(figure) -> list:
    """The colour bars of a matplotlib figure."""
    return [bar for ax in figure.axes if (bar := getattr(ax, "_colorbar", None)) is not None]


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the command line renders to PNG (what ``viz.render`` is given)."""
    from evidencemap import viz

    figures: list = []
    render = viz.render

    def capture(figure):
        figures.append(figure)
        return render(figure)

    monkeypatch.setattr(viz, "render", capture)
    return figures


@pytest.mark.parametrize(
    ("extra", "label"),
    [
        (("--method", "gradcam", "--option", "counterfactual=true"), "counterfactual gradcam"),
        (("--method", "integrated_gradients", "--option", "steps=8"), "integrated_gradients"),
        (("--method", "gradcam", "--option", "relu=false"), "gradcam (relu=False)"),
    ],
)
def test_explain_draws_signed_maps_on_a_symmetric_diverging_scale(
    capsys, photos, tmp_path, drawn, extra, label
):
    from evidencemap import viz

    status, _, stderr = _run(capsys, "explain", photos / "a_chelsea.jpg", *extra, "--out", tmp_path)
    assert status == 0, stderr
    assert len(drawn) == 1
    (bar,) = _colour_bars(drawn[0])
    assert bar.mappable.cmap.name == viz.SIGNED_CMAP
    low, high = bar.mappable.norm.vmin, bar.mappable.norm.vmax
    assert high > 0
    assert low == -high
    assert bar.ax.get_ylabel() == viz.SIGNED_LABEL
    assert label in drawn[0].axes[0].get_title()


def test_explain_cmap_overrides_the_signed_colour_map_not_its_scale(
    capsys, photos, tmp_path, drawn
):
    argv = ("--method", "gradcam", "--option", "relu=false", "--cmap", "PuOr", "--bare")
    status, _, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", *argv[:-1], "--out", tmp_path
    )
    assert status == 0, stderr
    (bar,) = _colour_bars(drawn[0])
    assert bar.mappable.cmap.name == "PuOr"
    assert bar.mappable.norm.vmin == -bar.mappable.norm.vmax
    # the bare map is coloured the same way: a diverging map has both ends' hues
    status, _, stderr = _run(capsys, "explain", photos / "a_chelsea.jpg", *argv, "--out", tmp_path)
    assert status == 0, stderr
    bare = np.asarray(Image.open(next(tmp_path.glob("a_chelsea_gradcam*_bare.png"))))
    assert bare.shape[2] == 3


def test_explain_draws_unsigned_maps_on_zero_to_one(capsys, photos, tmp_path, drawn):
    from evidencemap import viz

    status, _, stderr = _run(capsys, "explain", photos / "a_chelsea.jpg", "--out", tmp_path)
    assert status == 0, stderr
    (bar,) = _colour_bars(drawn[0])
    assert bar.mappable.cmap.name == viz.DEFAULT_CMAP
    assert (bar.mappable.norm.vmin, bar.mappable.norm.vmax) == (0.0, 1.0)
    assert bar.ax.get_ylabel() == viz.EVIDENCE_LABEL


def test_compare_with_a_signed_method_uses_the_signed_scale(capsys, photos, tmp_path, drawn):
    from evidencemap import viz

    status, _, stderr = _run(
        capsys,
        "compare",
        photos / "a_chelsea.jpg",
        "--methods",
        "gradcam,saliency",
        *TINY,
        "--out",
        tmp_path,
    )
    assert status == 0, stderr
    (bar,) = _colour_bars(drawn[0])
    assert bar.mappable.cmap.name == viz.DEFAULT_CMAP  # saliency is |gradient| by default
    status, _, stderr = _run(
        capsys,
        "compare",
        photos / "a_chelsea.jpg",
        "--methods",
        "gradcam,integrated_gradients",
        *TINY,
        "--out",
        tmp_path,
    )
    assert status == 0, stderr
    (bar,) = _colour_bars(drawn[1])
    assert bar.mappable.cmap.name == viz.SIGNED_CMAP
    assert (bar.mappable.norm.vmin, bar.mappable.norm.vmax) == (-1.0, 1.0)
    assert bar.ax.get_ylabel() == viz.SIGNED_LABEL


# --------------------------------------------------------------------------- batch


def test_batch_skips_bad_files_finishes_the_rest_and_resumes(capsys, photos, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a_chelsea.jpg", "b_coffee.jpg"):
        (folder / name).write_bytes((photos / name).read_bytes())
    (folder / "sub").mkdir()
    (folder / "sub" / "rocket.png").write_bytes((photos / "sub" / "rocket.png").read_bytes())
    (folder / "c_text.jpg").write_text("not an image at all")
    (folder / "d_truncated.jpg").write_bytes((photos / "a_chelsea.jpg").read_bytes()[:2000])
    out = tmp_path / "out"

    status, stdout, stderr = _run(capsys, "batch", folder, "--out", out, "--batch-size", "2")
    assert status == 1
    assert f"{folder / 'c_text.jpg'} is not a readable" in stderr
    assert f"{folder / 'd_truncated.jpg'} is truncated or corrupt" in stderr
    assert "done 3, skipped 0" in stdout
    assert "failed 2" in stdout
    chelsea = _manifest(out / "a_chelsea_gradcam.json")
    rocket = _manifest(out / "sub" / "rocket_gradcam.json")  # folders mirrored
    assert chelsea["predictions"][0]["class"] in CAT_CLASSES
    assert rocket["predictions"][0]["class"] == MISSILE
    assert chelsea["batch"]["inputs"] == 2  # chelsea and coffee: one call of two photos
    assert rocket["batch"]["inputs"] == 1

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert len(written) == 9  # png + npz + json for three photos
    (folder / "c_text.jpg").unlink()
    (folder / "d_truncated.jpg").unlink()
    status, stdout, stderr = _run(capsys, "batch", folder, "--out", out, "--batch-size", "2")
    assert status == 0, stderr
    assert "done 0, skipped 3" in stdout
    assert "failed 0" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written


def test_batch_on_a_missing_folder(capsys, tmp_path):
    status, _, stderr = _run(capsys, "batch", tmp_path / "nowhere", "--out", tmp_path)
    assert status == 2
    assert "is not a folder" in stderr


# --------------------------------------------------------------------------- volumes


@pytest.fixture
def volumes(tmp_path):
    """A folder with a blob as .npy and as .nii.gz, plus a photo, and the Tiny3D module."""
    folder = tmp_path / "vols"
    folder.mkdir()
    np.save(folder / "blob.npy", blob_volume())
    nib.save(nib.Nifti1Image(blob_volume(centre=(3, 8, 4)), np.eye(4)), folder / "blob2.nii.gz")
    Image.fromarray(skdata.coffee()[::8, ::8]).save(folder / "photo.png")
    name = write_tiny3d_module(tmp_path, "cli_tiny3d")
    with on_sys_path(tmp_path):
        yield folder, name


def _expected_volume_map(path: Path) -> torch.Tensor:
    """Grad-CAM of Tiny3D for class 0 by hand: ReLU(z-scored volume), normalised."""
    volume, _ = io.load_volume(path)
    return normalize(io.normalise_volume(volume)[None].clamp(min=0))


def test_volumes_through_explain_with_an_import_string(capsys, volumes, tmp_path):
    folder, name = volumes
    out = tmp_path / "out"
    status, stdout, stderr = _run(
        capsys,
        "explain",
        folder / "blob.npy",
        folder / "blob2.nii.gz",
        "--model",
        f"{name}:build",
        "--out",
        out,
    )
    assert status == 0, stderr
    assert "class 0 (" in stdout
    for stem, source in (("blob", "blob.npy"), ("blob2", "blob2.nii.gz")):
        manifest = _manifest(out / f"{stem}_gradcam.json")
        assert manifest["kind"] == "volume"
        assert manifest["model_source"] == "import"
        assert manifest["layer"] == "act"
        assert manifest["targets"][0]["class"] == 0
        picture = Image.open(out / f"{stem}_gradcam.png")
        assert picture.width > 3 * 320  # axial, coronal, sagittal panels
        with np.load(out / f"{stem}_gradcam.npz") as saved:
            maps = torch.from_numpy(saved["maps"])
        torch.testing.assert_close(maps, _expected_volume_map(folder / source))


def test_volumes_through_batch_with_a_pickled_model(capsys, volumes, tmp_path):
    folder, name = volumes
    model_file = tmp_path / "tiny3d.pt"
    torch.save(__import__(name).build(), model_file)
    out = folder / "maps"  # inside the input folder: its pictures must not become inputs
    status, stdout, stderr = _run(
        capsys, "batch", folder, "--model", model_file, "--out", out, "--quiet"
    )
    assert status == 0, stderr
    assert "done 2" in stdout
    assert "ignored 1 photos" in stdout
    status, stdout, _ = _run(capsys, "batch", folder, "--model", model_file, "--out", out)
    assert status == 0
    assert "done 0, skipped 2" in stdout
    assert "ignored 1 photos" in stdout
    manifest = _manifest(out / "blob_gradcam.json")
    assert manifest["model_source"] == "pickle"
    assert manifest["spacing"] is None  # .npy carries no geometry
    assert _manifest(out / "blob2_gradcam.json")["spacing"] == [1.0, 1.0, 1.0]
    assert not (out / "photo_gradcam.json").exists()


def test_volume_resized_to_the_model_input_size(capsys, volumes, tmp_path):
    folder, name = volumes
    status, _, stderr = _run(
        capsys,
        "explain",
        folder / "blob.npy",
        "--model",
        f"{name}:build",
        "--input-size",
        "8,8,8",
        "--out",
        tmp_path,
    )
    assert status == 0, stderr
    manifest = _manifest(tmp_path / "blob_gradcam.json")
    assert manifest["model_input_shape"] == [1, 8, 8, 8]
    assert manifest["original_shape"] == [12, 14, 16]


def test_photo_for_a_volume_model_is_a_clear_failure(capsys, volumes, tmp_path):
    folder, name = volumes
    status, _, stderr = _run(
        capsys, "explain", folder / "photo.png", "--model", f"{name}:build", "--out", tmp_path
    )
    assert status == 1
    assert "is a photo but" in stderr
    assert "takes volumes" in stderr


# --------------------------------------------------------------------------- TorchScript


@pytest.fixture
def scripted(tmp_path) -> Path:
    path = tmp_path / "tiny_scripted.pt"
    torch.jit.save(torch.jit.script(Tiny2D().eval()), str(path))
    return path


def test_torchscript_with_a_layer_method_is_refused_clearly(capsys, photos, scripted, tmp_path):
    status, _, stderr = _run(
        capsys, "explain", photos / "b_coffee.jpg", "--model", scripted, "--out", tmp_path
    )
    assert status == 2
    assert "TorchScript" in stderr
    assert "forward hooks" in stderr


@pytest.mark.parametrize(("game", "panel"), [("preserve", "explanation"), ("delete", "deleted")])
def test_fgvis_on_the_built_in_model_reports_the_score_on_the_explanation(
    capsys, photos, tmp_path, game, panel
):
    status, _, stderr = _run(
        capsys,
        "explain",
        photos / "b_coffee.jpg",
        "--method",
        "fgvis",
        "--game",
        game,
        "--option",
        "max_iterations=6",
        "--option",
        "lam=0.5",
        "--out",
        tmp_path,
    )
    assert status == 0, stderr
    [path] = tmp_path.glob("b_coffee_fgvis_o*.json")  # options other than the defaults
    manifest = _manifest(path)
    assert manifest["options"]["game"] == game
    target = manifest["targets"][0]
    assert target["shown_beside"] == panel
    assert 0 <= target["explanation_score"] <= 1
    assert target["explanation_top1"]["label"]
    # the score is the model's own on the saved explanation, recomputed here
    loaded = load_model("efficientnet-lite0")
    x = loaded.preprocess(io.load_image(photos / "b_coffee.jpg"))[None]
    exp = evidencemap.explain(
        loaded.module, x, "fgvis", game=game, max_iterations=6, lam=0.5, target=target["class"]
    )
    assert target["explanation_score"] == pytest.approx(float(exp.extras["score"][0]), abs=1e-5)
    assert Image.open(path.with_suffix(".png")).width > 3 * 320
    # what the library says of the run (the image's note: which schedule ran and why; a
    # degenerate map's warning) is in the manifest, each once, and on the terminal
    said = [w for w in (exp.warning(0), exp.extras.get("warning")) if w]
    assert sorted(manifest["warnings"]) == sorted(dict.fromkeys(said))
    for text in said:
        assert text.splitlines()[0][:60] in stderr


def test_game_dual_reaches_extremal_perturbation(capsys, photos, tmp_path):
    status, _, stderr = _run(
        capsys,
        "explain",
        photos / "b_coffee.jpg",
        "--method",
        "extremal",
        "--game",
        "dual",
        "--option",
        "max_iterations=2",
        "--out",
        tmp_path,
    )
    assert status == 0, stderr
    [path] = tmp_path.glob("b_coffee_extremal_perturbation_o*.json")
    assert _manifest(path)["options"]["game"] == "dual"


@pytest.mark.parametrize(("game", "panel"), [("preserve", "explanation"), ("delete", "deleted")])
def test_torchscript_with_an_input_space_method_and_explanation_image(
    capsys, photos, scripted, tmp_path, game, panel
):
    with registered_input_method() as method:
        status, _, stderr = _run(
            capsys,
            "explain",
            photos / "b_coffee.jpg",
            "--model",
            scripted,
            "--input-size",
            "32",
            "--method",
            method.name,
            "--game",
            game,
            "--out",
            tmp_path,
        )
    assert status == 0, stderr
    [path] = tmp_path.glob(f"b_coffee_{method.name}*.json")  # _o…: the deletion game
    manifest = _manifest(path)
    assert manifest["model_source"] == "torchscript"
    assert manifest["options"]["game"] == game
    assert manifest["layer"] is None
    # the map is the method's formula on the preprocessed photo
    loaded = load_model(str(scripted), input_size=32)
    x = loaded.preprocess(io.load_image(photos / "b_coffee.jpg"))[None].requires_grad_(True)
    output = loaded.module(x)
    (grad,) = torch.autograd.grad(output[0, output.argmax()], x)
    expected = normalize((x * grad).abs().sum(1, keepdim=True).detach())
    with np.load(path.with_suffix(".npz")) as saved:
        torch.testing.assert_close(torch.from_numpy(saved["maps"]), expected)
    # the explanation image is shown beside the photo and the map: three panels
    assert Image.open(path.with_suffix(".png")).width > 3 * 320
    assert manifest["targets"][0]["shown_beside"] == panel


# --------------------------------------------------------------------------- listings, help


def test_methods_lists_every_method_one_line_each(capsys):
    status, stdout, _ = _run(capsys, "methods")
    assert status == 0
    lines = stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == evidencemap.methods()
    grad = next(line for line in lines if line.startswith("gradcam "))
    assert "[layer]" in grad
    assert "Selvaraju" in grad
    assert "``" not in grad
    passes = {line.split()[0]: line.split("]  ", 1)[1].split("  ")[0] for line in lines}
    assert passes["gradcam"] == "1 layer pass"  # each method's declared passes per class
    assert passes["guided_gradcam"] == "2 input passes"
    assert passes["fgvis"] == "≤300 input passes"
    assert passes["scorecam"] == "≤1/channel forward passes"
    assert passes["smoothgrad"] == "25 input passes"


def test_methods_with_names_shows_their_options(capsys):
    status, stdout, _ = _run(capsys, "methods", "fgvis", "score-cam")
    assert status == 0
    assert stdout.startswith("fgvis: FGVis")
    assert "cost: ≤300 input passes per class" in stdout
    row = next(line for line in stdout.splitlines() if line.split()[:1] == ["max_iterations"])
    assert "an int >= 1" in row
    assert "300" in row
    assert "cost=work, cap 500" in row
    assert "\nscorecam: " in stdout  # an alias names the method
    assert "internal_batch_size" in stdout
    assert not any(line.split()[:1] == ["eval_mode"] for line in stdout.splitlines())
    status, _, stderr = _run(capsys, "methods", "no-such-method")
    assert status == 2
    assert "unknown method 'no-such-method'" in stderr


def test_models_lists_builtins_and_forms(capsys):
    status, stdout, _ = _run(capsys, "models")
    assert status == 0
    for name in evidencemap.models.builtin_names():
        assert any(line.startswith(name) for line in stdout.splitlines())
    assert "efficientnet-lite0  installed" in stdout
    assert "TorchScript" in stdout
    assert "package.module:factory" in stdout
    assert "torchvision:" in stdout
    assert "timm:" in stdout


def test_every_builtin_model_has_classes_known_before_loading(monkeypatch, capsys, tmp_path):
    from evidencemap import engine, models

    for name in models.builtin_names():
        labels = engine.known_labels(name)
        assert labels, name
        assert all(isinstance(label, str) and label for label in labels)
    assert len(engine.known_labels("efficientnet-lite1")) == 1000
    assert engine.known_labels("fer") == list(models.fer.FER_LABELS)
    assert engine.known_labels("vgg16-brain-mri") == list(models.vgg16_mri.VGG16_MRI_LABELS)
    assert engine.known_labels("ct-i3resnet152") is None
    assert engine.known_labels("mynet:build") is None
    # a built-in added to the model table gets the range check, without the engine knowing it
    monkeypatch.setitem(models.builtin._BUILTIN_LABELS, "toy-net", lambda: ("no", "yes"))
    assert engine.known_labels("toy-net") == ["no", "yes"]
    with pytest.raises(ValueError, match="out of range: the model has 2 classes"):
        engine.check_request("gradcam", model="toy-net", target=2)
    with pytest.raises(ValueError, match="maybe"):
        engine.check_request("gradcam", model="toy-net", target="maybe")
    assert engine.check_request("gradcam", model="toy-net", target="yes").value == "yes"


@pytest.mark.parametrize("command", [c.__name__.rsplit(".", 1)[1] for c in COMMANDS])
def test_help_of_every_command(capsys, command):
    status, stdout, _ = _run(capsys, command, "--help")
    assert status == 0
    assert stdout.startswith(f"usage: evidencemap {command}")


def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-m", "evidencemap", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for command in ("explain", "compare", "batch", "methods", "models"):
        assert command in done.stdout


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "x.jpg", "--method", "nope"], "unknown method 'nope'"),
        (["explain", "x.jpg", "--top-k", "0"], "expected a positive integer, got 0"),
        (["explain", "x.jpg", "--opacity", "2"], "expected a number in [0, 1]"),
        (["explain", "x.jpg", "--target", "1", "--top-k", "2"], "not allowed with argument"),
        (["explain", "x.jpg", "--option", "novalue"], "options are key=value"),
        (["compare", "x.jpg", "--methods", "gradcam,bogus"], "unknown method 'bogus'"),
        (["explain"], "the following arguments are required"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2_with_a_message(capsys, argv, message):
    status, _, stderr = _run(capsys, *argv)
    assert status == 2
    assert message in stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "tiger kat"], "similar labels: 'tiger cat'"),
        (["--option", "colour=3"], "takes no option 'colour'; its options:"),
        (["--game", "delete"], "takes no option 'game'"),
        (
            ["--method", "fgvis", "--game", "dual"],
            "option game must be one of 'preserve', 'delete'",
        ),
        (["--layer", "_no_such_layer"], "layer '_no_such_layer' not found"),
        (["--cmap", "rainbowz"], "unknown matplotlib colormap 'rainbowz'"),
        (["--model", "nothing-like-this"], "accepted forms are"),
    ],
)
def test_bad_values_exit_2_before_any_work(capsys, photos, tmp_path, argv, message):
    status, stdout, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", "--out", tmp_path, *argv
    )
    assert status == 2
    assert message in stderr
    assert stdout == ""
    assert not list(tmp_path.iterdir())


def test_cuda_that_is_not_there(capsys, monkeypatch, photos, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", "--device", "cuda", "--out", tmp_path
    )
    assert status == 2
    assert "CUDA is not available" in stderr


def test_parse_option_values():
    assert parse_option("relu=false") == ("relu", False)
    assert parse_option("top-k=16") == ("top_k", 16)
    assert parse_option("lr=0.1") == ("lr", 0.1)
    assert parse_option("weighting=channel_softmax") == ("weighting", "channel_softmax")
    assert parse_option("memory_budget=None") == ("memory_budget", None)


# --------------------------------------------------------------------------- targets, names, resume

TINY = ("--model", "cli_helpers:Tiny2D", "--input-size", "32")


@pytest.fixture
def two_photos(photos, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a_chelsea.jpg", "b_coffee.jpg"):
        (folder / name).write_bytes((photos / name).read_bytes())
    return folder


def test_batch_resume_accounts_for_target_options_and_model(capsys, two_photos, tmp_path):
    out = tmp_path / "out"

    def batch(*more: str) -> str:
        status, stdout, stderr = _run(capsys, "batch", two_photos, "--out", out, *TINY, *more)
        assert status == 0, stderr
        return stdout

    assert "done 2, skipped 0" in batch()
    default = _manifest(out / "a_chelsea_gradcam.json")
    assert default["request"]["target"] is None
    assert default["request"]["options"] == {}
    first = (out / "a_chelsea_gradcam.npz").stat().st_mtime_ns

    # another target: computed anew, under its own name; the default results stay
    assert "done 2, skipped 0" in batch("--target", "0")
    targeted = _manifest(out / "a_chelsea_gradcam_t0.json")
    assert targeted["request"]["target"] == "0"
    assert [t["class"] for t in targeted["targets"]] == [0]
    # another option: computed anew too, under a name with a short hash of the options
    assert "done 2, skipped 0" in batch("--option", "relu=false")
    [optioned] = out.glob("a_chelsea_gradcam_o*.json")
    assert _manifest(optioned)["request"]["options"] == {"relu": False}
    # an option given at its default value names the default results
    assert "done 0, skipped 2" in batch("--option", "relu=true")
    # the same requests again: skipped
    assert "done 0, skipped 2" in batch("--target", "0")
    assert (out / "a_chelsea_gradcam.npz").stat().st_mtime_ns == first
    # the same name but another model input: the manifest's request differs, so computed anew
    assert "done 2, skipped 0" in batch("--input-size", "40")
    assert _manifest(out / "a_chelsea_gradcam.json")["request"]["input_size"] == 40


def test_explain_with_another_target_or_option_keeps_the_first_results(capsys, photos, tmp_path):
    for more in ((), ("--target", "2"), ("--option", "relu=false")):
        status, _, stderr = _run(
            capsys, "explain", photos / "a_chelsea.jpg", "--out", tmp_path, *TINY, *more
        )
        assert status == 0, stderr
    manifests = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(manifests) == 3, manifests
    assert "a_chelsea_gradcam.json" in manifests
    assert "a_chelsea_gradcam_t2.json" in manifests


def test_console_names_the_explained_target_not_the_top_class(capsys, photos, tmp_path):
    status, stdout, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", "--target", "tabby", "--out", tmp_path
    )
    assert status == 0, stderr
    manifest = _manifest(tmp_path / "a_chelsea_gradcam_t281.json")
    assert manifest["predictions"][0]["label"] != "tabby"  # the top class is another cat
    probability = manifest["targets"][0]["probability"]
    assert f": tabby ({probability:.2f}) → " in stdout
    assert manifest["predictions"][0]["label"] not in stdout


# --------------------------------------------------------------------------- checked before loading


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the arguments must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("evidencemap.cli.common.load_model", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "1000"], "target class 1000 is out of range: the model has 1000 classes"),
        (["--target", "tiger kat"], "similar labels: 'tiger cat'"),
        (["--option", "colour=3"], "takes no option 'colour'; its options:"),
        (["--option", "relu=maybe"], "relu"),
        (["--cmap", "rainbowz"], "--cmap: unknown matplotlib colormap 'rainbowz'"),
        (["--model", "fer", "--target", "7"], "the model has 7 classes (0 to 6)"),
        (["--model", "ct-i3resnet152", "--target", "3"], "outputs an embedding, not classes"),
        (["--model", "ct-i3resnet152", "--top-k", "3"], "outputs an embedding, not classes"),
        (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_arguments_are_refused_before_the_model_loads(
    capsys, no_loading, photos, tmp_path, argv, message
):
    status, stdout, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", "--out", tmp_path, *argv
    )
    assert status == 2, stderr
    assert message in stderr
    assert stdout == ""


def test_missing_inputs_are_refused_before_the_model_loads(capsys, no_loading, tmp_path):
    status, _, stderr = _run(capsys, "explain", tmp_path / "gone.jpg", "--out", tmp_path)
    assert status == 2
    assert f"no such file: {tmp_path / 'gone.jpg'}" in stderr
    status, _, stderr = _run(
        capsys, "compare", tmp_path / "gone.jpg", "--cmap", "rainbowz", "--out", tmp_path
    )
    assert status == 2
    assert "unknown matplotlib colormap" in stderr
    status, _, stderr = _run(capsys, "compare", tmp_path / "gone.jpg", "--out", tmp_path)
    assert status == 2
    assert "gone.jpg: no such file" in stderr


def test_mps_that_is_not_there(capsys, monkeypatch, photos, tmp_path):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    status, _, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", "--device", "mps", "--out", tmp_path
    )
    assert status == 2
    assert "--device mps: Apple's Metal (MPS) is not available here" in stderr


def test_a_tiny_photo_is_upsampled_with_a_warning(capsys, tmp_path):
    Image.fromarray(skdata.coffee()[::40, ::40][:9, :12]).save(tmp_path / "tiny.png")
    status, _, stderr = _run(capsys, "explain", tmp_path / "tiny.png", "--out", tmp_path, *TINY)
    assert status == 0, stderr
    assert "the photo is 12×9 px, smaller than the model's 32×32 input: it was upsampled" in stderr
    assert "upsampled" in _manifest(tmp_path / "tiny_gradcam.json")["warnings"][0]


def test_a_method_warning_is_reported_once_without_a_python_warning(capsys, photos, tmp_path):
    import warnings

    from cli_helpers import InputGradient
    from evidencemap.methods.registry import METHODS

    class FlatGradient(InputGradient):
        name = "test-flat-gradient"

        def __call__(self, inputs, target=None):
            explanation = super().__call__(inputs, target)
            explanation.extras["degenerate"] = torch.ones(len(explanation), dtype=torch.bool)
            explanation.extras["warning"] = "the map is flat: use another method"
            warnings.warn("the map is flat: use another method", UserWarning, stacklevel=2)
            return explanation

    METHODS[FlatGradient.name] = FlatGradient
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status, _, stderr = _run(
                capsys,
                "explain",
                photos / "a_chelsea.jpg",
                "--method",
                FlatGradient.name,
                "--out",
                tmp_path,
                *TINY,
            )
    finally:
        METHODS.pop(FlatGradient.name, None)
    assert status == 0, stderr
    assert stderr.count("the map is flat: use another method") == 1
    assert not [w for w in caught if "flat" in str(w.message)]


# --------------------------------------------------------------------------- model forms, frames


def test_help_shows_a_model_form_that_works_and_a_py_path_loads(capsys, photos, tmp_path):
    status, stdout, _ = _run(capsys, "explain", "--help")
    assert status == 0
    assert "mynet.py:build" not in stdout.replace("path/to/mynet.py:build", "")
    assert "mynet:build" in stdout
    folder = tmp_path / "models here"
    folder.mkdir()
    (folder / "mynet_cli.py").write_text(
        "from cli_helpers import Tiny2D\n\n\ndef build():\n    return Tiny2D()\n"
    )
    status, _, stderr = _run(
        capsys,
        "explain",
        photos / "a_chelsea.jpg",
        "--model",
        f"{folder / 'mynet_cli.py'}:build",
        "--input-size",
        "32",
        "--out",
        tmp_path,
    )
    assert status == 0, stderr
    assert _manifest(tmp_path / "a_chelsea_gradcam.json")["model_source"] == "import"
    status, _, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", "--model", "nowhere/mynet.py:build"
    )
    assert status == 2
    assert "model file not found: nowhere/mynet.py" in stderr


def test_frame_of_a_4d_nifti(capsys, volumes, tmp_path):
    folder, name = volumes
    frames = np.stack([blob_volume(), blob_volume(centre=(8, 4, 3))], axis=-1)
    nib.save(nib.Nifti1Image(frames, np.eye(4)), folder / "run.nii.gz")
    nib.save(nib.Nifti1Image(frames[..., 1], np.eye(4)), folder / "second.nii.gz")
    out = tmp_path / "out"
    common = ("--model", f"{name}:build", "--out", out)
    status, _, stderr = _run(capsys, "explain", folder / "run.nii.gz", *common)
    assert status == 1
    assert "4th axis (time) holds 2 frames" in stderr
    assert "--frame i" in stderr
    status, _, stderr = _run(capsys, "explain", folder / "run.nii.gz", "--frame", "1", *common)
    assert status == 0, stderr
    [manifest] = out.glob("run_gradcam_o*.json")
    recorded = _manifest(manifest)
    assert recorded["frame"] == 1
    assert recorded["request"]["frame"] == 1
    with np.load(manifest.with_suffix(".npz")) as saved:
        maps = torch.from_numpy(saved["maps"])
    torch.testing.assert_close(maps, _expected_volume_map(folder / "second.nii.gz"))
    # the map as NIfTI on the input's grid, with its affine, for a viewer
    [nifti] = recorded["outputs"]["nifti"]
    image = nib.load(nifti)
    assert list(image.shape) == recorded["shape"][1:]
    np.testing.assert_allclose(image.affine, np.array(recorded["affine"]))
    np.testing.assert_allclose(np.asarray(image.dataobj), maps[0, 0].numpy(), atol=1e-6)
    status, _, stderr = _run(capsys, "explain", folder / "run.nii.gz", "--frame", "2", *common)
    assert status == 1
    assert "frame 2 is out of range" in stderr


def test_models_lists_the_ct_network(capsys):
    status, stdout, _ = _run(capsys, "models")
    assert status == 0
    line = next(line for line in stdout.splitlines() if line.startswith("ct-i3resnet152"))
    assert "embedding" in line
    assert "installed" in line


def test_the_ct_network_takes_a_volume_size_but_no_image_preprocessing():
    with pytest.raises(ValueError, match="it takes only the input size"):
        load_model("ct-i3resnet152", mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="apply to user models only"):
        load_model("efficientnet-lite0", input_size=64)


@pytest.mark.ct
def test_ct_network_on_the_command_line_explains_the_embedding_norm(capsys, tmp_path):
    frames = np.stack([blob_volume((24, 24, 20)), blob_volume((24, 24, 20), (4, 4, 4))], -1)
    nib.save(nib.Nifti1Image(frames, np.diag([2.0, 2.0, 2.2, 1.0])), tmp_path / "run.nii.gz")
    status, stdout, stderr = _run(
        capsys,
        "explain",
        tmp_path / "run.nii.gz",
        "--model",
        "ct-i3resnet152",
        "--frame",
        "0",
        "--input-size",
        "64,64,48",
        "--out",
        tmp_path / "out",
    )
    assert status == 0, stderr
    assert ": norm (score " in stdout
    assert "class" not in stdout
    [path] = (tmp_path / "out").glob("run_gradcam*.json")
    manifest = _manifest(path)
    assert manifest["predictions"] == []
    assert manifest["targets"][0]["label"] == "norm"
    assert manifest["targets"][0]["probability"] is None
    assert manifest["model_input_shape"] == [1, 64, 64, 48]


# --------------------------------------------------------------------------- figures for papers


def test_figure_format_dpi_size_and_bare_maps(capsys, photos, tmp_path):
    chelsea = photos / "a_chelsea.jpg"

    def explain(out: str, *more: str) -> dict:
        status, _, stderr = _run(capsys, "explain", chelsea, "--out", tmp_path / out, *TINY, *more)
        assert status == 0, stderr
        return _manifest(tmp_path / out / "a_chelsea_gradcam.json")

    pdf = explain("pdf", "--format", "pdf", "--dpi", "150", "--figsize", "4,3")
    assert pdf["outputs"]["pictures"] == [str(tmp_path / "pdf" / "a_chelsea_gradcam.pdf")]
    assert (tmp_path / "pdf" / "a_chelsea_gradcam.pdf").read_bytes().startswith(b"%PDF")
    assert pdf["request"]["picture"] == {
        "format": "pdf",
        "bare": False,
        "dpi": 150.0,
        "figsize": [4.0, 3.0],
    }
    explain("svg", "--format", "svg")
    assert b"<svg" in (tmp_path / "svg" / "a_chelsea_gradcam.svg").read_bytes()[:400]
    explain("small", "--dpi", "50", "--figsize", "4,3")
    assert Image.open(tmp_path / "small" / "a_chelsea_gradcam.png").size == (200, 150)
    explain("bare", "--bare")
    bare = Image.open(tmp_path / "bare" / "a_chelsea_gradcam_bare.png")
    assert bare.size == Image.open(chelsea).size  # the photo's pixels, no title or colour bar
    explain("tiff", "--bare", "--format", "tiff")
    values = np.array(Image.open(tmp_path / "tiff" / "a_chelsea_gradcam_bare.tiff"))
    with np.load(tmp_path / "tiff" / "a_chelsea_gradcam.npz") as saved:
        expected = np.round(65535 * saved["maps"][0, 0])
    assert values.shape == (32, 32)
    assert np.abs(values.astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "tiff"], "--format: format tiff: figures are png, pdf or svg"),
        (["--bare", "--format", "pdf"], "a bare map is written as png or tiff"),
        (["--dpi", "5"], "--dpi: dpi must be a number in [10, 2400]"),
        (["--figsize", "0.1,3"], "--figsize: figsize must be WIDTH,HEIGHT"),
    ],
)
def test_bad_picture_settings_are_refused_before_the_model_loads(
    capsys, no_loading, photos, tmp_path, argv, message
):
    status, _, stderr = _run(capsys, "explain", photos / "a_chelsea.jpg", "--out", tmp_path, *argv)
    assert status == 2
    assert message in stderr


def test_compare_as_svg_and_as_bare_maps(capsys, photos, tmp_path):
    common = ("compare", photos / "a_chelsea.jpg", "--methods", "gradcam,layercam", *TINY)
    status, _, stderr = _run(capsys, *common, "--format", "svg", "--out", tmp_path / "svg")
    assert status == 0, stderr
    assert b"<svg" in (tmp_path / "svg" / "a_chelsea_compare.svg").read_bytes()[:400]
    status, _, stderr = _run(capsys, *common, "--bare", "--out", tmp_path / "bare")
    assert status == 0, stderr
    manifest = _manifest(tmp_path / "bare" / "a_chelsea_compare.json")
    names = [Path(p).name for p in manifest["outputs"]["pictures"]]
    assert names == ["a_chelsea_compare_gradcam.png", "a_chelsea_compare_layercam.png"]


def test_a_target_function_by_its_import_string(capsys, photos, tmp_path):
    folder = tmp_path / "targets"
    folder.mkdir()
    (folder / "cli_targets.py").write_text("def second(output):\n    return output[:, 1]\n")
    out = tmp_path / "out"
    with on_sys_path(folder):
        status, stdout, stderr = _run(
            capsys,
            "explain",
            photos / "a_chelsea.jpg",
            "--target",
            "cli_targets:second",
            "--out",
            out,
            *TINY,
        )
    assert status == 0, stderr
    assert ": cli_targets:second (score " in stdout
    manifest = _manifest(out / "a_chelsea_gradcam_tcli-targets-second.json")
    assert manifest["targets"][0]["label"] == "cli_targets:second"
    assert manifest["targets"][0]["probability"] is None
    # the same score as class 1's logit: the same map
    status, _, stderr = _run(
        capsys, "explain", photos / "a_chelsea.jpg", "--target", "1", "--out", out, *TINY
    )
    assert status == 0, stderr
    with (
        np.load(out / "a_chelsea_gradcam_tcli-targets-second.npz") as a,
        np.load(out / "a_chelsea_gradcam_t1.npz") as b,
    ):
        np.testing.assert_allclose(a["maps"], b["maps"], atol=1e-6)
    status, _, stderr = _run(
        capsys,
        "explain",
        photos / "a_chelsea.jpg",
        "--target",
        "no_such_mod:f",
        "--out",
        out,
        *TINY,
    )
    assert status == 2
    assert "cannot import 'no_such_mod'" in stderr
