"""Chunks sized by what a chunk really holds: the backward pass's saved activations, not only
the perturbed inputs (SmoothGrad and Integrated Gradients on a 3-D network)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import evidencemap as em
from evidencemap import runtime
from evidencemap.methods.gradients import copy_bytes
from tiny import seeded

S = (6, 5, 4)  # a small volume, 120 voxels
BUDGET_COPIES = 8  # the hand count of 8 copies: the inputs of all 8 fit 8 times over


class WideConv3d(nn.Module):
    """Conv3d 1→16 at full resolution, ReLU, global mean, linear: the saved ReLU output is 16
    times the input, so the activations, not the inputs, decide a chunk's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3, 4)))


@pytest.fixture
def model() -> nn.Module:
    return seeded(WideConv3d())


def _batch_sizes(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_autograd_bytes_counts_the_saved_activations_by_hand(model):
    x = torch.rand(2, 1, *S)
    relu_out = 2 * 16 * 120 * 4  # the only saved tensor that is neither x nor a parameter
    # (mean saves nothing; the linear saves the mean (2×16) and its weight)
    mean_out = 2 * 16 * 4
    resident = list(model.parameters())
    assert runtime.autograd_bytes(model, x, resident) == relu_out + mean_out
    weights = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("weight"))
    assert runtime.autograd_bytes(model, x) == relu_out + mean_out + weights
    # linear in the batch, and nothing requires a gradient afterwards
    assert runtime.autograd_bytes(model, torch.cat([x, x]), resident) == 2 * (relu_out + mean_out)
    assert x.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_copy_bytes_measures_only_under_a_budget(model):
    x = torch.rand(1, 1, *S)
    method = em.SmoothGrad(model)
    inputs = 2 * 120 * 4
    assert copy_bytes(method, x, None) == inputs  # no budget: no extra forward pass
    saved = 16 * 120 * 4 + 16 * 4
    assert copy_bytes(method, x, 10**9) == inputs + saved
    with runtime.limits(memory_budget=10**9):
        assert copy_bytes(method, x, None) == inputs + saved
        assert copy_bytes(method, x, None, backward=False) == inputs


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("smoothgrad", {"samples": 8, "seed": 3}),
        ("smoothgrad", {"samples": 8, "seed": 3, "wrap": "gradcam", "layer": "conv"}),
        ("integrated_gradients", {"steps": 8}),
    ],
)
def test_the_activations_split_the_copies_into_chunks(model, name, options):
    x = torch.rand(1, 1, *S)
    whole = em.explain(model, x, name, **options)
    per_copy = 2 * 120 * 4 + 16 * 120 * 4 + 16 * 4  # inputs + saved activations, by hand
    sizes, handle = _batch_sizes(model)
    try:
        with runtime.limits(memory_budget=BUDGET_COPIES * per_copy):
            chunked = em.explain(model, x, name, **options)
    finally:
        handle.remove()
    # by the inputs alone (960 B a copy) all 8 copies would be one chunk; counted with what
    # their backward passes hold (and the first copy's measured peak, which is larger than the
    # hand count: gradients and temporaries) they come in several chunks of more than one copy
    assert 2 <= max(sizes) < 8, sizes
    assert torch.allclose(whole.maps, chunked.maps, atol=1e-6)
    assert torch.allclose(whole.scores, chunked.scores)
    # the method's own budget does the same
    sizes, handle = _batch_sizes(model)
    try:
        em.explain(model, x, name, memory_budget=BUDGET_COPIES * per_copy, **options)
    finally:
        handle.remove()
    assert 2 <= max(sizes) < 8, sizes


def test_a_copy_larger_than_the_budget_is_refused_before_the_chunks(model):
    x = torch.rand(1, 1, *S)
    sizes, handle = _batch_sizes(model)
    try:
        # room for the inputs of every copy, not for one copy's activations
        with (
            runtime.limits(memory_budget=8 * 2 * 120 * 4),
            pytest.raises(runtime.BudgetExceededError, match="noisy batches"),
        ):
            em.explain(model, x, "smoothgrad", samples=8)
    finally:
        handle.remove()
    assert max(sizes) == 1  # no chunk ran


