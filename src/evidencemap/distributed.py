"""``evidencemap batch`` on a Ray cluster: the same outputs as the local run, on many machines.

Two pieces:

* :class:`Explainer`, a callable class for ``ray.data.Dataset.map_batches``: each actor builds
  the model and the method once, from a :class:`BatchSpec` (the model spec string and the
  options, never a pickled model), and then explains the photo or volume paths of every batch
  it is given with the local engine's own code (:func:`evidencemap.engine.run_inputs`),
  writing the same overlay PNG, ``.npz`` and manifest per input. Drop it into your own pipeline::

      import ray
      from ray.data import ActorPoolStrategy
      from evidencemap.distributed import BatchSpec, Explainer

      spec = BatchSpec(model="efficientnet-lite0", method="gradcam", batch_size=16)
      rows = ray.data.from_items([{"path": p} for p in paths_on_shared_storage])
      results = rows.map_batches(
          Explainer,
          fn_constructor_kwargs={"spec": spec, "out": "/shared/maps", "root": "/shared/photos"},
          batch_size=16,
          compute=ActorPoolStrategy(size=8),
          num_cpus=1,  # or num_gpus=0.5 with BatchSpec(device="cuda")
      )
      for row in results.iter_rows():  # path, status, message, manifest, label, probability
          ...

* :func:`run_on_ray`, what ``evidencemap batch --engine ray`` runs: it cuts the inputs into the
  very batches the local engine would make, one Ray block each, so that every map equals the
  local engine's bit for bit and every manifest field for field (except the documented
  ``seconds``, ``batch.seconds`` and ``engine``; see ``docs/distributed.md``).

Ray is an optional dependency (``pip install 'evidencemap[ray]'``): it is imported only by
:func:`import_ray` and what calls it, never by ``import evidencemap`` or by the command line
unless ``--engine ray`` is asked for. :class:`Explainer` itself needs no Ray and can be called
on a batch directly.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from evidencemap.engine import (
    Failure,
    Result,
    Settings,
    make_settings,
    output_bases,
    resolve_device,
    run_inputs,
)
from evidencemap.models.loading import LoadedModel, load_model

__all__ = [
    "RAY_MISSING",
    "BatchSpec",
    "Explainer",
    "PoolPlan",
    "import_ray",
    "plan_pool",
    "run_on_ray",
]

RAY_MISSING = "the ray engine needs Ray: pip install 'evidencemap[ray]'"
"""The one-line message given when Ray is not installed."""

_COLUMNS = ("path", "status", "message", "manifest", "label", "probability")


def import_ray() -> ModuleType:
    """The ``ray`` module with Ray Data.

    Raises:
        ImportError: with :data:`RAY_MISSING` when Ray or Ray Data is not installed.
    """
    try:
        import ray
        import ray.data  # the [data] part of the extra
    except ImportError as err:
        raise ImportError(RAY_MISSING) from err
    return ray


@dataclass(frozen=True)
class BatchSpec:
    """What every actor builds and how it explains: the ``evidencemap batch`` options as data,
    from which each actor builds the engine's :class:`~evidencemap.engine.Settings`
    (:meth:`settings`).

    The model is named by its spec string (:func:`evidencemap.models.loading.load_model`: a
    built-in name, a model file, ``package.module:factory``…), so each actor loads it itself; a
    relative file or module is found from ``workdir``.

    Attributes:
        model: the ``--model`` spec.
        method: a registered method name (``evidencemap methods``).
        target: what to explain (:func:`evidencemap.engine.parse_target`: a class index or an
            exact label, ``norm``, ``package.module:function``); ``None``: the top class (the
            norm for embedding models).
        top_k: explain each of the K top classes instead (exclusive with ``target``).
        layer: layer name(s) for layer methods, comma-separated.
        options: method options (``--option KEY=VALUE``).
        game: FGVis's ``preserve`` or ``delete`` game.
        cmap / opacity: the picture's colormap (``None``: by the map's sign, as
            :func:`evidencemap.viz.figure` chooses) and heat opacity.
        dpi / figsize / format / bare: the picture's resolution, size in inches, format
            (png, pdf, svg; bare maps png or tiff) and whether it is the bare map
            (:class:`evidencemap.engine.Settings`).
        batch_size: inputs per call of the method.
        device: ``cpu``, ``cuda`` (an actor with ``num_gpus`` sees its own GPUs as ``cuda``),
            ``cuda:N`` or ``mps`` (:func:`evidencemap.engine.resolve_device`).
        threads: torch CPU threads per actor (``None``: torch's default in the actor, which
            Ray sets from the actor's ``num_cpus``).
        labels / input_size / resize / mean / std / window: user model preprocessing, as on the
            command line.
        frame: volumes: the frame of 4-D files to explain.
        workdir: the folder relative paths (inputs, model files, import strings) are read from;
            the actor changes into it. ``None``: the actor's own working folder.
    """

    model: str = "efficientnet-lite0"
    method: str = "gradcam"
    target: str | int | None = None
    top_k: int | None = None
    layer: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    game: str | None = None
    cmap: str | None = None
    opacity: float = 0.5
    dpi: float = 100.0
    figsize: tuple[float, float] | None = None
    format: str = "png"
    bare: bool = False
    batch_size: int = 16
    device: str = "cpu"
    threads: int | None = None
    labels: str | None = None
    input_size: tuple[int, ...] | None = None
    resize: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None
    frame: int | None = None
    workdir: str | None = None

    def __post_init__(self) -> None:
        from evidencemap.methods import get_method

        if not isinstance(self.model, str) or not self.model:
            raise TypeError(f"model must be a model spec string, got {self.model!r}")
        object.__setattr__(self, "method", get_method(self.method).name)
        if self.frame is not None and (not isinstance(self.frame, int) or self.frame < 0):
            raise ValueError(f"frame must be an index >= 0, got {self.frame!r}")
        for name in ("batch_size", "top_k", "threads", "resize"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.target is not None and self.top_k is not None:
            raise ValueError("target and top_k exclude each other")
        if not isinstance(self.options, Mapping):
            raise TypeError(f"options must be a mapping, got {type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options))

    def load(self) -> LoadedModel:
        """The model on this spec's device, with its preprocessing (``threads`` applied).

        Raises:
            ValueError: for a device that is not available or a model that cannot be loaded.
        """
        device = resolve_device(self.device)
        if self.threads:
            torch.set_num_threads(self.threads)
        size = self.input_size
        try:
            return load_model(
                self.model,
                device,
                input_size=None if size is None else (size[0] if len(size) == 1 else size),
                resize=self.resize,
                mean=self.mean,
                std=self.std,
                labels=self.labels,
            )
        except (TypeError, FileNotFoundError) as err:
            raise ValueError(str(err)) from err

    def settings(self, loaded: LoadedModel, engine: str = "ray") -> Settings:
        """The engine's settings for ``loaded`` (:func:`evidencemap.engine.make_settings`).

        Raises:
            ValueError / TypeError: for a target, option, layer or colour map the model or the
                method refuses.
        """
        return make_settings(
            loaded,
            self.method,
            target=self.target,
            top_k=self.top_k,
            layer=self.layer,
            options=self.options,
            game=self.game,
            cmap=self.cmap,
            opacity=self.opacity,
            dpi=self.dpi,
            figsize=self.figsize,
            format=self.format,
            bare=self.bare,
            window=self.window,
            frame=self.frame,
            batch_size=self.batch_size,
            engine=engine,
        )


class Explainer:
    """A Ray Data actor class: explains the paths of each batch and writes their files.

    ``map_batches(Explainer, fn_constructor_kwargs={"spec": spec, ...})``: the model and the
    method are built once per actor in ``__init__`` from ``spec``; each call then explains the
    batch's inputs ``spec.batch_size`` at a time with the local engine's code and returns one
    row per input.

    Args:
        spec: the model, method and options.
        out: output folder for batches without a ``base`` column: an input ``root/REL/NAME.ext``
            gets ``out/REL/NAME_METHOD.*`` (``root`` given) or ``out/NAME_METHOD.*``.
        root: the input folder the outputs mirror (with ``out``).
        engine: the name written into each manifest's ``engine`` field.

    Raises:
        ValueError / TypeError: for a spec the command line would refuse (the message says why).
    """

    def __init__(
        self,
        spec: BatchSpec,
        out: str | os.PathLike[str] | None = None,
        root: str | os.PathLike[str] | None = None,
        engine: str = "ray",
    ) -> None:
        if not isinstance(spec, BatchSpec):
            raise TypeError(f"spec must be a BatchSpec, got {type(spec).__name__}")
        if spec.workdir is not None and os.path.realpath(spec.workdir) != os.path.realpath(
            os.getcwd()
        ):
            if not os.path.isdir(spec.workdir):
                raise ValueError(
                    f"workdir {spec.workdir} is not a folder on this node "
                    "(inputs and outputs must be on storage every node sees)"
                )
            os.chdir(spec.workdir)
        self.spec = spec
        self.out = None if out is None else Path(out)
        self.root = None if root is None else Path(root)
        self.loaded = spec.load()
        self.settings: Settings = spec.settings(self.loaded, engine)

    def _bases(self, paths: list[Path], batch: Mapping[str, Any]) -> list[Path]:
        if "base" in batch:
            return [Path(str(b)) for b in batch["base"]]
        if self.out is None:
            raise ValueError("a batch without a 'base' column needs Explainer(out=...)")
        return output_bases(paths, self.out, root=self.root)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Explain ``batch["path"]`` (optional ``batch["base"]``: output paths without the
        ``_METHOD.ext`` ending) and return the columns ``path``, ``status`` (``done`` or
        ``failed``), ``message`` (why it failed), ``manifest``, ``label``, ``probability``
        (the top class; ``""`` and NaN when failed or not a classifier), one row per input.

        Raises:
            ValueError: for a batch without a ``path`` column.
        """
        if "path" not in batch:
            raise ValueError(f"the batch needs a 'path' column, got {sorted(batch)}")
        paths = [Path(str(p)) for p in batch["path"]]
        bases = self._bases(paths, batch)
        rows: dict[Path, tuple[str, str, str, str, float]] = {}

        def done(result: Result) -> None:
            top = result.predicted or {}
            probability = top.get("probability")
            rows[result.item.path] = (
                "done",
                "",
                str(result.manifest),
                str(top.get("label", "")),
                math.nan if probability is None else float(probability),
            )

        def failed(failure: Failure) -> None:
            rows[failure.path] = ("failed", failure.message, "", "", math.nan)

        run_inputs(paths, bases, self.loaded, self.settings, self.spec.batch_size, done, failed)
        table = [rows[p] for p in paths]
        columns: dict[str, np.ndarray] = {"path": np.array([str(p) for p in paths], dtype=object)}
        for j, name in enumerate(_COLUMNS[1:]):
            kind = np.float64 if name == "probability" else object
            columns[name] = np.array([row[j] for row in table], dtype=kind)
        return columns


@dataclass(frozen=True)
class PoolPlan:
    """How many actors and what each one asks the cluster for."""

    actors: int
    cpus: float
    gpus: float

    def describe(self) -> str:
        """``2 actors × 1 CPU`` (``+ 0.5 GPU``)."""
        gpu = f" + {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.actors} actor{'s' if self.actors != 1 else ''} × {self.cpus:g} CPU{gpu}"


def plan_pool(
    resources: Mapping[str, float],
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
) -> PoolPlan:
    """Size the actor pool from the cluster's ``resources`` (``ray.cluster_resources()``).

    Without ``actors``: as many as fit, by GPUs when ``gpus_per_actor > 0`` else by CPUs. A pool
    that cannot be placed at once is refused, because Ray would wait for it forever.

    Raises:
        ValueError: for non-positive sizes or a pool larger than the cluster.
    """
    if cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise ValueError(
            f"cpus_per_actor must be > 0 and gpus_per_actor >= 0, got {cpus_per_actor}, "
            f"{gpus_per_actor}"
        )
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if gpus_per_actor > 0 and gpus < gpus_per_actor:
        raise ValueError(f"{gpus_per_actor:g} GPU per actor, but the cluster has {gpus:g} GPUs")
    fit = math.floor(cpus / cpus_per_actor + 1e-9)
    if gpus_per_actor > 0:
        fit = min(fit, math.floor(gpus / gpus_per_actor + 1e-9))
    if actors is None:
        actors = fit
    elif not isinstance(actors, int) or actors < 1:
        raise ValueError(f"actors must be a positive integer, got {actors!r}")
    if actors < 1 or actors > fit:
        gpu = f" and {gpus:g} GPUs" if gpus_per_actor > 0 else ""
        raise ValueError(
            f"{actors} actor(s) × {cpus_per_actor:g} CPU"
            + (f" + {gpus_per_actor:g} GPU" if gpus_per_actor else "")
            + f" do not fit the cluster's {cpus:g} CPUs{gpu}: at most {fit}; "
            "lower the actors or the CPUs per actor"
        )
    return PoolPlan(actors, cpus_per_actor, gpus_per_actor)


def _quiet_ray_data(ray: ModuleType) -> None:
    """No Ray Data progress bars or execution banners: the caller shows its own progress."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # only the notice that the bars are off, which they are on purpose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _last_line(err: BaseException) -> str:
    """The last non-empty line of an error's text (Ray's hold the remote traceback first)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def run_on_ray(
    paths: Sequence[Path],
    bases: Sequence[Path],
    spec: BatchSpec,
    on_done: Callable[[str], None],
    on_failure: Callable[[Failure], None],
    *,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    init_options: Mapping[str, Any] | None = None,
) -> PoolPlan:
    """Explain ``paths`` on a Ray cluster in the local engine's batches; report each input.

    The inputs are cut into ``spec.batch_size`` consecutive inputs exactly as the local engine
    cuts them; each cut is one Ray block and one call of an :class:`Explainer` actor, so the
    batches the method sees are the same. Results stream back as they finish: ``on_done(path)``
    or ``on_failure(Failure)`` per input.

    Connects to Ray when it is not running yet (``address``: ``None`` starts a local cluster,
    ``"auto"`` joins the one on this machine, ``ray://host:10001`` a remote one;
    ``init_options`` go to ``ray.init``) and disconnects at the end; a session the caller
    already started is used and left running. Ray Data's own progress bars and execution
    banners are turned off in the current ``DataContext`` (the callbacks report progress).

    Returns:
        The actor pool used (never more actors than batches).

    Raises:
        ImportError: without Ray (:data:`RAY_MISSING`).
        ValueError: for a pool that does not fit the cluster.
        RuntimeError: when the job stops on the cluster (an actor cannot build the model from
            ``spec`` on its node, a node is lost): the last line of Ray's error.
    """
    ray = import_ray()
    import pyarrow as pa
    from ray.data import ActorPoolStrategy

    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            **(init_options or {}),
        }
        ray.init(address=address, **options)
    try:
        _quiet_ray_data(ray)
        pool = plan_pool(ray.cluster_resources(), actors, cpus_per_actor, gpus_per_actor)
        if not paths:
            return pool
        size = spec.batch_size
        blocks: list[Any] = [
            pa.table(
                {
                    "path": [str(p) for p in paths[i : i + size]],
                    "base": [str(b) for b in bases[i : i + size]],
                }
            )
            for i in range(0, len(paths), size)
        ]
        if len(blocks) < pool.actors:  # an actor without a batch would only start and stop
            pool = PoolPlan(len(blocks), pool.cpus, pool.gpus)
        # from_blocks keeps the blocks as given (from_arrow may not) and reads their metadata
        # here, without a task per block
        results = ray.data.from_blocks(blocks).map_batches(
            Explainer,
            fn_constructor_kwargs={"spec": spec},
            batch_size=size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus,
            num_gpus=pool.gpus or None,
        )
        try:
            for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
                for path, status, message in zip(
                    batch["path"], batch["status"], batch["message"], strict=True
                ):
                    if status == "done":
                        on_done(str(path))
                    else:
                        on_failure(Failure(Path(str(path)), str(message)))
        except ray.exceptions.RayError as err:  # an actor that could not start, a lost node…
            raise RuntimeError(f"the Ray job stopped: {_last_line(err)}") from err
        return pool
    finally:
        if started:
            ray.shutdown()
