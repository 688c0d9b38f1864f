"""Which layer to explain: a module, a dotted name, a list of them, or found automatically."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from evidencemap.capture import record_calls

__all__ = ["LayerSpec", "find_spatial_layer", "layer_names", "resolve_layers"]

LayerSpec = None | str | nn.Module | Sequence[str | nn.Module]


def layer_names(model: nn.Module) -> dict[nn.Module, str]:
    """Module → dotted name (the model itself is ``""``)."""
    return {module: name for name, module in model.named_modules()}


def _one(model: nn.Module, layer: str | nn.Module, names: dict[nn.Module, str]) -> nn.Module:
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError:
            raise ValueError(
                f"layer {layer!r} not found in the model; some layers: "
                f"{[n for n in names.values() if n][-8:]}"
            ) from None
    if isinstance(layer, nn.Module):
        if layer not in names:
            raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
        return layer
    raise TypeError(
        f"layer must be a module, a dotted name or a list of them, got {type(layer).__name__}"
    )


def resolve_layers(model: nn.Module, layer: LayerSpec) -> list[nn.Module]:
    """The modules named by ``layer`` (``None`` → ``[]``: find it automatically).

    Raises:
        TypeError: for a layer that is neither a module nor a name.
        ValueError: for a name or module not in ``model``, or an empty list.
    """
    if layer is None:
        return []
    names = layer_names(model)
    if isinstance(layer, (str, nn.Module)):
        return [_one(model, layer, names)]
    layers = [_one(model, item, names) for item in layer]
    if not layers:
        raise ValueError("layer must not be an empty list")
    return layers


def is_spatial(output: Tensor, input_ndim: int) -> bool:
    """An output with the inputs' rank and at least one spatial axis longer than 1."""
    return output.ndim == input_ndim and any(s > 1 for s in output.shape[2:])


def find_spatial_layer(
    model: nn.Module, input_ndim: int, forward: Callable[[], object]
) -> tuple[nn.Module, Tensor]:
    """The last leaf module (in execution order) whose output has spatial axes.

    Runs ``forward()`` once with hooks on every leaf module and returns the module and the
    output it produced during that pass.

    Raises:
        ValueError: when no module produces a spatial output (e.g. an MLP).
    """
    leaves = [m for m in model.modules() if next(m.children(), None) is None and m is not model]
    with record_calls(leaves) as calls:
        forward()
    for module, out in reversed(calls):
        if isinstance(out, Tensor) and is_spatial(out, input_ndim):
            return module, out
    raise ValueError(
        "the model has no layer with a spatial output (N, C, *spatial) matching the inputs; "
        "pass layer= explicitly or use a method that works in input space"
    )