# ------------------------------------------------------- a method's batch in budget chunks


class Counting(nn.Module):
    """:class:`WideConv3d` counting its forward passes and the backward passes through them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = seeded(WideConv3d())
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        out = self.net(x)
        if out.requires_grad:
            out.register_hook(self._backward)
        return out

    def _backward(self, grad: torch.Tensor) -> None:
        self.backwards += 1


SAVED_PER_INPUT = 16 * 120 * 4 + 16 * 4
"""What autograd saves for one input of :class:`WideConv3d` (the ReLU output and the mean fed
to the linear layer), by hand (see the first test)."""


def _input_steps() -> tuple[list[int], runtime.Progress]:
    """The starts of the chunks a batch is split into (the ``"inputs"`` progress step)."""
    from evidencemap.methods.chunking import INPUTS_STEP

    starts: list[int] = []

    def report(done: int, total: int, desc: str) -> None:
        if desc == INPUTS_STEP and done < total:
            starts.append(done)

    return starts, report


def test_the_per_input_estimate_is_what_the_method_keeps_by_hand():
    model = Counting().eval()
    x = torch.rand(3, 1, *S)
    for name, layer in (("saliency", None), ("fgvis", None), ("gradcam", "net.conv")):
        # the whole graph; Grad-CAM's from the layer on: here the same two saved tensors
        assert em.build(name, model, layer).input_bytes(x) == SAVED_PER_INPUT, name
    # methods that keep no graph are not estimated by a gradient count
    for name in ("cam", "eigencam"):
        assert em.build(name, model, "net.conv").input_bytes(x) == 0, name
    # Grad-CAM on the last spatial layer keeps only what follows it: the mean (16 floats)
    assert em.build("gradcam", model, "net").input_bytes(x) == 0  # the output: nothing after it


def test_an_input_over_the_budget_is_refused_before_the_work():
    model = Counting().eval()
    x = torch.rand(1, 1, *S)
    budget = SAVED_PER_INPUT // 2  # room for the input (480 B), not for what its backward holds
    for name, options in (("saliency", {}), ("fgvis", {"max_iterations": 50})):
        model.forwards = model.backwards = 0
        with (
            runtime.limits(memory_budget=budget),
            pytest.raises(runtime.BudgetExceededError, match="one of the inputs needs"),
        ):
            em.explain(model, x, name, **options)
        # one counting forward pass (made once per model and input shape), no backward pass:
        # neither the gradient nor a single FGVis iteration ran
        assert model.backwards == 0, name
        assert model.forwards <= 1, name
    model.forwards = 0
    with runtime.limits(memory_budget=budget), pytest.raises(runtime.BudgetExceededError):
        em.explain(model, torch.rand(4, 1, *S), "saliency")  # a batch: refused just the same
    assert (model.forwards, model.backwards) == (0, 0)  # the estimate was known: no pass at all


def test_the_estimate_is_counted_once_per_model_and_shape_and_again_for_a_changed_model():
    model = Counting().eval()
    method = em.build("saliency", model)
    x = torch.rand(1, 1, *S)
    with runtime.limits(memory_budget=10**9):
        model.forwards = 0
        method(x)
        assert model.forwards == 2  # the counting pass and the method's
        for _ in range(3):
            model.forwards = 0
            method(torch.rand(1, 1, *S))  # every request: no counting pass any more
            assert model.forwards == 1
        model.forwards = 0
        method(torch.rand(1, 1, 4, 5, 6))  # another shape: counted
        assert model.forwards == 2
        # a replaced submodule is another model: counted anew (with the new layer's size)
        model.net.conv = nn.Conv3d(1, 16, 3, padding=1)
        model.forwards = 0
        method(x)
        assert model.forwards == 2
    model.forwards = 0
    method(x)  # no budget: no estimate
    assert model.forwards == 1


def test_a_batch_is_split_within_the_budget_and_gives_the_same_result():
    model = Counting().eval()
    x = torch.rand(6, 1, *S, generator=torch.Generator().manual_seed(4))
    target = [0, 1, 2, 2, 1, 0]
    sizes, handle = _batch_sizes(model)
    try:
        whole = em.explain(model, x, "saliency", target=target)
        sizes.clear()
        starts, report = _input_steps()
        with runtime.limits(memory_budget=3 * 20_000, progress=report):
            chunked = em.explain(model, x, "saliency", target=target)
        # the counting pass (1), the first input alone (measured), then chunks of what fits
        assert sizes[:2] == [1, 1], sizes
        assert 1 < max(sizes[2:]) < 6, sizes
        assert sum(sizes[1:]) == 6
        assert starts[:2] == [0, 1]
        sizes.clear()
        with runtime.limits(memory_budget=10**9):
            em.explain(model, x, "saliency", target=target, batch_size=2)
        # (the estimate known: no counting pass) the first input measured, then batch_size,
        # the smaller
        assert sizes == [1, 2, 2, 1]
    finally:
        handle.remove()
    assert torch.allclose(chunked.maps, whole.maps, atol=1e-6)
    assert torch.equal(chunked.targets, whole.targets)
    assert torch.equal(chunked.targets, torch.tensor(target))
    # a ClassLogit of per-sample classes goes with its rows too (with batch_size alone as well)
    logits = em.explain(model, x, "saliency", target=em.targets.ClassLogit(target), batch_size=4)
    assert torch.allclose(logits.maps, whole.maps, atol=1e-6)


def test_cancelling_stops_a_split_batch_between_chunks():
    model = Counting().eval()
    x = torch.rand(6, 1, *S)
    event = threading.Event()

    def report(done: int, total: int, desc: str) -> None:
        if desc == "inputs" and done >= 1:
            event.set()  # cancelled while the second chunk starts

    model.forwards = 0
    with (
        runtime.limits(memory_budget=3 * 20_000, cancel=event, progress=report),
        pytest.raises(runtime.RunCancelledError),
    ):
        em.explain(model, x, "saliency")
    # chunks of 1, 2, 2, 1 inputs: the first two ran, the third's checkpoint stopped the run
    assert model.backwards == 2


@pytest.mark.filterwarnings("ignore::UserWarning")  # FGVis's flat-map notice on a tiny network
def test_batches_that_cannot_be_split_are_kept_whole():
    model = Counting().eval()
    x = torch.rand(4, 1, *S, generator=torch.Generator().manual_seed(5))
    budget = 3 * 20_000  # splits saliency's batch (the test above)
    cases = [
        # noise drawn for the whole batch: a chunk would draw other noise
        ("gradcam", {"layer": "net.conv", "gradient_noise": 0.5, "noise_seed": 1}, None),
        # a score function of the whole output: its rows cannot be told apart
        ("saliency", {}, lambda out: out[:, 0] - out[:, 1]),
    ]
    for name, options, target in cases:
        whole = em.explain(model, x, name, target=target, **options)
        starts, report = _input_steps()
        with runtime.limits(memory_budget=budget, progress=report):
            kept = em.explain(model, x, name, target=target, **options)
        assert starts == [], name
        assert torch.equal(kept.maps, whole.maps), name
    # … and refused before any work when the whole batch is estimated over the budget
    model.forwards = model.backwards = 0
    with (
        runtime.limits(memory_budget=2 * SAVED_PER_INPUT),
        pytest.raises(runtime.BudgetExceededError, match="batches of 4 inputs"),
    ):
        em.explain(model, x, "gradcam", layer="net.conv", gradient_noise=0.5, noise_seed=1)
    assert model.backwards == 0


def test_fgvis_with_noise_is_split_and_equals_the_whole_batch():
    """FGVis draws every noise sample once, of an input's shape, for the whole batch: a budget
    splits its batch, and the chunks give the whole batch's maps."""
    from evidencemap.memory import PeakMemory

    model = Counting().eval()
    x = torch.rand(4, 1, *S, generator=torch.Generator().manual_seed(5))
    options = {"max_iterations": 3, "noise": 0.1}
    whole = em.explain(model, x, "fgvis", **options)
    with PeakMemory() as one:
        em.explain(model, x[:1], "fgvis", **options)
    starts, report = _input_steps()
    with runtime.limits(memory_budget=int(2.5 * one.peak), progress=report):
        split = em.explain(model, x, "fgvis", **options)
    assert len(starts) >= 2, starts
    torch.testing.assert_close(split.maps, whole.maps)
    torch.testing.assert_close(split.extras["noise_ratio"], whole.extras["noise_ratio"])


