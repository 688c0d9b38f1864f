"""The metric contract and registry: what :func:`evidencemap.evaluation.evaluate` runs.

A metric is one :class:`~evidencemap.metrics.common.Metric` subclass with the decorator
:func:`register_metric`. Besides its library API (its own ``__call__``), it declares

* ``name``, ``titles`` and ``directions``: its columns in the tables, in order, and whether
  higher is better for each;
* ``needs``: what the evaluation must hand it — ``"maps"`` (the method's maps of the image),
  ``"explainer"`` (the method itself, to call again) and ``"boxes"`` (ground truth; a metric
  that needs boxes runs only on images that have them, and is left out of the default list
  when none are given);
* ``OPTIONS``: its parameters as :class:`~evidencemap.methods.options.Option` (the description
  type of the methods' options), checked by the constructor and by
  ``evaluate(metric_options=…)``;
* ``EVALUATION`` / ``QUICK``: the values the evaluation protocol gives those options
  (``EVALUATION`` over the constructor's defaults, ``QUICK`` on top in quick mode);
* ``score(context) -> MetricRecord``: the columns (and curves) of one (method, image) pair,
  from a :class:`MetricContext`.

``metric_names()``, ``get_metric(name)`` and ``describe_metric(name)`` read the registry, as
``method_names()`` / ``get_method()`` / ``describe()`` do for the methods.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from evidencemap.methods.options import Option, OptionError, options_of

if TYPE_CHECKING:
    from evidencemap.explanation import Explanation

__all__ = [
    "METRIC_REGISTRY",
    "NEEDS",
    "Explainer",
    "Metric",
    "MetricContext",
    "MetricRecord",
    "MetricSpec",
    "describe_metric",
    "get_metric",
    "metric_names",
    "metric_settings",
    "register_metric",
    "unregister_metric",
]

NEEDS = frozenset({"maps", "explainer", "boxes"})
"""What a metric may need from the evaluation (``Metric.needs``)."""

METRIC_REGISTRY: dict[str, type[Metric]] = {}
"""Registered metric name → class, in registration (table) order."""

M = TypeVar("M", bound="type[Metric]")

Explainer = Callable[[Tensor, Any], "Tensor | Explanation"]
"""``explainer(inputs, target) -> maps or Explanation``, e.g. ``GradCAM(model)``."""


@dataclass
class MetricContext:
    """Everything one metric may read for one (method, image) pair.

    Attributes:
        model: the classifier.
        inputs: ``(1, C, *S)`` the normalised image.
        maps: ``(1, 1, *S)`` the method's map of ``target`` on ``inputs``.
        target: ``(1,)`` the class explained (the image's top-1), or ``None`` when the method
            returned bare maps.
        explainer: the method, ``explainer(inputs, target) -> maps or Explanation``.
        boxes: the image's ground truth, class → boxes ``[[x0, y0, x1, y1], …]`` in
            model-input pixels, or ``None``.
        seconds: wall-clock seconds of the call that made ``maps``.
        peak_bytes: its peak memory above the start (``None`` when not measurable).
        device: where everything runs.
    """

    model: nn.Module
    inputs: Tensor
    maps: Tensor
    target: Tensor | None
    explainer: Explainer
    boxes: Mapping[int, list[list[float]]] | None
    seconds: float
    peak_bytes: int | None
    device: torch.device
    _class_maps: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def maps_for(self, cls: int) -> Tensor:
        """The method's ``(1, 1, *S)`` map of class ``cls`` (computed once per class)."""
        if self.target is not None and cls == int(self.target[0]):
            return self.maps
        if cls not in self._class_maps:
            result = self.explainer(self.inputs, [cls])
            maps = result if isinstance(result, Tensor) else result.maps
            self._class_maps[cls] = maps
        return self._class_maps[cls]


@dataclass
class MetricRecord:
    """What a metric reports for one (method, image) pair.

    Attributes:
        columns: column → value (the keys of the metric's ``titles``; ``None`` when undefined).
        curves: curve name → values of this image (e.g. ``"deletion"`` and
            ``"deletion_fractions"``), averaged over images in the plots.
        levels: name → x values shared by every image (e.g. ``"road_percentiles"``).
        per_class: class → values for that class's ground truth (e.g. ``{"hit": True}``),
            kept in ``EvaluationResults.pointing`` and read by the metric's ``summarise``.
    """

    columns: dict[str, float | None]
    curves: dict[str, list[float]] = field(default_factory=dict)
    levels: dict[str, list[float]] = field(default_factory=dict)
    per_class: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric described (:func:`describe_metric`).

    Attributes:
        name: the registry name.
        cls: the class.
        columns: column → ``(title, higher is better)``, in table order.
        needs: what it needs (:data:`NEEDS`).
        options: option name → :class:`Option` (its parameters).
        evaluation: the options' values in the full evaluation protocol.
        quick: the options' values in quick mode.
        doc: the first line of its docstring.
    """

    name: str
    cls: type[Metric]
    columns: dict[str, tuple[str, bool]]
    needs: frozenset[str]
    options: dict[str, Option]
    evaluation: dict[str, Any]
    quick: dict[str, Any]
    doc: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe description."""
        return {
            "name": self.name,
            "columns": {
                c: {"title": t, "higher_is_better": d} for c, (t, d) in self.columns.items()
            },
            "needs": sorted(self.needs),
            "options": [o.describe() for o in self.options.values()],
            "evaluation": self.evaluation,
            "quick": self.quick,
            "doc": self.doc,
        }


class Metric:
    """Base of the metric classes: their metadata and their evaluation contract.

    The library API of each metric is its own ``__call__`` (its arguments differ: maps, an
    explainer, boxes, a call to time). What :func:`evidencemap.evaluation.evaluate` needs is
    declared here and read through the registry (``evidencemap.metrics.registry``).

    Attributes:
        name: the metric's registry name (``evaluate(metrics=[…])``, ``--metrics``).
        higher_is_better: direction of the main value.
        directions: every reported value (column) → whether higher is better.
        titles: every reported value → its column title in the evaluation tables (the keys
            of ``directions``, in table order).
        supports_volumes: whether 3-D volumes ``(N, C, D, H, W)`` are accepted.
        needs: what :meth:`score` reads from its context: ``"maps"``, ``"explainer"``,
            ``"boxes"``.
        OPTIONS: the parameters, as :class:`~evidencemap.methods.options.Option`.
        EVALUATION: option values of the evaluation's full protocol (over the defaults).
        QUICK: option values of the quick protocol (over ``EVALUATION``).
        run_settings: which of the evaluation's run-wide settings (``"batch_size"``,
            ``"seed"``) the constructor takes (default: those among its keywords).
    """

    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    directions: ClassVar[dict[str, bool]] = {}
    titles: ClassVar[dict[str, str]] = {}
    supports_volumes: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"maps"})
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    EVALUATION: ClassVar[dict[str, Any]] = {}
    QUICK: ClassVar[dict[str, Any]] = {}
    run_settings: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def for_evaluation(
        cls, model: nn.Module, options: dict[str, Any], run: dict[str, Any]
    ) -> Metric:
        """The instance :func:`~evidencemap.evaluation.evaluate` scores with.

        Args:
            model: the classifier.
            options: the metric's option values (checked, :func:`metric_settings`).
            run: the run-wide settings ``batch_size``, ``seed`` and ``device``; those in
                ``run_settings`` are passed to the constructor.

        The default calls ``cls(model, **options, **taken run settings)`` (without ``model``
        when the constructor takes none).
        """
        keywords = constructor_keywords(cls)
        kwargs = {**{k: run[k] for k in cls.run_wide()}, **options}
        factory: Callable[..., Metric] = cls
        return factory(model, **kwargs) if "model" in keywords else factory(**kwargs)

    @classmethod
    def run_wide(cls) -> tuple[str, ...]:
        """The run-wide settings this metric takes from the evaluation (``run_settings``, by
        default ``batch_size`` and ``seed`` where the constructor has them)."""
        if cls.run_settings is not None:
            return tuple(cls.run_settings)
        keywords = constructor_keywords(cls)
        return tuple(k for k in ("batch_size", "seed") if k in keywords)

    def score(self, context: MetricContext) -> MetricRecord:
        """The columns of one (method, image) pair (``context.inputs`` is one image)."""
        raise NotImplementedError

    @classmethod
    def summarise(
        cls, column: str, values: list[Any], per_class: list[dict[str, Any]]
    ) -> list[float]:
        """The values the summary averages for ``column``: by default its value per image
        (``values``); ``per_class`` holds the metric's per-class entries of one method."""
        return [v for v in values if v is not None]

    def option(self, name: str, value: Any) -> Any:
        """``value`` checked by this metric's :class:`Option` ``name``."""
        return check_option(self, name, value)


