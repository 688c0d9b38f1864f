"""The shared pipeline: hooks, model state, targets, layers, batching and every error path."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

import evidencemap as em
from evidencemap import targets as T
from evidencemap.methods import LayerMethod
from tiny import MLP, ConvGapFc, TinySegmenter, TupleOut, assert_unchanged, seeded, snapshot

# From the registry: every built-in layer method (the CAM family).
ALL_LAYER_METHODS = [
    n
    for n in em.methods()
    if issubclass(em.describe(n).cls, LayerMethod)
    and em.describe(n).cls.__module__.startswith("evidencemap.")
]


@pytest.fixture
def model():
    return seeded(ConvGapFc(inplace=True))


@pytest.fixture
def x():
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ALL_LAYER_METHODS)
def test_model_left_exactly_as_found(model, x, method):
    model.train()  # a training-mode model is explained in eval mode and handed back in train mode
    model.features[0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)  # user .grad is not touched
    before = snapshot(model)
    exp = em.explain(model, x, method)
    assert torch.isfinite(exp.maps).all()
    assert_unchanged(model, before)
    assert model.training
    assert model.features[1].training


def test_hooks_removed_when_the_call_raises(model, x):
    before = snapshot(model)
    with pytest.raises(ValueError, match="class indices"):
        em.explain(model, x, "gradcam", target=99)
    with pytest.raises(ValueError, match="one score per sample"):
        em.explain(model, x, "gradcam", target=lambda out: out.sum())
    assert_unchanged(model, before)


def test_inplace_relu_and_relu6_work():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU6(inplace=True),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    seeded(net)
    x = torch.randn(2, 3, 10, 10)
    for layer in ("0", "2", "3"):  # the conv before an in-place activation, and the activation
        exp = em.explain(net, x, "gradcam", layer=layer)
        assert torch.isfinite(exp.maps).all()
        assert exp.layer == layer


def test_explanations_work_under_no_grad_and_inference_mode(model, x):
    expected = em.explain(model, x, "gradcam").maps
    with torch.no_grad():
        assert torch.equal(em.explain(model, x, "gradcam").maps, expected)
    with torch.inference_mode():
        x_inf = x.clone()
        got = em.explain(model, x_inf, "gradcam").maps
    assert torch.equal(got, expected)


def test_batch_equals_one_by_one_and_chunks(model, x):
    batch = em.explain(model, x, "gradcam++", target=[0, 1, 2])
    for i in range(x.shape[0]):
        single = em.explain(model, x[i : i + 1], "gradcam++", target=i)
        assert torch.allclose(batch.maps[i], single.maps[0], atol=1e-6)
    chunked = em.explain(model, x, "gradcam++", target=[0, 1, 2], batch_size=2)
    assert torch.allclose(chunked.maps, batch.maps, atol=1e-6)
    assert torch.equal(chunked.targets, batch.targets)


def test_deterministic(model, x):
    a = em.explain(model, x, "scorecam")
    b = em.explain(model, x, "scorecam")
    assert torch.equal(a.maps, b.maps)


def test_target_forms(model, x):
    logits = model(x)
    top = em.explain(model, x, "gradcam")
    assert torch.equal(top.targets, logits.argmax(1))
    one = em.explain(model, x, "gradcam", target=2)
    assert one.targets.tolist() == [2, 2, 2]
    assert torch.allclose(one.scores, logits[:, 2], atol=1e-6)
    seq = em.explain(model, x, "gradcam", target=torch.tensor([0, 1, 3]))
    assert seq.targets.tolist() == [0, 1, 3]
    prob = em.explain(model, x, "gradcam", target=T.ClassProbability([0, 1, 3]))
    assert torch.allclose(prob.scores, logits.softmax(1)[torch.arange(3), [0, 1, 3]], atol=1e-6)
    fn = em.explain(model, x, "gradcam", target=lambda out: out[:, 1] - out[:, 0])
    assert fn.targets is None
    assert torch.allclose(fn.scores, logits[:, 1] - logits[:, 0], atol=1e-6)


def test_segmentation_and_embedding_targets():
    seg = seeded(TinySegmenter())
    x = torch.randn(2, 3, 6, 6)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[1:3, 2:5] = True
    exp = em.explain(seg, x, "gradcam", target=T.SegmentationRegion(1, mask), layer="body.1")
    assert torch.allclose(exp.scores, seg(x)[:, 1][:, mask].sum(1), atol=1e-5)
    assert exp.maps.shape == (2, 1, 6, 6)
    net = seeded(ConvGapFc())
    ref = torch.randn(4)
    emb = em.explain(net, x, "gradcam", target=T.EmbeddingSimilarity(ref))
    assert torch.allclose(emb.scores, torch.cosine_similarity(net(x), ref[None], dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="reference must be"):
        em.explain(net, x, "gradcam", target=T.EmbeddingSimilarity(torch.randn(5)))
    with pytest.raises(ValueError, match="mask must have shape"):
        em.explain(
            seg, x, "gradcam", target=T.SegmentationRegion(1, torch.ones(3, 3)), layer="body.1"
        )


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_mapping_outputs(as_dict):
    wrapped = TupleOut(as_dict=as_dict)
    seeded(wrapped)
    x = torch.randn(2, 3, 6, 6)
    exp = em.explain(wrapped, x, "gradcam")
    plain = em.explain(wrapped.net, x, "gradcam")
    assert torch.equal(exp.maps, plain.maps)
    with pytest.raises(TypeError, match="output_key"):
        em.explain(wrapped, x, "gradcam", output_key=5 if not as_dict else "missing")


def test_layer_forms_and_fusion(model, x):
    by_name = em.explain(model, x, "gradcam", layer="features.2")
    by_module = em.GradCAM(model, layer=model.features[2])(x)
    assert torch.equal(by_name.maps, by_module.maps)
    assert by_module.layer == "features.2"
    fused = em.explain(model, x, "gradcam", layer=["features.1", "features.3"])
    assert fused.layer == ["features.1", "features.3"]
    assert len(fused.raw) == 2
    a = em.explain(model, x, "gradcam", layer="features.1").maps
    b = em.explain(model, x, "gradcam", layer="features.3").maps
    assert torch.allclose(fused.maps, em.maps.normalize((a + b) / 2), atol=1e-6)


def test_errors(model, x):
    with pytest.raises(TypeError, match="model must be"):
        em.explain("resnet", x)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        em.explain(model, x.numpy())
    with pytest.raises(TypeError, match="floating-point"):
        em.explain(model, (x * 10).long())
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        em.explain(model, x[0])
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        em.explain(model, bad)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        em.explain(model, bad)
    with pytest.raises(ValueError, match=r"outside \[0, 3\]"):
        em.explain(model, x, target=4)
    with pytest.raises(ValueError, match="outside"):
        em.explain(model, x, target=-1)
    with pytest.raises(ValueError, match="2 entries but the batch has 3"):
        em.explain(model, x, target=[0, 1])
    with pytest.raises(TypeError, match="target must be"):
        em.explain(model, x, target=1.5)
    with pytest.raises(ValueError, match="unknown method 'gradkam'"):
        em.explain(model, x, "gradkam")
    with pytest.raises(ValueError, match="layer 'features.9' not found"):
        em.explain(model, x, layer="features.9")
    with pytest.raises(ValueError, match="without the spatial axes"):
        em.explain(model, x, layer="fc")
    with pytest.raises(ValueError, match="no layer with a spatial output"):
        em.explain(seeded(MLP()), x)
    with pytest.raises(ValueError, match="not a submodule"):
        em.explain(model, x, layer=nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="weighting must be"):
        em.explain(model, x, "scorecam", weighting="max")
    with pytest.raises(ValueError, match="internal_batch_size must be an int >= 1"):
        em.explain(model, x, "scorecam", internal_batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        em.explain(model, x, "scorecam", batch_size=0)
    with pytest.raises(ValueError, match="CAM explains a class"):
        em.explain(model, x, "cam", target=lambda out: out[:, 0])


def test_cam_refuses_models_that_are_not_gap_fc():
    max_pooled = seeded(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)
        )
    )
    with pytest.raises(ValueError, match="global average pooling"):
        em.explain(max_pooled, torch.randn(1, 3, 6, 6), "cam", layer="1")
    two_heads = seeded(
        nn.Sequential(
            nn.Conv2d(3, 5, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(5, 2),
            nn.Linear(2, 3),
        )
    )
    with pytest.raises(ValueError, match="feeding the last nn.Linear"):
        em.explain(two_heads, torch.randn(1, 3, 4, 4), "cam", layer="0")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_repeated_calls_do_not_grow_memory(model):
    x = torch.randn(4, 3, 16, 16)
    for _ in range(20):  # warm up allocator caches
        em.explain(model, x, "gradcam")
    gc.collect()
    start = _rss_bytes()
    for i in range(300):
        em.explain(model, x, ALL_LAYER_METHODS[i % 7])
    gc.collect()
    grown = _rss_bytes() - start
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 300 calls"


# ------------------------------------------------------------------ state, devices, targets


class BatchNormNet(nn.Module):
    """conv → BatchNorm → ReLU → GAP → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "saliency", "scorecam"])