def test_a_wrapped_method_is_not_split_again():
    model = Counting().eval()
    x = torch.rand(2, 1, *S)
    starts, report = _input_steps()
    sizes, handle = _batch_sizes(model)
    try:
        with runtime.limits(memory_budget=10**9, progress=report):
            split = em.explain(model, x, "smoothgrad", wrap="gradcam", layer="net.conv", samples=4)
    finally:
        handle.remove()
    assert starts == [0, 1]  # SmoothGrad's batch one input at a time (it sizes its own chunks)
    # per input: the clean forward, then its noisy copies: the first measured, the other three
    # in one chunk the wrapped Grad-CAM took whole; the counting pass only for the first input
    assert sizes == [1, 1, 1, 3, 1, 1, 3]
    # each sample's noise is its own: the split batch, the whole batch and one input alone agree
    whole = em.explain(model, x, "smoothgrad", wrap="gradcam", layer="net.conv", samples=4)
    alone = em.explain(model, x[1:], "smoothgrad", wrap="gradcam", layer="net.conv", samples=4)
    torch.testing.assert_close(split.maps, whole.maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(split.maps[1:], alone.maps, atol=1e-6, rtol=0)


def test_smoothgrad_top_k_is_split_under_a_budget_it_would_exceed_whole():
    model = Counting().eval()
    x = torch.rand(1, 1, *S).expand(6, 1, *S)
    targets = [0, 1, 2, 0, 1, 2]
    whole = em.explain(model, x, "smoothgrad", target=targets, samples=4)
    from evidencemap.methods.gradients import copy_bytes

    one = copy_bytes(em.build("smoothgrad", model, samples=4), x[:1], 10**12, True)
    with runtime.limits(memory_budget=int(one * 4)):  # one copy of the 6 inputs does not fit
        split = em.explain(model, x, "smoothgrad", target=targets, samples=4)
    torch.testing.assert_close(split.maps, whole.maps, atol=1e-6, rtol=0)


def test_target_rows_slices_what_belongs_to_each_sample():
    from evidencemap import targets as T

    def rows(target, n=4, spatial=2):
        split = T.target_rows(target, n, spatial)
        return None if split is None else split(1, 3)

    assert T.target_rows(None, 4, 2) is not None  # the same None for every chunk
    assert rows(None) is None
    assert rows(2) == 2
    assert rows([5, 6, 7, 8]) == [6, 7]
    assert rows((5, 6, 7, 8)) == (6, 7)
    assert torch.equal(rows(torch.tensor([5, 6, 7, 8])), torch.tensor([6, 7]))
    assert torch.equal(rows(torch.tensor(3)), torch.tensor(3))
    assert rows([5, 6, 7]) is None  # a wrong count: the whole batch reports the error
    assert rows(T.ClassLogit([5, 6, 7, 8])) == T.ClassLogit([6, 7])
    assert rows(T.ClassProbability(3)) == T.ClassProbability(3)
    assert rows(T.Counterfactual([5, 6, 7, 8])) == T.Counterfactual([6, 7])
    assert rows(T.Counterfactual(lambda out: out[:, 0])) is None
    shared = torch.ones(5, 5)
    assert rows(T.SegmentationRegion(1, shared)).mask is shared
    per_sample = torch.arange(4.0).view(4, 1, 1).expand(4, 5, 5)
    assert rows(T.SegmentationRegion(1, per_sample)).mask[:, 0, 0].tolist() == [1.0, 2.0]
    one = torch.ones(7)
    assert rows(T.EmbeddingSimilarity(one)).reference is one
    refs = torch.arange(4.0).view(4, 1).expand(4, 7)
    assert rows(T.EmbeddingSimilarity(refs)).reference[:, 0].tolist() == [1.0, 2.0]
    assert rows(lambda out: out[:, 0]) is None


def test_lite0_top_k_batches_are_chunked_within_the_budget(lite0):
    """The service's top-k batch of one photo, on the real network."""
    from skimage import data

    from evidencemap.memory import PeakMemory

    x = lite0.preprocess(data.chelsea())[None]
    with torch.no_grad():
        top = lite0.module(x).topk(3).indices[0].tolist()
    batch = x.expand(3, *x.shape[1:])
    em.explain(lite0, x, "gradcam")  # the layer found: not part of the peaks below
    budget = 200 * 2**20  # one guided backprop input (≈ 95 MiB) fits, three (≈ 285) do not
    with PeakMemory() as free:
        whole = em.explain(lite0, batch, "guided_backprop", target=top)
    assert free.peak > budget
    with runtime.limits(memory_budget=budget), PeakMemory() as meter:
        chunked = em.explain(lite0, batch, "guided_backprop", target=top)
    assert meter.peak <= budget + 3 * 2 * x.numel() * 4  # + the results (raw, maps)
    assert torch.allclose(chunked.maps, whole.maps, atol=1e-5)
    assert torch.equal(chunked.targets, torch.tensor(top))
    # under 32 MiB the CAMs that keep no graph still run (≈ 12 MiB an input); a gradient
    # method whose one input saves ≈ 78 MiB for its backward is refused before any work
    small = 32 * 2**20
    for name in ("gradcam", "cam", "eigencam"):
        reference = em.explain(lite0, batch, name, target=top)
        with runtime.limits(memory_budget=small), PeakMemory() as meter:
            got = em.explain(lite0, batch, name, target=top)
        assert meter.peak <= small, name
        assert torch.allclose(got.maps, reference.maps, atol=1e-5), name
    calls: list[bool] = []
    handle = lite0.module.register_forward_hook(lambda m, a, out: calls.append(out.requires_grad))
    try:
        with runtime.limits(memory_budget=small), pytest.raises(runtime.BudgetExceededError):
            em.explain(lite0, batch, "saliency", target=top)
    finally:
        handle.remove()
    assert len(calls) <= 1  # at most the counting pass (none once counted)


@pytest.mark.parametrize(
    "name", [n for n in em.methods() if getattr(em.describe(n).cls, "needs_attention", False)]
)
def test_attention_methods_split_a_batch_as_a_whole(name):
    from evidencemap.memory import PeakMemory
    from vit_helpers import TinyViT

    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    whole = em.explain(model, x, name)
    with PeakMemory() as one:
        em.explain(model, x[:1], name)
    starts, report = _input_steps()
    with runtime.limits(memory_budget=int(2.5 * one.peak), progress=report):
        chunked = em.explain(model, x, name)
    assert len(starts) >= 2, starts
    assert torch.allclose(chunked.maps, whole.maps, atol=1e-6)
    assert torch.allclose(chunked.extras["relevance"], whole.extras["relevance"], atol=1e-6)


def test_refusal_messages_name_sizes_in_readable_units():
    assert runtime.size_text(3 * 2**20 // 2) == "1.5 MiB"
    assert runtime.size_text(48 * 1024) == "48.0 KiB"
    assert runtime.size_text(512) == "512 B"
    with runtime.limits(memory_budget=20_000), pytest.raises(runtime.BudgetExceededError) as err:
        runtime.chunk_items(40_000, 4)
    assert "39.1 KiB" in str(err.value)
    assert "19.5 KiB" in str(err.value)
