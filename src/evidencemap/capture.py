"""Hooks for one call: layer outputs, model mode, and per-call nonlinearity interception.

Everything here is a context manager that undoes itself in ``finally``, also when the call
raises, so a model is left exactly as found.

* :func:`record_calls` / :func:`record_outputs` record what modules return (forward hooks,
  calling thread only).
* :func:`eval_mode` switches every module to eval and restores each ``training`` flag.
* :class:`NonlinearityInterceptor` sees every elementwise nonlinearity *call* of a forward pass
  (modules and functional calls alike, in execution order, a reused module once per call) and
  may replace its output, e.g. by an identity whose backward filters the gradient. It is a
  ``TorchFunctionMode`` active only inside its ``with`` block: nothing in torch is patched.
* :class:`AttentionRecorder`, its sibling mode, records the attention probabilities of every
  self-attention call (explicit ``softmax`` over square score matrices and the fused
  ``scaled_dot_product_attention``, whose probabilities it computes explicitly).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "NONLINEARITIES",
    "AttentionRecorder",
    "GradientGate",
    "NonlinearityInterceptor",
    "eval_mode",
    "record_calls",
    "record_outputs",
]


@contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode; restore each module's flag afterwards.

    With ``enabled=False`` the modules keep their modes, and the buffers of those in training
    mode (BatchNorm's running mean, variance and batch count) are copied first and written
    back afterwards, so a forward pass in training mode leaves the model as found too.
    """
    flags = [(m, m.training) for m in model.modules()]
    saved: list[tuple[Tensor, Tensor]] = []
    if not enabled:
        saved = [
            (b, b.detach().clone())
            for m, training in flags
            if training
            for b in m.buffers(recurse=False)
        ]
    try:
        if enabled:
            model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
        if saved:
            with torch.inference_mode(False), torch.no_grad():
                for buffer, copy in saved:
                    buffer.copy_(copy)


@contextmanager
def record_calls(modules: Sequence[nn.Module]) -> Iterator[list[tuple[nn.Module, Tensor]]]:
    """Record ``(module, output)`` for every call of ``modules`` during the block, in order.

    Only calls made by the thread that entered the block are recorded, so concurrent
    explanations on one shared model never see each other's activations. Non-tensor outputs
    are skipped. Hooks are removed in ``finally``.
    """
    calls: list[tuple[nn.Module, Tensor]] = []
    owner = threading.get_ident()

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and threading.get_ident() == owner:
            calls.append((module, output))

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_outputs(modules: Sequence[nn.Module]) -> Iterator[dict[nn.Module, Tensor]]:
    """Record the tensor each of ``modules`` returns (its last call) during the block.

    Yields a dict module → output tensor, complete when the block's forward pass is done.
    Like :func:`record_calls`, it sees only the calling thread's forward passes.
    """
    outputs: dict[nn.Module, Tensor] = {}
    with record_calls(modules) as calls:
        try:
            yield outputs
        finally:
            outputs.update(calls)


