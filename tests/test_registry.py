"""Every registered method, found through the registry: the invariants a new method gets for free.

Nothing here lists methods by hand: a method registered with ``@register`` is checked for its
option description, for leaving the model exactly as found, for 2-D and 3-D inputs, for the
memory budget and for the factory's errors. :class:`MaxGradCAM` below is a new method written
in this file only (one class, one decorator): it is checked with the built-in ones. Like a
user's method it stays registered for the session (so a list derived from the registry at
collection time never names a method that is gone when its test runs).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import threading
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import evidencemap as em
from evidencemap import runtime
from evidencemap.cli import main
from evidencemap.methods import Context, LayerMethod, Option, OptionError, describe
from evidencemap.methods.base import gradients_of
from evidencemap.methods.options import reported_options
from evidencemap.methods.registry import register
from tiny import ConvGapFc, assert_unchanged, seeded, snapshot


@register
class MaxGradCAM(LayerMethod):
    """Max-gradient CAM (a new method, defined in this test file only): ``L = ReLU(Σ_k w_k A_k)``
    with ``w_k = scale · max_ij g_k,ij``."""

    name = "maxgradcam"
    aliases: ClassVar[tuple[str, ...]] = ("max-grad-cam",)
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("scale", "float", 1.0, "factor of the channel weights", low=0.0, low_open=True),
    )

    def __init__(
        self, model: nn.Module, layer: Any = None, *, scale: float = 1.0, **kw: Any
    ) -> None:
        super().__init__(model, layer, **kw)
        self.scale = self.option("scale", scale)

    def channel_weights(self, acts: Tensor, grads: Tensor | None, context: Context) -> Tensor:
        return self.scale * gradients_of(grads).flatten(2).amax(2)


CNN_METHODS = [n for n in em.methods() if not getattr(describe(n).cls, "needs_attention", False)]


def fast_options(name: str) -> dict[str, object]:
    """Every costly ``int`` option at a small value (4, or its default when smaller)."""
    out: dict[str, object] = {}
    for option in describe(name).options.values():
        if option.cost == "work" and option.kind == "int" and option.default is not None:
            out[option.name] = min(int(option.default), max(4, int(option.low or 1)))
    return out


@pytest.mark.parametrize("name", em.methods())
def test_options_describe_the_constructor_exactly(name):
    spec = describe(name)
    assert all(o.doc != "(not described)" for o in spec.options.values()), [
        o.name for o in spec.options.values() if o.doc == "(not described)"
    ]
    params: dict[str, object] = {}
    for klass in spec.cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        sig = inspect.signature(init).parameters.values()
        for p in sig:
            if p.name in ("self", "model", "layer") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            params.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in sig):
            break
    # a former name of a renamed option stays a constructor keyword (default None), nothing else
    former = {old for o in spec.options.values() for old in o.renamed_from}
    assert former <= set(params)
    assert all(params.pop(old) is None for old in former)
    assert not former & set(spec.options)
    assert set(spec.options) == set(params)
    for option_name, default in params.items():
        described = spec.options[option_name].default
        assert described == default or repr(described) == repr(default), option_name
        # the described default passes its own check
        spec.options[option_name].check(default)
    assert spec.summary
    assert spec.to_json()["name"] == spec.name


@pytest.mark.parametrize("name", CNN_METHODS)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_method_leaves_the_model_as_found_in_2d_and_3d(name, dims):
    model = seeded(ConvGapFc(dims=dims, inplace=True))
    model.train()
    model.features[0].weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    before = snapshot(model)
    spatial = (8, 8) if dims == 2 else (4, 6, 6)
    x = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1))
    exp = em.explain(model, x, name, **fast_options(name))
    assert exp.maps.shape == (2, 1, *spatial)
    assert torch.isfinite(exp.maps).all()
    assert float(exp.maps.min()) >= 0
    assert float(exp.maps.max()) <= 1
    assert exp.method == name
    assert_unchanged(model, before)
    assert model.training


@pytest.mark.parametrize("name", CNN_METHODS)
def test_every_method_respects_cancellation(name):
    model = seeded(ConvGapFc())
    x = torch.randn(1, 3, 8, 8)
    before = snapshot(model)
    event = threading.Event()
    event.set()
    method = em.build(name, model, **fast_options(name))
    try:
        with runtime.limits(cancel=event):
            method(x)
    except runtime.RunCancelledError:
        pass  # methods with a loop stop at their first checkpoint
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", em.methods())
def test_factory_errors(name):
    model = seeded(ConvGapFc())
    spec = describe(name)
    with pytest.raises(
        OptionError, match=re.escape(f"method '{spec.name}' takes no option 'no_such'")
    ):
        em.build(name, model, no_such=1)
    if not spec.uses_layer:
        with pytest.raises(ValueError, match="takes no layer"):
            em.build(name, model, "features.0")
    for option in spec.options.values():
        if option.cost and option.cap is not None:
            with pytest.raises(OptionError, match="cap"):
                em.build(name, model, caps={}, **{option.name: int(option.cap) + 1})


def hungry_options(name: str) -> dict[str, object]:
    """Every costly option set to ask for a lot at once: ``work`` ints at 8 (iterations,
    samples, steps), ``chunk`` ints other than ``batch_size`` at 4096 (one chunk for all)."""
    out: dict[str, object] = {}
    for option in describe(name).options.values():
        if option.kind != "int" or (option.default is None and option.cost != "chunk"):
            continue
        if option.cost == "work":
            out[option.name] = 8
        elif option.cost == "chunk" and option.name != "batch_size":
            out[option.name] = 4096
    return out


def test_peak_memory_counts_what_a_block_allocates_by_hand():
    from evidencemap.memory import PeakMemory

    before = torch.zeros(1000)  # not counted: made outside
    with PeakMemory() as meter:
        a = torch.zeros(250)  # 1000 B
        b = torch.zeros(500)  # 2000 B: 3000 B live
        del a  # 2000 B live
        view = b.view(10, 50)  # shares b's storage: nothing more
        c = b + before[:500]  # 2000 B more: 4000 B live
        del b, c, view
    assert meter.peak == 4000
    assert meter.live == 0


MEMORY_BUDGET = 1536 * 1024
"""Bytes per chunk in the memory test. Its batch of eight 32 × 32 inputs does not fit in one
pass of the single-pass methods (un-chunked: Guided Grad-CAM 3.1 MiB, Grad-CAM++ 3.7, FGVis
4.5), nor do the un-chunked loops (Score-CAM's 16 channels 19 MiB, Integrated Gradients' 8 steps
17, SmoothGrad's 8 samples 18); one input of every method does (the most, FGVis, 0.6 MiB)."""


def result_bytes(exp: em.Explanation) -> int:
    """Bytes of every tensor an explanation holds (maps, raw, scores, output, extras…)."""

    def size(value: object) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0

    return size([exp.maps, exp.raw, exp.scores, exp.targets, exp.output, exp.extras])


@pytest.mark.parametrize("name", CNN_METHODS)
def test_every_method_stays_within_the_memory_budget_or_refuses(name):
    from evidencemap.memory import PeakMemory

    model = seeded(ConvGapFc(width=16))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    options = hungry_options(name)
    method = em.build(name, model, **options)
    # The budget bounds each chunk. Besides its chunks a method holds what one pass of the
    # inputs it runs at once takes (the clean forward it reads: one input when the batch is
    # split, the whole batch when it cannot be), measured as Grad-CAM's peak, and the results
    # (the chunks' and their concatenation).
    at_once = x[:1] if method.batch_independent else x
    with PeakMemory() as one_pass:
        em.explain(model, at_once, "gradcam")
    try:
        with runtime.limits(memory_budget=MEMORY_BUDGET), PeakMemory() as meter:
            budgeted = method(x)
    except runtime.BudgetExceededError:
        return  # refusing is allowed; running over the budget is not
    allowed = MEMORY_BUDGET + one_pass.peak + 2 * result_bytes(budgeted)
    assert meter.peak <= allowed, (
        f"{name}: peak {meter.peak / 2**20:.2f} MiB > {allowed / 2**20:.2f}"
    )
    assert budgeted.maps.shape == (8, 1, 32, 32)


def assert_same_explanation(got: em.Explanation, want: em.Explanation, what: str) -> None:
    """Maps, raw, scores, targets and tensor extras equal to float rounding."""
    assert torch.allclose(got.maps, want.maps, rtol=0, atol=1e-5), what
    got_raw = got.raw if isinstance(got.raw, list) else [got.raw]
    want_raw = want.raw if isinstance(want.raw, list) else [want.raw]
    for a, b in zip(got_raw, want_raw, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), what
    assert torch.allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6), what
    assert (got.targets is None) == (want.targets is None), what
    if want.targets is not None:
        assert torch.equal(got.targets, want.targets), what
    assert got.layer == want.layer, what
    assert set(got.extras) == set(want.extras), what
    for key, value in want.extras.items():
        other = got.extras[key]
        if isinstance(value, torch.Tensor) and value.ndim:
            if value.is_floating_point():
                scale = float(value.abs().max()) if value.numel() else 0.0
                assert torch.allclose(other, value, rtol=1e-4, atol=1e-5 * max(scale, 1)), key
            else:
                assert torch.equal(other, value), (what, key)


