"""Explanation-guided training: the guidance terms, their gradients, and Decoy-MNIST."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evidencemap as em
from evidencemap.metrics import EnergyPointingGame
from evidencemap.training import GuidanceLoss, resize_guidance
from evidencemap.training.decoy_mnist import (
    DigitCNN,
    accuracy,
    decoy_mnist,
    load_mnist_5k,
    mnist_5k_path,
    train,
)
from tiny import MLP, ConvGapFc, assert_unchanged, seeded, snapshot

COMBINATIONS = [
    (attention, distance)
    for attention in ("features", "gradcam", "input_gradient")
    for distance in ("cosine", "rrr", "mse")
]


def tiny(dims: int = 2, seed: int = 0) -> nn.Module:
    return seeded(ConvGapFc(dims=dims), seed).double()


def batch(dims: int, n: int = 2, size: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    spatial = (size,) * dims
    x = torch.randn(n, 3, *spatial, generator=gen, dtype=torch.double)
    h = torch.rand(n, 1, *spatial, generator=gen, dtype=torch.double)
    return x, h


def guide_for(model: nn.Module, attention: str, distance: str) -> GuidanceLoss:
    layer = None if attention == "input_gradient" else "features.2"
    return GuidanceLoss(model, layer, attention, distance)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def set_params(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(("attention", "distance"), COMBINATIONS)
def test_gradient_matches_finite_differences(attention, distance, dims):
    """d(guidance term)/d(parameters) by autograd (double backprop) equals central differences."""
    model = tiny(dims)
    x, h = batch(dims, size=5 if dims == 3 else 6)
    if distance == "rrr":
        h = (h > 0.5).double()
    guide = guide_for(model, attention, distance)
    target = [1, 3]
    params = list(model.parameters())
    loss = guide(x, h, target=target)
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # features: fc is unused
    analytic = torch.cat(
        [
            torch.zeros_like(p).flatten() if g is None else g.flatten()
            for p, g in zip(params, grads, strict=False)
        ]
    )
    base = flat_params(model)
    gen = torch.Generator().manual_seed(7)
    direction = torch.randn(base.shape, generator=gen, dtype=torch.double)
    eps = 1e-6
    set_params(model, base + eps * direction)
    plus = float(guide(x, h, target=target).detach())
    set_params(model, base - eps * direction)
    minus = float(guide(x, h, target=target).detach())
    set_params(model, base)
    numeric = (plus - minus) / (2 * eps)
    assert abs(float(analytic @ direction)) > 1e-8  # the term does depend on the parameters
    assert float(analytic @ direction) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("dims", [2, 3])
def test_feature_attention_is_the_channel_mean(dims):
    model = tiny(dims)
    x, h = batch(dims)
    layer = model.features[2]
    guide = GuidanceLoss(model, layer, "features", "cosine")
    with guide.record() as rec:
        model(x)
    with torch.no_grad():
        acts = model.features[:3](x)
    (attention,) = rec.attention()
    assert attention.shape == (2, 1, *x.shape[2:])
    hand = acts.sum(1, keepdim=True) / acts.shape[1]
    assert torch.allclose(attention, hand, atol=1e-12)
    a, g = hand.flatten(1), h.flatten(1)
    cosine = (a * g).sum(1) / (a.norm(dim=1) * g.norm(dim=1))
    assert float(rec.loss(h)) == pytest.approx(float((1 - cosine).mean()), rel=1e-10)


def test_gradcam_attention_equals_the_gradcam_method():
    model = tiny()
    x, _ = batch(2)
    guide = GuidanceLoss(model, "features.3", "gradcam", "cosine")
    with guide.record() as rec:
        model(x)
    (cam,) = rec.attention(target=[0, 2])
    acts = model.features(x).detach().requires_grad_(True)
    score = model.fc(model.pool(acts).flatten(1))[[0, 1], [0, 2]].sum()
    (grad,) = torch.autograd.grad(score, acts)
    hand = F.relu((grad.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True)).detach()
    assert torch.allclose(cam, hand, atol=1e-12)
    # and the library's own Grad-CAM (normalised, upsampled) has the same arg-max
    maps = em.explain(model, x, "gradcam", target=[0, 2], layer="features.3").maps
    assert torch.equal(maps.flatten(1).argmax(1), hand.flatten(1).argmax(1))


def test_input_gradient_is_ross_sum_of_log_probabilities():
    model = tiny()
    x, _ = batch(2)
    guide = GuidanceLoss(model, attention="input_gradient", distance="rrr")
    with guide.record() as rec:
        model(x)
    (grad,) = rec.attention()
    xr = x.clone().requires_grad_(True)
    (hand,) = torch.autograd.grad(F.log_softmax(model(xr), 1).sum(), xr)
    assert torch.allclose(grad, hand, atol=1e-12)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.double)
    mask[:, :, :2, :2] = 1
    assert float(rec.loss(mask)) == pytest.approx(
        float((mask * hand).pow(2).flatten(1).sum(1).mean()), rel=1e-10
    )
    (one_class,) = rec.attention(target=[1, 2])
    (hand_1,) = torch.autograd.grad(F.log_softmax(model(xr), 1)[[0, 1], [1, 2]].sum(), xr)
    assert torch.allclose(one_class, hand_1, atol=1e-12)


@pytest.mark.parametrize(("attention", "distance"), COMBINATIONS)
def test_one_forward_hooks_gone_and_model_unchanged(attention, distance):
    model = tiny()
    model.train()
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.25)
    x, h = batch(2)
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    guide = guide_for(model, attention, distance)
    with guide.record() as rec:
        logits = model(x)
    handle.remove()
    before = snapshot(model)
    loss = F.cross_entropy(logits, torch.tensor([0, 1])) + rec.loss(h, target=[0, 1])
    assert len(calls) == 1  # the loop's own forward pass, nothing more
    assert_unchanged(model, before)  # no hooks left, no .grad touched by the loss itself
    assert not x.requires_grad
    loss.backward()  # the caller's backward is what fills .grad
    assert all(p.grad is not None for p in model.parameters())
    assert model.training


def test_in_place_activation_after_the_layer_does_not_alter_the_recording():
    model = seeded(ConvGapFc(inplace=True), 0).double()
    x, _h = batch(2)
    guide = GuidanceLoss(model, "features.2", "features", "cosine")  # conv; ReLU(inplace) next
    with guide.record() as rec:
        model(x)
    with torch.no_grad():
        pre_relu = model.features[:3](x)
    assert bool((pre_relu < 0).any())
    assert torch.allclose(rec.activations[0], pre_relu)


def test_automatic_layer_is_the_last_spatial_one_and_kept():
    model = tiny()
    x, h = batch(2)
    guide = GuidanceLoss(model, attention="features")
    assert guide.layers == []
    first = guide(x, h)
    assert guide.layers == [model.features[3]]
    assert float(first) == pytest.approx(
        float(GuidanceLoss(model, "features.3", "features")(x, h)), rel=1e-12
    )


def test_multiple_layers_average():
    model = tiny()
    x, h = batch(2)
    both = GuidanceLoss(model, ["features.1", "features.3"], "gradcam", "cosine")(x, h, 0)
    one = GuidanceLoss(model, "features.1", "gradcam", "cosine")(x, h, 0)
    two = GuidanceLoss(model, "features.3", "gradcam", "cosine")(x, h, 0)
    assert float(both) == pytest.approx((float(one) + float(two)) / 2, rel=1e-12)


def test_other_threads_are_not_recorded():
    model = tiny()
    x, _h = batch(2)
    guide = GuidanceLoss(model, "features.3", "features")
    with guide.record() as rec:
        worker = threading.Thread(target=lambda: model(x[:1] * 0))
        worker.start()
        worker.join()
        model(x)
    assert rec.inputs is x
    assert rec.activations[0].shape[0] == 2


def test_resize_guidance_like_belharbi():
    h = torch.zeros(1, 1, 8, 8)
    h[..., 2:4, 2:4] = 1.0
    small = resize_guidance(h, (4, 4))
    assert small.shape == (1, 1, 4, 4)
    assert float(small.min()) >= 0
    assert float(small.max()) <= 1
    assert torch.equal(resize_guidance(h, (8, 8)), h)
    up = resize_guidance(torch.tensor([[[[0.0, 1.0]]]]), (1, 3))
    assert torch.allclose(up, torch.tensor([[[[0.0, 0.5, 1.0]]]]))  # align_corners=True
    vol = resize_guidance(torch.rand(2, 1, 4, 4, 4), (2, 2, 2))
    assert vol.shape == (2, 1, 2, 2, 2)


def test_zero_attention_gives_a_finite_loss():
    model = tiny()
    with torch.no_grad():
        model.features[2].weight.zero_()
        model.features[2].bias.fill_(-1.0)  # ReLU kills everything: all-zero features
    x, h = batch(2)
    for attention in ("features", "gradcam"):
        loss = GuidanceLoss(model, "features.3", attention, "cosine")(x, h)
        assert torch.isfinite(loss)
        assert float(loss) == pytest.approx(1.0)
        assert float(GuidanceLoss(model, "features.3", attention, "mse")(x, h)) >= 0


def test_errors():
    model = tiny()
    x, h = batch(2)
    with pytest.raises(TypeError, match="model must be"):
        GuidanceLoss("resnet")
    with pytest.raises(ValueError, match="attention must be one of"):
        GuidanceLoss(model, attention="saliency")
    with pytest.raises(ValueError, match="distance must be one of"):
        GuidanceLoss(model, distance="kl")
    with pytest.raises(TypeError, match="attention must be a string"):
        GuidanceLoss(model, attention=3)
    with pytest.raises(ValueError, match="takes no layer"):
        GuidanceLoss(model, "features.1", attention="input_gradient")
    with pytest.raises(ValueError, match="not found"):
        GuidanceLoss(model, "nope")
    guide = GuidanceLoss(model, "features.3", "gradcam")
    with pytest.raises(ValueError, match=r"guidance must be \(2, 1"):
        guide(x, h[:, 0])
    with pytest.raises(ValueError, match=r"guidance must be \(2, 1"):
        guide(x, h[:1])
    with pytest.raises(ValueError, match=r"guidance must be \(2, 1"):
        guide(x, h.expand(2, 3, 6, 6))
    with pytest.raises(TypeError, match="guidance must be a torch.Tensor"):
        guide(x, h.numpy())
    with pytest.raises(TypeError, match="float or bool"):
        guide(x, h.long())
    with pytest.raises(ValueError, match="NaN"):
        guide(x, h * float("nan"))
    with pytest.raises(ValueError, match="class indices outside"):
        guide(x, h, target=9)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        guide([x], h)
    with pytest.raises(ValueError, match="no autograd graph"), torch.no_grad():
        guide(x, h)
    with guide.record() as rec:
        pass
    with pytest.raises(ValueError, match="nothing was recorded"):
        rec.loss(h)
    with pytest.raises(ValueError, match="no layer with a spatial output"):
        GuidanceLoss(seeded(MLP()), attention="features")(torch.randn(2, 3, 8, 8), h[:, :, :8])
    with pytest.raises(ValueError, match="is not spatial"):
        GuidanceLoss(model, "fc", "features")(x, h)
    with guide.record() as rec:
        model.features(x)  # the guided layer runs, the model itself is never called
    with pytest.raises(ValueError, match="nothing was recorded"):
        rec.loss(h)
    unused = GuidanceLoss(model, "features.3", "features")
    with unused.record() as rec:
        model.features[:2](x)  # only part of the network: model not called → nothing recorded
    with pytest.raises(ValueError, match="nothing was recorded"):
        rec.loss(h)
    assert_unchanged(model, snapshot(model))


# --------------------------------------------------------------------------- Decoy-MNIST


def test_mnist_5k_is_real_digits():
    assert mnist_5k_path().name == "mnist_5k.csv.gz"
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28)
    assert images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels, minlength=10) > 400, torch.ones(10, dtype=torch.bool))
    assert int(images.max()) == 255
    assert int(images[:, :4, :4].max()) == 0


def test_decoy_patch_encodes_the_label_in_training_and_another_class_in_test():
    train_set, test_set = decoy_mnist(4000, seed=0)
    assert len(train_set) == 4000
    assert len(test_set) == 1000
    assert torch.equal(train_set.decoy.flatten(1).sum(1), torch.full((4000,), 16.0))
    shade = (train_set.x * train_set.decoy).flatten(1).sum(1) / 16
    assert torch.allclose(shade, (255 - 25 * train_set.y).float() / 255)
    test_shade = (test_set.x * test_set.decoy).flatten(1).sum(1) / 16
    test_class = ((255 - test_shade * 255) / 25).round().long()
    assert not bool((test_class == test_set.y).any())
    outside = 1 - train_set.decoy
    assert torch.equal(train_set.x * outside, train_set.clean * outside)
    with pytest.raises(ValueError, match="n_train"):
        decoy_mnist(5000)


@pytest.mark.slow
def test_guidance_removes_the_decoy_shortcut():
    """The benchmark's protocol, one seed (4000 digits, 3 epochs): RRR beats CE on the swapped
    test set and moves the Grad-CAM off the decoy."""
    torch.set_num_threads(2)
    train_set, test = decoy_mnist(4000, seed=0)
    ce = train(train_set, "ce", epochs=3, seed=0)
    rrr = train(train_set, "rrr", 10.0, epochs=3, seed=0)
    acc_ce, acc_rrr = accuracy(ce, test.x, test.y), accuracy(rrr, test.x, test.y)
    print(f"swapped-decoy accuracy: CE {acc_ce:.3f}, RRR {acc_rrr:.3f}")
    assert acc_rrr > acc_ce + 0.05
    energy = EnergyPointingGame()
    on_decoy = [
        float(
            energy(
                em.explain(m, test.x, "gradcam", layer=m.features), test.decoy[:, 0] > 0.5
            ).mean()
        )
        for m in (ce, rrr)
    ]
    print(f"Grad-CAM energy on the decoy: CE {on_decoy[0]:.3f}, RRR {on_decoy[1]:.3f}")
    assert on_decoy[1] < on_decoy[0] / 2
    assert isinstance(ce, DigitCNN)
    assert not ce.training


def test_train_rejects_unknown_guidance():
    train_set, _ = decoy_mnist(100, seed=0)
    with pytest.raises(ValueError, match="guidance must be one of"):
        train(train_set, "lasso", epochs=1)
