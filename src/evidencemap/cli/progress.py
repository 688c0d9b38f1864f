"""Progress of the methods' long loops on the terminal (tqdm bars on standard error).

The library reports progress through :func:`evidencemap.runtime.checkpoint`
(``done, total, desc``: FGVis iterations, Score-CAM channel chunks, Integrated Gradients path
chunks, SmoothGrad noise chunks); :func:`method_progress` shows one bar per step name while
the block runs. Bars appear only on a terminal (tqdm's automatic choice) unless ``enabled``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from evidencemap import runtime

__all__ = ["method_progress"]


@contextmanager
def method_progress(enabled: bool | None = None) -> Iterator[None]:
    """Show the methods' progress during the block (``None``: only on a terminal)."""
    bars: dict[str, tqdm] = {}

    def report(done: int, total: int, desc: str) -> None:
        bar = bars.get(desc)
        if bar is None or done < bar.n:  # a new run of that step
            if bar is not None:
                bar.close()
            bar = tqdm(
                total=total,
                desc=desc or "explain",
                unit="step",
                leave=False,
                disable=None if enabled is None else not enabled,
                file=sys.stderr,
            )
            bars[desc] = bar
        bar.total = total
        bar.update(done - bar.n)

    try:
        with runtime.limits(progress=report):
            yield
    finally:
        for bar in bars.values():
            bar.close()