@pytest.mark.parametrize("name", CNN_METHODS)
def test_every_method_explains_a_batch_in_budget_chunks_as_a_whole(name):
    from evidencemap.memory import PeakMemory
    from evidencemap.methods.chunking import INPUTS_STEP

    model = seeded(ConvGapFc(width=8))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    target = [3, 0, 1, 3]  # per-sample classes go with their inputs
    method = em.build(name, model, **fast_options(name))
    whole = method(x, target)
    with PeakMemory() as one:
        method(x[:1], target[:1])
    starts: list[int] = []

    def report(done: int, total: int, desc: str) -> None:
        if desc == INPUTS_STEP and done < total:
            starts.append(done)

    # room for about two inputs at a time
    with runtime.limits(memory_budget=int(2.5 * one.peak), progress=report):
        chunked = method(x, target)
    if method.batch_independent:
        assert len(starts) >= 2, starts  # split into chunks …
        assert starts[0] == 0
    else:
        assert starts == []  # … unless an input's result depends on its batch (noise)
    assert_same_explanation(chunked, whole, name)


# ----------------------------------------------------------------- a method defined in a test


def test_a_method_defined_in_a_test_file_is_found_everywhere(capsys):
    assert "maxgradcam" in em.methods()
    assert "maxgradcam" in CNN_METHODS  # so the whole invariant suite above runs on it
    spec = em.describe("max-grad-cam")
    assert spec.cls is MaxGradCAM
    assert spec.kind == "layer"
    assert spec.options["scale"].default == 1.0
    assert spec.summary.startswith("Max-gradient CAM")
    status = main(["methods"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    line = next(line for line in lines if line.startswith("maxgradcam "))
    assert "[layer]" in line
    assert "1 layer pass" in line
    assert "max-grad-cam" in line
    assert main(["methods", "maxgradcam"]) == 0
    assert "scale" in capsys.readouterr().out


def test_a_method_defined_in_a_test_file_explains_by_its_formula():
    model = seeded(ConvGapFc())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    exp = em.explain(model, x, "maxgradcam", scale=2.0, target=[1, 2])
    # the formula, computed here: w_k = 2 · max_ij ∂y_c/∂A_k,ij at the last conv block
    acts = model.features(x).detach().requires_grad_(True)
    logits = model.fc(model.pool(acts).flatten(1))
    (grads,) = torch.autograd.grad(logits[[0, 1], [1, 2]].sum(), acts)
    weights = 2.0 * grads.flatten(2).amax(2)
    expected = (weights[:, :, None, None] * acts.detach()).sum(1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(exp.raw, expected)
    assert exp.layer == "features.3"
    assert exp.options == {"output_key": None, "eval_mode": True, "relu": True, "scale": 2.0}


@pytest.mark.parametrize("name", CNN_METHODS)
def test_the_options_report_is_derived_from_the_declared_options(name):
    """Each reported option is one declared with ``reported=True`` (SmoothGrad adds its wrapped
    method's report); batch sizes, memory budgets and progress callbacks are not reported."""
    method = em.build(name, seeded(ConvGapFc()), **fast_options(name))
    report = method.options()
    declared = {o.name for o in reported_options(type(method))}
    assert set(report) - {"method_options"} <= declared
    assert not {"batch_size", "memory_budget", "internal_batch_size", "progress"} & set(report)
    assert {"output_key", "eval_mode"} <= set(report)


# ------------------------------------------------------------------------------ import cycles


def _import_graph() -> dict[str, set[str]]:
    """Every import of the package's modules, read from the source (module-level, inside
    functions and under ``TYPE_CHECKING`` alike): module → the package modules it imports.
    ``from package import submodule`` counts as importing the submodule."""
    import ast
    from pathlib import Path

    root = Path(em.__file__).parent
    modules: dict[str, tuple[Path, bool]] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                subs = [f"{base}.{alias.name}" for alias in node.names]
                found = [s for s in subs if s in modules]
                if len(found) < len(subs):
                    found.append(base)
            else:
                continue
            graph[name] |= {f for f in found if f in modules and f != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_through_the_methods_and_methods_never_import_the_model_zoo():
    graph = _import_graph()
    assert "evidencemap.methods.call" in graph  # the graph is read
    assert "evidencemap.methods.registry" in graph["evidencemap.methods.fgvis.method"]
    through_methods = [
        sorted(c) for c in _cycles(graph) if any(m.startswith("evidencemap.methods") for m in c)
    ]
    assert through_methods == []
    into_models = {
        (a, b)
        for a, imported in graph.items()
        if a.startswith("evidencemap.methods")
        for b in imported
        if b.startswith("evidencemap.models")
    }
    assert into_models == set()


def test_the_methods_package_is_importable_by_dotted_name_and_still_lists_the_methods():
    # ``evidencemap.methods`` is both the subpackage and the listing call: a fresh interpreter
    # imports a module below it by its dotted name, and the call still lists the names.
    code = (
        "import evidencemap as em\n"
        "import evidencemap.methods.fgvis.diagnostics as d\n"
        "from evidencemap import methods\n"
        "from evidencemap.methods import method_names\n"
        "assert d.JUDGE_DRAWS > 0\n"
        "assert em.methods() == methods() == method_names() and 'gradcam' in methods()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
