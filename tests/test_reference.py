"""Agreement with Captum's LayerGradCam on the built-in pretrained model and real photos."""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam

import evidencemap as em


def test_gradcam_matches_captum_on_real_photos(lite0, photos):
    targets = [282, 967]
    ours = em.explain(lite0, photos, "gradcam", target=targets, layer="_head_act")
    captum = (
        LayerGradCam(lite0, lite0._head_act)
        .attribute(photos, target=targets, relu_attributions=True)
        .detach()
    )
    assert captum.shape == ours.raw.shape == (2, 1, 7, 7)
    scale = captum.abs().amax()
    assert torch.allclose(ours.raw, captum, atol=1e-5 * float(scale), rtol=1e-4)
    up = LayerAttribution.interpolate(captum, (224, 224), interpolate_mode="bilinear")
    assert torch.allclose(ours.maps, em.maps.normalize(up), atol=1e-4)
    # The evidence lies on the object: the cat's face / the cup fill the centre of these photos.
    centre = ours.maps[:, 0, 56:168, 56:168].mean((1, 2))
    border = torch.cat([ours.maps[:, 0, :28].flatten(1), ours.maps[:, 0, -28:].flatten(1)], 1).mean(
        1
    )
    assert bool((centre > border).all())


def test_gradcam_matches_captum_in_3d():
    from tiny import ConvGapFc, seeded

    model = seeded(ConvGapFc(dims=3))
    x = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    ours = em.explain(model, x, "gradcam", target=[1, 3], layer="features.3")
    captum = LayerGradCam(model, model.features[3]).attribute(
        x, target=[1, 3], relu_attributions=True
    )
    assert torch.allclose(ours.raw, captum, atol=1e-6)
