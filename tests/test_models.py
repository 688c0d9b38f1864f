"""The built-in pretrained model: strict weights, preprocessing pinned on real photos, labels."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import evidencemap as em
from evidencemap import models


def test_weights_load_strictly_and_model_is_in_eval_mode(lite0):
    state = torch.load(
        models.weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True
    )
    assert set(state) == set(lite0.state_dict())
    assert not lite0.training
    assert all(torch.equal(state[k], v) for k, v in lite0.state_dict().items())


def test_each_activation_is_its_own_module_and_fires_once(lite0):
    acts = [m for m in lite0.modules() if isinstance(m, torch.nn.ReLU6)]
    calls: list[torch.nn.Module] = []
    handles = [m.register_forward_hook(lambda m, i, o: calls.append(m)) for m in acts]
    try:
        lite0(torch.zeros(1, 3, 64, 64))
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(acts) == len(set(calls))


@pytest.mark.parametrize(
    ("photo", "classes"),
    [("chelsea", {281, 282, 283, 284, 285}), ("coffee", {967, 968, 504})],
)
def test_real_photos_are_classified_right(lite0, photo, classes):
    image = getattr(data, photo)()
    probs = lite0.predict(lite0.preprocess(image)[None])[0]
    assert int(probs.argmax()) in classes
    assert float(probs[sorted(classes)].sum()) > 0.5


def test_preprocessing_accepts_pil_grey_and_rgba(lite0):
    rgb = data.coffee()
    from_array = lite0.preprocess(rgb)
    from_pil = lite0.preprocess(Image.fromarray(rgb))
    assert from_array.shape == (3, 224, 224)
    assert torch.equal(from_array, from_pil)
    grey = lite0.preprocess(np.asarray(Image.fromarray(rgb).convert("L")))
    assert torch.equal(grey[0], grey[1])
    assert torch.equal(grey[1], grey[2])
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert torch.equal(lite0.preprocess(rgba), from_array)
    # (pixel − 127) / 128: a white image maps to 1.0 − 1/128 everywhere
    white = lite0.preprocess(np.full((300, 400, 3), 255, np.uint8))
    assert torch.allclose(white, torch.full_like(white, 128 / 128))
    batch = lite0.preprocess([rgb, rgb])
    assert batch.shape == (2, 3, 224, 224)


def test_preprocessing_errors(lite0):
    with pytest.raises(TypeError, match="PIL image or a uint8"):
        lite0.preprocess("coffee.jpg")
    with pytest.raises(ValueError, match="dtype uint8"):
        lite0.preprocess(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 1\|3\|4\)"):
        lite0.preprocess(np.zeros((10, 10, 5), np.uint8))


def test_to_original_puts_the_crop_back(lite0):
    pre = lite0.preprocess
    maps = torch.ones(1, 1, 224, 224)
    back = pre.to_original(maps, width=400, height=300)
    assert back.shape == (1, 1, 300, 400)
    box = pre.crop_box(400, 300)
    # Shorter side 300 → 256 (scale 256/300), width 400 → 341; the 224 crop leaves (341−224)//2
    # = 58 columns on the left and (256−224)//2 = 16 rows on top; outside the crop the map is 0.
    assert (box.left, box.top, box.size) == (58, 16, 224)
    assert float(back[0, 0, 150, 200]) == pytest.approx(1.0)
    assert float(back[0, 0, 150, 2]) == 0.0
    assert float(back[0, 0, 150, 397]) == 0.0
    assert float(back[0, 0, 2, 200]) == 0.0
    assert float(back[0, 0, 297, 200]) == 0.0


@pytest.mark.parametrize(
    ("width", "height", "size", "resize", "resized", "corner", "region"),
    [
        # 451 × 300: short side 300 → 256, width round(451·256/300) = 385; the 224 crop starts
        # at ((385−224)//2, (256−224)//2) = (80, 16): photo x 80·451/385 … 304·451/385
        (451, 300, 224, 256, (385, 256), (80, 16), (36080 / 385, 18.75, 137104 / 385, 281.25)),
        (300, 451, 224, 256, (256, 385), (16, 80), (18.75, 36080 / 385, 281.25, 137104 / 385)),
        # 100 × 50: short side 50 → 256 (×5.12), width 512; crop at (144, 16)
        (100, 50, 224, 256, (512, 256), (144, 16), (28.125, 3.125, 71.875, 46.875)),
        # resize below size: each side is raised to 224, the crop is the whole photo
        (300, 300, 224, 200, (224, 224), (0, 0), (0.0, 0.0, 300.0, 300.0)),
    ],
)
def test_crop_geometry_by_hand(width, height, size, resize, resized, corner, region):
    from evidencemap.models import CropBox, ImagePreprocessor

    box = ImagePreprocessor(size=size, resize=resize).crop_box(width, height)
    assert box == CropBox(width, height, *resized, *corner, size)
    assert box.region() == pytest.approx(region)
    assert box.to_input(region) == pytest.approx((0.0, 0.0, size, size))
    # a box half outside the crop is clipped to it; one wholly outside becomes empty
    x0, y0, x1, y1 = region
    inside = box.to_input((x0 - 10, (y0 + y1) / 2, (x0 + x1) / 2, y1 + 10))
    assert inside == pytest.approx((0.0, size / 2, size / 2, size))
    outside = box.to_input((x1 + 1, y0, x1 + 5, y1))
    assert outside[2] <= outside[0]
    with pytest.raises(ValueError, match="width must be >= 1"):
        CropBox.centre(0, 10, 224, 256)


def test_every_crop_is_the_preprocessing_geometry(lite0):
    from evidencemap.engine import crop_region
    from evidencemap.models import FERPreprocessor

    assert crop_region(lite0, 451, 300) == lite0.preprocess.crop_box(451, 300).region()
    # FER: 120 × 80 → 72 × 48, crop at x 12: photo x 12·120/72 = 20 … 100. White columns
    # 0…30 leave 10 photo pixels = 10·48/80 = 6 input columns white.
    photo = np.zeros((80, 120), np.uint8)
    photo[:, :30] = 255
    pre = FERPreprocessor()
    assert pre.crop_box(120, 80).region() == pytest.approx((20.0, 0.0, 100.0, 80.0))
    grey = pre.to_pixels(pre(photo)[None])[0, 0]
    assert float(grey[:, :5].min()) > 200
    assert float(grey[:, 7:].max()) < 50


def test_labels_and_names():
    names = models.labels()
    assert len(names) == 1000
    assert names[282] == "tiger cat"
    assert names[967] == "espresso"
    assert "efficientnet-lite0" in models.available()
    with pytest.raises(ValueError, match="cannot load model .resnet-9000.*Built-in names"):
        models.load("resnet-9000")


@pytest.mark.parametrize(
    ("name", "size"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)]
)
def test_larger_lite_variants_load_and_classify(name, size):
    model = models.load(name)
    assert model.preprocess.size == size
    batch = model.preprocess([data.chelsea(), data.coffee()])
    top = model.predict(batch).argmax(1).tolist()
    assert top[0] in {281, 282, 283, 284, 285}
    assert top[1] == 967


# --------------------------------------------------------------------------- facial expressions

FACE = (slice(50, 180), slice(175, 305))  # the astronaut's face, tight like a detector's box
LOOSE_FACE = (slice(0, 220), slice(140, 330))  # with hair, collar and background


@pytest.fixture(scope="module")
def fer():
    return models.load("fer")


def test_fer_weights_load_strictly_and_match_the_package_network(fer):
    import importlib.util

    checkpoint = torch.load(models.weights_path("fer"), map_location="cpu", weights_only=True)
    assert set(checkpoint["network"]) == set(fer.state_dict())
    assert not fer.training
    assert fer.labels == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert "fer" in models.available()
    # the package's own network definition (networks.py needs only torch.nn), run as a reference
    path = models.weights_path("fer").parent.parent / "networks.py"
    spec = importlib.util.spec_from_file_location("fer_networks_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.NetworkV2(in_c=1, nl=32, out_f=7)
    reference.load_state_dict(checkpoint["network"])
    x = fer.preprocess([data.astronaut()[FACE], data.camera()])
    with torch.no_grad():
        assert torch.allclose(fer.predict(x), reference.eval()(x), atol=1e-6)


def test_fer_preprocessing_is_the_packages(fer):
    face = data.astronaut()[FACE]
    x = fer.preprocess(face)
    assert x.shape == (1, 48, 48)
    grey = Image.fromarray(face).convert("L").resize((48, 48), Image.Resampling.BILINEAR)
    expected = (torch.from_numpy(np.asarray(grey, np.float32)) / 255 - 0.5) / 0.5
    assert torch.allclose(x[0], expected, atol=1e-6)
    pixels = fer.preprocess.to_pixels(x[None])
    assert pixels.shape == (1, 3, 48, 48)
    assert torch.allclose(pixels[0, 0], torch.from_numpy(np.asarray(grey, np.float32)), atol=1e-3)


def test_fer_reads_the_astronauts_smile(fer):
    x = fer.preprocess([data.astronaut()[FACE], data.astronaut()[LOOSE_FACE]])
    with torch.no_grad():
        scores = fer.predict(x)
    for row, name in enumerate(("tight face", "loose crop")):
        top = scores[row].argsort(descending=True)[:3].tolist()
        print(name, [(fer.labels[i], round(float(scores[row, i]), 3)) for i in top])
    assert fer.labels[int(scores[0].argmax())] == "happy"
    assert fer.labels[int(scores[1].argmax())] in {"happy", "neutral", "surprise"}


@pytest.mark.parametrize("method", ["gradcam", "fgvis"])
def test_fer_maps_explain_a_real_expression(fer, method):
    before = {k: v.clone() for k, v in fer.state_dict().items()}
    x = fer.preprocess(data.astronaut()[FACE])[None]
    options = {"max_iterations": 60} if method == "fgvis" else {}
    exp = em.explain(fer, x, method, **options)
    assert exp.maps.shape == (1, 1, 48, 48)
    assert bool(torch.isfinite(exp.maps).all())
    assert float(exp.maps.max()) > 0
    assert fer.labels[exp.targets[0]] == "happy"
    assert all(torch.equal(before[k], v) for k, v in fer.state_dict().items())


def test_fer_is_a_builtin_of_load_model():
    from evidencemap.models.loading import load_model

    loaded = load_model("fer")
    assert loaded.source == "builtin"
    assert loaded.kind == "image"
    assert loaded.label(3) == "happy"
    assert loaded.preprocess.size == 48


def test_the_package_never_imports_torchvision_or_timm():
    """torchvision / timm are optional (``torchvision:`` / ``timm:`` specs only): with both made
    unimportable, the package, the command line, the service and the built-in model all work."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "tried = []\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torchvision', 'timm'):\n"
        "            tried.append(name)\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, evidencemap as em, evidencemap.server, evidencemap.distributed\n"
        "from evidencemap.cli import main\n"
        "assert main(['methods']) == 0\n"
        "model = em.models.load('efficientnet-lite0')\n"
        "x = torch.rand(1, 3, 224, 224)\n"
        "assert em.explain(model, x, 'gradcam').maps.shape == (1, 1, 224, 224)\n"
        "evidencemap.server.create_app(model=model)\n"
        "print('tried', tried)\n"
        "try:\n"
        "    em.models.load('torchvision:resnet18')\n"
        "except ValueError as err:\n"
        "    assert 'needs torchvision' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('torchvision: loaded while blocked')\n"
        "print('ok', 'torchvision' in sys.modules, 'timm' in sys.modules)\n"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "tried []" in lines  # not even attempted (a guarded import would be found here)
    assert lines[-1] == "ok False False"


def test_fgvis_transfer_models_are_found_without_importing_the_model_zoo():
    """FGVis' transfer="installed" reads the models' entry point; the methods never import
    evidencemap.models (a fresh interpreter that imports only the registry)."""
    code = (
        "import sys\n"
        "from evidencemap.methods.registry import installed_transfer_models\n"
        "assert 'evidencemap.models' not in sys.modules\n"
        "print([name for name, module in installed_transfer_models()])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "['efficientnet-lite1', 'efficientnet-lite2']"
