"""Which layer to explain: a module, a dotted name, a list of them, or found automatically."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from evidencemap.capture import record_calls
from evidencemap.tokens import GridLayout, Tokens, resolve_layout

__all__ = ["LayerList", "LayerSpec", "find_spatial_layer", "layer_names", "resolve_layers"]

LayerSpec = None | str | nn.Module | Tokens | Sequence[str | nn.Module | Tokens]


class LayerList(list[nn.Module]):
    """The resolved layers, with the :class:`~evidencemap.tokens.Tokens` layout named for any of
    them in ``layouts`` (module → spec; the others are detected)."""

    def __init__(self, modules: Sequence[nn.Module], layouts: dict[nn.Module, Tokens]) -> None:
        super().__init__(modules)
        self.layouts = layouts


def layer_names(model: nn.Module) -> dict[nn.Module, str]:
    """Module → dotted name (the model itself is ``""``)."""
    return {module: name for name, module in model.named_modules()}


def _one(
    model: nn.Module, layer: str | nn.Module | Tokens, names: dict[nn.Module, str]
) -> nn.Module:
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError:
            raise ValueError(
                f"layer {layer!r} not found in the model; some layers: "
                f"{[n for n in names.values() if n][-8:]}"
            ) from None
    if isinstance(layer, Tokens):
        return _one(model, layer.layer, names)
    if isinstance(layer, nn.Module):
        if layer not in names:
            raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
        return layer
    raise TypeError(
        "layer must be a module, a dotted name, a Tokens(layer, ...) or a list of them, got "
        f"{type(layer).__name__}"
    )


def resolve_layers(model: nn.Module, layer: LayerSpec) -> LayerList:
    """The modules named by ``layer`` (``None`` → ``[]``: find it automatically), with the
    token layouts named through :class:`~evidencemap.tokens.Tokens`.

    Raises:
        TypeError: for a layer that is neither a module nor a name.
        ValueError: for a name or module not in ``model``, or an empty list.
    """
    if layer is None:
        return LayerList([], {})
    names = layer_names(model)
    items = [layer] if isinstance(layer, (str, nn.Module, Tokens)) else list(layer)
    layers = [_one(model, item, names) for item in items]
    if not layers:
        raise ValueError("layer must not be an empty list")
    layouts = {m: item for m, item in zip(layers, items, strict=True) if isinstance(item, Tokens)}
    return LayerList(layers, layouts)


def is_spatial(output: Tensor, input_ndim: int) -> bool:
    """An output with the inputs' rank and at least one spatial axis longer than 1."""
    return output.ndim == input_ndim and any(s > 1 for s in output.shape[2:])


def find_spatial_layer(
    model: nn.Module,
    input_ndim: int,
    forward: Callable[[], object],
    input_shape: tuple[int, ...] | None = None,
    grad_forward: Callable[[], object] | None = None,
) -> tuple[nn.Module, Tensor]:
    """The last leaf module (in execution order) whose output has spatial axes.

    Runs ``forward()`` once with hooks on every leaf module and returns the module and the
    output it produced during that pass.

    With ``input_shape`` given, token sequences ``(N, T, C)`` and channels-last grids count as
    spatial too (:func:`evidencemap.tokens.resolve_layout`). When the last spatial output is such
    a token layer, the chosen one is the last token layer of the model's width (the most common
    channel count among token layers, so attention's ``qkv`` and the MLP's hidden layer are
    passed over) whose grid tokens carry gradient to the output ``y``: ``∂(Σ y²)/∂t`` is taken
    once, on the graph of ``forward()``'s return value, or of ``grad_forward()``'s (run once more
    with an autograd graph) when that has none. In a ViT whose head
    reads the CLS token only, the last block's output tokens get no gradient; its ``norm1``
    output (the attention's input) does.

    Raises:
        ValueError: when no module produces a spatial output (e.g. an MLP).
    """
    leaves = [m for m in model.modules() if next(m.children(), None) is None and m is not model]
    with record_calls(leaves) as calls:
        output = forward()
    if input_shape is None:
        for module, out in reversed(calls):
            if isinstance(out, Tensor) and is_spatial(out, input_ndim):
                return module, out
    else:
        layouts = _layouts(calls, input_shape)
        if layouts and layouts[-1][2].kind == "channels_first":
            return layouts[-1][0], layouts[-1][1]
        if layouts and grad_forward is not None and not _has_graph(output):
            with record_calls(leaves) as calls:
                output = grad_forward()
            layouts = _layouts(calls, input_shape)
        if layouts:
            return _gradient_token_layer(layouts, output)
    raise ValueError(
        "the model has no layer with a spatial output (N, C, *spatial) matching the inputs; "
        "pass layer= explicitly or use a method that works in input space"
    )


def _has_graph(output: object) -> bool:
    return isinstance(output, Tensor) and output.requires_grad


def _layouts(
    calls: list[tuple[nn.Module, Tensor]], input_shape: tuple[int, ...]
) -> list[tuple[nn.Module, Tensor, GridLayout]]:
    """The recorded outputs that are grids (any layout), with their layouts."""
    found = []
    for module, out in calls:
        layout = resolve_layout(tuple(out.shape), input_shape)
        if layout is not None and any(g > 1 for g in layout.grid):
            found.append((module, out, layout))
    return found


def _gradient_token_layer(
    layouts: list[tuple[nn.Module, Tensor, GridLayout]], output: object
) -> tuple[nn.Module, Tensor]:
    """The last token layer of the model's width whose grid tokens get gradient from ``output``."""
    tokens = [item for item in layouts if item[2].kind != "channels_first"]
    width = Counter(out.shape[-1] for _m, out, _l in tokens).most_common(1)[0][0]
    wide = [item for item in tokens if item[1].shape[-1] == width]
    usable = [item for item in wide if item[1].requires_grad]
    if not _has_graph(output) or not usable:
        return wide[-1][0], wide[-1][1]
    with torch.enable_grad():  # the caller may run without gradients (a forward-only method)
        grads = torch.autograd.grad(
            cast(Tensor, output).float().pow(2).sum(),
            [out for _m, out, _l in usable],
            allow_unused=True,
            retain_graph=True,
        )
    for (module, out, layout), grad in reversed(list(zip(usable, grads, strict=True))):
        if grad is None:
            continue
        grid_part = grad[:, layout.prefix :] if layout.kind == "tokens" else grad
        if bool(grid_part.abs().amax() > 0):
            return module, out
    return wide[-1][0], wide[-1][1]