def test_eval_mode_false_leaves_batchnorm_statistics_as_found(method):
    model = seeded(BatchNormNet()).train()
    bn = model.features[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    exp = em.explain(model, x, method, eval_mode=False)
    assert torch.isfinite(exp.maps).all()
    after = model.state_dict()
    for key, value in before.items():  # running mean, variance and batch count included
        assert torch.equal(after[key], value), key
    assert model.training
    assert bn.training
    with torch.no_grad():  # the run did use batch statistics: a forward in train mode moves them
        model(x)
    assert not torch.equal(bn.running_mean, before["features.1.running_mean"])


def test_inputs_on_another_device_than_the_model_are_refused_naming_both():
    model = ConvGapFc().to("meta")
    with pytest.raises(
        ValueError, match=r"inputs are on device cpu but the model's parameters are on meta"
    ):
        em.explain(model, torch.randn(1, 3, 8, 8), "gradcam")


class ClassifierOutputTarget:
    """pytorch-grad-cam's target: the score of ``category`` in one sample's output row."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        if model_output.ndim == 1:
            return model_output[self.category]
        return model_output[:, self.category]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "saliency", "integrated_gradients"])
def test_a_list_of_per_sample_callables_is_a_target(model, x, method):
    classes = list(range(x.shape[0]))
    classes = [c % 4 for c in classes]
    opts = {"steps": 4} if method == "integrated_gradients" else {}
    by_callables = em.explain(
        model, x, method, target=[ClassifierOutputTarget(c) for c in classes], **opts
    )
    by_indices = em.explain(model, x, method, target=classes, **opts)
    torch.testing.assert_close(by_callables.maps, by_indices.maps)
    torch.testing.assert_close(by_callables.scores, by_indices.scores)
    # split by batch_size too: each chunk gets its rows' callables
    chunked = em.explain(
        model, x, method, target=[ClassifierOutputTarget(c) for c in classes], batch_size=1, **opts
    )
    torch.testing.assert_close(chunked.maps, by_indices.maps)


def test_per_sample_callable_targets_errors(model, x):
    n = x.shape[0]
    with pytest.raises(TypeError, match="one callable per sample, not a mix"):
        em.explain(model, x, "gradcam", target=[ClassifierOutputTarget(0), *([1] * (n - 1))])
    with pytest.raises(ValueError, match=f"target has 1 callables but the batch has {n} samples"):
        em.explain(model, x, "gradcam", target=[ClassifierOutputTarget(0)])
    with pytest.raises(ValueError, match="must return one score"):
        em.explain(model, x, "gradcam", target=[lambda row: row] * n)