def register_metric(cls: M) -> M:
    """Class decorator: add a metric to the registry (its ``name`` must be new).

    Raises:
        TypeError: when ``cls`` is not a Metric subclass with a ``score`` method.
        ValueError: for a missing or taken name, titles and directions that do not name the same
            columns, a column another metric reports, an unknown need, or protocol settings
            that name no option or fail its check.
    """
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise TypeError(f"register_metric decorates Metric subclasses, got {cls!r}")
    if cls.score is Metric.score:
        raise TypeError(f"metric {cls.__name__} must define score(context) -> MetricRecord")
    name = cls.name
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"metric {cls.__name__} needs a lower-case name, got {name!r}")
    if name in METRIC_REGISTRY and METRIC_REGISTRY[name] is not cls:
        raise ValueError(f"a metric named {name!r} is already registered")
    if list(cls.titles) != list(cls.directions) or not cls.titles:
        raise ValueError(
            f"metric {name!r}: titles and directions must name the same columns, in order"
        )
    taken = {c: n for n, k in METRIC_REGISTRY.items() if k is not cls for c in k.titles}
    clash = [c for c in cls.titles if c in taken]
    if clash:
        raise ValueError(f"metric {name!r}: column {clash[0]!r} is metric {taken[clash[0]]!r}'s")
    if not set(cls.needs) <= NEEDS:
        raise ValueError(f"metric {name!r}: needs must be a subset of {sorted(NEEDS)}")
    known = options_of(cls)
    for label, values in (("EVALUATION", cls.EVALUATION), ("QUICK", cls.QUICK)):
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"metric {name!r}: {label} names no option {key!r}")
            known[key].check(value, name)
    METRIC_REGISTRY[name] = cls
    return cls