class GradientGate(torch.autograd.Function):
    """Identity in the forward pass; the backward multiplies the gradient by a rule's factor.

    ``forward(h, rule) = h``; ``backward(g) = rule(h, g)`` — e.g. the FGVis defence
    ``g · 1[b_l ≤ h ≤ b_u]`` or guided backprop's ``max(g, 0)``.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, rule: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        ctx.rule = rule
        ctx.save_for_backward(h)
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (h,) = ctx.saved_tensors
        return ctx.rule(h, grad), None


# The elementwise nonlinearities the interceptor recognises, by the function torch dispatches:
# the functional API, the torch namespace, Tensor methods and their in-place forms.
_NAMED: dict[str, list[Any]] = {
    "relu": [F.relu, torch.relu, Tensor.relu],
    "relu_": [F.relu_, torch.relu_, Tensor.relu_],
    "relu6": [F.relu6],
    "hardtanh": [F.hardtanh],
    "hardtanh_": [F.hardtanh_],
    "leaky_relu": [F.leaky_relu],
    "leaky_relu_": [F.leaky_relu_],
    "elu": [F.elu],
    "elu_": [F.elu_],
    "selu": [F.selu, torch.selu],
    "celu": [F.celu],
    "gelu": [F.gelu],
    "silu": [F.silu],
    "mish": [F.mish],
    "hardswish": [F.hardswish],
    "hardsigmoid": [F.hardsigmoid],
    "softplus": [F.softplus],
    "tanh": [F.tanh, torch.tanh, Tensor.tanh],
    "tanh_": [torch.tanh_, Tensor.tanh_],
    "sigmoid": [F.sigmoid, torch.sigmoid, Tensor.sigmoid],
    "sigmoid_": [torch.sigmoid_, Tensor.sigmoid_],
}
NONLINEARITIES: dict[Any, str] = {fn: name for name, fns in _NAMED.items() for fn in fns}

# Position of the ``inplace`` argument of the functional forms that have one.
_INPLACE_ARG = {
    "relu": 1,
    "relu6": 1,
    "hardtanh": 3,
    "leaky_relu": 2,
    "elu": 2,
    "celu": 2,
    "selu": 1,
    "silu": 1,
    "mish": 1,
    "hardswish": 1,
    "hardsigmoid": 1,
}

# In-place forms are run out of place so the recorded output is a fresh tensor.
_OUT_OF_PLACE: dict[str, Callable[..., Tensor]] = {
    "relu_": torch.relu,
    "hardtanh_": F.hardtanh,
    "leaky_relu_": F.leaky_relu,
    "elu_": F.elu,
    "tanh_": torch.tanh,
    "sigmoid_": torch.sigmoid,
}

Rule = Callable[[int, str, Tensor], Tensor]


class NonlinearityInterceptor(TorchFunctionMode):
    """Calls ``rule(index, name, output)`` after every nonlinearity call inside the block.

    ``index`` counts the calls of one forward pass in execution order (call :meth:`reset` or
    enter the block again before the next pass); ``name`` is the nonlinearity (``"relu"``,
    ``"gelu"``, …); the rule returns the tensor the model continues with (the output itself to
    only observe it). In-place forms (``ReLU(inplace=True)``, ``ReLU6``) are computed out of
    place, so the forward values are identical and no user tensor is modified.

    A rule may also have a method ``replace(index, name, input) -> Tensor | None``, asked
    *before* the call runs with the nonlinearity's input ``z``: a tensor it returns is the
    call's output (the rule computed ``h = name(z)`` itself, e.g. fused with a gradient gate
    into one autograd node) and ``rule(index, name, ·)`` is not called for that call; ``None``
    lets the call run as usual. The returned tensor must equal ``name(z)`` exactly.

    Limitations: TorchScript modules and compiled graphs do not dispatch through Python, so
    their nonlinearities are not seen.
    """

    def __init__(self, rule: Rule) -> None:
        super().__init__()
        self.rule = rule
        self.replace: Callable[[int, str, Tensor], Tensor | None] | None = getattr(
            rule, "replace", None
        )
        self.count = 0

    def reset(self) -> None:
        """Start counting calls from zero (a new forward pass)."""
        self.count = 0

    def __enter__(self) -> NonlinearityInterceptor:
        self.reset()
        return super().__enter__()

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = NONLINEARITIES.get(func)
        if name is None:
            return func(*args, **kwargs)
        if name in _OUT_OF_PLACE:
            func = _OUT_OF_PLACE[name]
            name = name[:-1]
        if "inplace" in kwargs:
            kwargs["inplace"] = False
        pos = _INPLACE_ARG.get(name)
        if pos is not None and len(args) > pos:
            args = (*args[:pos], False, *args[pos + 1 :])
        if name == "hardtanh" and _bounds_of_hardtanh(args, kwargs) == (0.0, 6.0):
            name = "relu6"  # nn.ReLU6 dispatches to F.hardtanh(x, 0, 6)
        if self.replace is not None:
            z = args[0] if args else kwargs.get("input")
            if isinstance(z, Tensor):
                replaced = self.replace(self.count, name, z)
                if replaced is not None:
                    self.count += 1
                    return replaced
        output = func(*args, **kwargs)
        if not isinstance(output, Tensor):
            return output
        index = self.count
        self.count += 1
        return self.rule(index, name, output)


def _bounds_of_hardtanh(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, float]:
    """``(min_val, max_val)`` of an ``F.hardtanh`` call (its defaults are ``(-1, 1)``)."""
    low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
    high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
    return float(low), float(high)


_SOFTMAX = {F.softmax, torch.softmax, Tensor.softmax}


class AttentionRecorder(TorchFunctionMode):
    """Records the self-attention probabilities of every attention call inside the block.

    ``tensors`` holds, per call in execution order, the probability tensor the forward pass
    continues with (so ``∂y/∂A`` is available through ``torch.autograd.grad`` when grad mode is
    on), of shape ``(N, heads, T, T)`` or ``(N·heads, T, T)``; :meth:`as_heads` unfolds either
    (or its gradient) to ``(N, heads, T, T)``: rows are queries, columns keys, each row sums to 1.

    * ``softmax(s, dim=-1)`` over a square score tensor (hand-written attention blocks).
    * ``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)`` with
      ``T_q = T_k`` is computed explicitly, ``A = softmax(q kᵀ · scale + mask)``, ``out = A v``
      (``scale`` defaults to ``1/√d``; a boolean mask keeps ``True`` positions; ``is_causal``
      masks the upper triangle; dropout as the call asks) — the fused kernel's output, up to
      rounding.
    * ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) is run on its explicit path
      (``need_weights=True``, per head) and the probabilities it multiplies ``v`` with are
      recorded; it returns what the call asked for.

    ``nn.MultiheadAttention``'s fused inference fast path bypasses Python: run the forward with
    grad mode on and an input that requires grad so the module takes the path above.

    Args:
        batch: the batch size ``N`` of the forward pass (to unfold ``(N·h, T, T)``).
    """

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = int(batch)
        self.tensors: list[Tensor] = []

    def __enter__(self) -> AttentionRecorder:
        self.tensors = []
        return super().__enter__()

    def as_heads(self, t: Tensor) -> Tensor:
        """``(N·h, T, T)`` or ``(N, h, T, T)`` → ``(N, h, T, T)``."""
        return t.view(self.batch, -1, *t.shape[-2:])

    @property
    def maps(self) -> list[Tensor]:
        """The recorded probabilities as ``(N, heads, T, T)``."""
        return [self.as_heads(t) for t in self.tensors]

    def _record(self, probs: Tensor) -> None:
        if (probs.ndim == 3 and probs.shape[0] % self.batch == 0) or (
            probs.ndim == 4 and probs.shape[0] == self.batch
        ):
            self.tensors.append(probs)

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._multi_head(func, args, kwargs)
        output = func(*args, **kwargs)
        if func in _SOFTMAX and isinstance(output, Tensor) and output.ndim in (3, 4):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            square = output.shape[-1] == output.shape[-2]
            if square and dim in (-1, output.ndim - 1):
                self._record(output)
        return output

    def _multi_head(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        query, key = args[0], args[1]
        if query.shape[0] != key.shape[0]:  # cross-attention
            return func(*args, **kwargs)
        names = ("need_weights", "average_attn_weights")
        asked = {n: kwargs.pop(n, True) for n in names}
        output, weights = func(*args, **kwargs, need_weights=True, average_attn_weights=False)
        base = weights._base if weights._base is not None else weights
        self._record(base)
        if not asked["need_weights"]:
            return output, None
        return output, weights.mean(dim=-3) if asked["average_attn_weights"] else weights

    def _attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        if query.shape[-2] != key.shape[-2]:  # cross-attention: not a self-attention map
            return F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(repeat, dim=-3)
            value = value.repeat_interleave(repeat, dim=-3)
        factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = query @ key.transpose(-2, -1) * factor
        t = scores.shape[-1]
        if is_causal:
            keep = torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        probs = torch.softmax(scores, dim=-1)
        self._record(probs if probs.ndim >= 3 else probs.unsqueeze(0))
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return probs @ value
