"""How much tensor memory a piece of code takes at its peak, measured as it runs.

:class:`PeakMemory` is a ``TorchDispatchMode``: every tensor an operation returns inside the
block is counted once per storage (its ``nbytes``) until that storage is freed, on every
device, so ``peak`` is the most memory the block's own tensors held at once — not the tensors
that existed before it (the model's parameters, the inputs). The chunked methods measure their
first item with it when a memory budget applies (:func:`evidencemap.runtime.chunk_items`), so
that chunks are sized by what an item really costs (activations and gradients included), not
by its input alone.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory"]


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: …`` — ``m.peak``: the most bytes of tensor storage allocated
    inside the block alive at once; ``m.live``: those still alive.

    Storages are told apart by identity; a storage counts from the operation that returned it
    until it is freed. Results that live in one of the operation's inputs' storages (views,
    in-place and ``out=`` operations) are no new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # views, in-place and out= results live in an input's storage: no new memory
        inputs = {
            id(t.untyped_storage())
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for item in tree_flatten(out)[0]:
            if not isinstance(item, torch.Tensor):
                continue
            storage = item.untyped_storage()
            if id(storage) in inputs or storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            self.live += nbytes
            weakref.finalize(storage, self._freed, nbytes)
        self.peak = max(self.peak, self.live)
        return out