def unregister_metric(name: str) -> None:
    """Remove a registered metric (for tests and plug-ins that registered one).

    Raises:
        ValueError: for an unknown name.
    """
    get_metric(name)
    del METRIC_REGISTRY[name]


def metric_names() -> list[str]:
    """Every registered metric name, in table order."""
    return list(METRIC_REGISTRY)


def get_metric(name: str) -> type[Metric]:
    """The class of metric ``name``.

    Raises:
        TypeError: when ``name`` is not a string.
        ValueError: for an unknown name (the message lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"a metric name must be a string, got {type(name).__name__}")
    cls = METRIC_REGISTRY.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRIC_REGISTRY)}")
    return cls


def describe_metric(name: str) -> MetricSpec:
    """The :class:`MetricSpec` of metric ``name``."""
    cls = get_metric(name)
    options = {k: o for k, o in options_of(cls).items() if o.doc != "(not described)"}
    return MetricSpec(
        name=cls.name,
        cls=cls,
        columns={c: (cls.titles[c], cls.directions[c]) for c in cls.titles},
        needs=frozenset(cls.needs),
        options=options,
        evaluation=metric_settings(cls, quick=False),
        quick=metric_settings(cls, quick=True),
        doc=(inspect.getdoc(cls) or "").splitlines()[0] if inspect.getdoc(cls) else "",
    )


def metric_settings(
    cls: type[Metric], *, quick: bool, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The option values an evaluation gives metric ``cls``: every described option's
    constructor default, then ``EVALUATION``, then ``QUICK`` (in quick mode), then ``given``,
    each checked by its :class:`Option`. The run-wide ``batch_size`` / ``seed`` are left out
    (:meth:`Metric.run_wide`: the evaluation passes its own).

    Raises:
        OptionError: for a ``given`` name the metric does not take (the known ones listed).
        TypeError / ValueError: for a value its Option refuses.
    """
    run_wide = cls.run_wide()
    known = {
        k: o for k, o in options_of(cls).items() if o.doc != "(not described)" and k not in run_wide
    }
    values = {k: o.default for k, o in known.items()}
    values.update({k: v for k, v in cls.EVALUATION.items() if k in known})
    if quick:
        values.update({k: v for k, v in cls.QUICK.items() if k in known})
    for key, value in (given or {}).items():
        if key in run_wide:
            raise OptionError(
                f"metric {cls.name!r}: {key} is set for every metric at once "
                f"(evaluate's {key}=…, the command's --{key.replace('_', '-')})"
            )
        if key not in known:
            raise OptionError(
                f"metric {cls.name!r} takes no option {key!r}; it takes: "
                f"{', '.join(known) or 'none'}"
            )
        values[key] = known[key].check(value, cls.name)
    return values


def constructor_keywords(cls: type[Metric]) -> set[str]:
    """Keyword parameters of the metric's constructor."""
    return {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
    }


def check_option(cls: type[Metric] | Metric, name: str, value: Any) -> Any:
    """``value`` checked by the metric's :class:`Option` ``name`` (returned converted)."""
    klass = cls if isinstance(cls, type) else type(cls)
    return options_of(klass)[name].check(value, klass.name)
