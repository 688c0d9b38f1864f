"""Response models of the web service (pydantic), as its OpenAPI schema documents them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ArrayData",
    "ErrorResponse",
    "ExplainResponse",
    "ExplanationResult",
    "Health",
    "ImageInfo",
    "MethodCost",
    "MethodInfo",
    "ModelInfo",
    "NpzRequest",
    "Prediction",
    "ProgressInfo",
    "ProgressStep",
]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: one human-readable message, never a stack trace."""

    error: str = Field(description="What was wrong with the request.")


class Prediction(BaseModel):
    """One class of the model's output."""

    model_config = ConfigDict(populate_by_name=True)

    class_: int = Field(alias="class", description="Class index of the model output.")
    label: str = Field(description="Class name.")
    probability: float = Field(description="Softmax probability of the class on the image.")


class ArrayData(BaseModel):
    """A float array: ``data`` is the base64 of its values as float32, little-endian, C order.

    In JavaScript: ``new Float32Array(Uint8Array.from(atob(data), c => c.charCodeAt(0)).buffer)``;
    in NumPy: ``np.frombuffer(base64.b64decode(data), "<f4").reshape(shape)``.
    """

    dtype: str = Field("float32", description="Always float32.")
    byteorder: str = Field("little", description="Always little-endian.")
    shape: list[int] = Field(description="Array shape, e.g. [224, 224].")
    data: str = Field(description="base64 of the raw float32 little-endian bytes, C order.")


class ImageInfo(BaseModel):
    """The uploaded photo and the part of it the model saw."""

    width: int = Field(description="Width of the uploaded photo in pixels (upright).")
    height: int = Field(description="Height of the uploaded photo in pixels (upright).")
    crop: list[float] = Field(
        description="The model's centre crop in photo pixels: [left, top, right, bottom]."
    )
    input_size: int = Field(description="Side of the model's square input in pixels.")
    display_size: int = Field(description="Side of the PNGs returned (the crop, resized).")


class ExplanationResult(BaseModel):
    """One method's map for one target class."""

    method: str = Field(description="Method name.")
    target: int = Field(description="The class explained.")
    label: str = Field(description="Its name.")
    score: float = Field(description="The model's target score (logit) on the image.")
    layer: str | list[str] | None = Field(
        description="Explained layer (dotted name); null for input-space methods."
    )
    options: dict[str, Any] = Field(description="The options the method ran with.")
    seconds: float = Field(description="Seconds this method took for all targets together.")
    overlay_png: str = Field(
        description="data:image/png;base64 URL: the crop with the map blended over it "
        "(jet colours, alpha 0.5), display_size × display_size. Maps at input resolution "
        "(input-gradient methods) are coloured saturated at their 99.5th percentile."
    )
    heatmap_png: str = Field(
        description="data:image/png;base64 URL: the map alone in jet colours, for blending "
        "client-side with any opacity."
    )
    map: ArrayData = Field(
        description="The normalised map in [0, 1] at the model's input resolution "
        "[input_size, input_size] (0 = no evidence, 1 = the most)."
    )
    raw: list[ArrayData] = Field(
        description="The map before normalisation at the layer's resolution (e.g. [7, 7]); "
        "one entry per explained layer (input resolution for input-space methods)."
    )
    explanation_png: str | None = Field(
        default=None,
        description="Methods whose explanation is an image (FGVis): data:image/png;base64 URL of "
        "it at display_size: the explanation e (preservation game) or the deleted evidence "
        "(deletion game); null for other methods.",
    )
    explanation_kind: str | None = Field(
        default=None, description='"explanation" or "deleted"; null when there is no image.'
    )
    explanation_score: float | None = Field(
        default=None,
        description="The model's probability of the target on the explanation e, a valid model "
        "input (deletion game: the photo with the evidence removed); null for other methods.",
    )
    explanation_top1: int | None = Field(
        default=None, description="The model's top-1 class on e; null for other methods."
    )
    warning: str | None = Field(
        default=None,
        description="The method's note on this map (FGVis: which schedule ran and why, plus "
        "any problem of this image's result — a trivial game, a flat map, a missed criterion, "
        "evidence that does not survive noise — and what to try); null when there is none.",
    )


class ExplainResponse(BaseModel):
    """The answer of ``POST /api/explain``."""

    model: str = Field(description="The model that was explained.")
    image: ImageInfo
    input_png: str = Field(
        description="data:image/png;base64 URL of the model's crop at display_size (the photo "
        "the overlays are drawn on)."
    )
    predictions: list[Prediction] = Field(description="The top-5 classes.")
    targets: list[Prediction] = Field(description="The classes explained.")
    methods: list[str] = Field(description="The methods run, in request order.")
    colormap: str = Field(description="The matplotlib colormap of the PNGs (jet).")
    seconds: float = Field(description="Seconds the whole request took on the server.")
    explanations: list[ExplanationResult] = Field(
        description="One entry per (method, target), methods in request order, then targets."
    )


class MethodCost(BaseModel):
    """What a method is expected to cost on the served model, per explained class.

    ``passes`` counts model passes of one image with the default options, of the kind
    ``pass_kind``; ``seconds`` is ``passes`` times one such pass timed on this service (an
    estimate for an idle machine: ``top_k`` classes cost ``k`` times as much, concurrent
    requests slow it down, FGVis may stop earlier). ``last_seconds`` is measured: the latest
    run of the method here.
    """

    passes: float | None = Field(
        description="Model passes per class with the default options (FGVis: at most); null "
        "when unknown."
    )
    pass_kind: str = Field(
        default="layer",
        description='"layer" (a Grad-CAM call: forward, and backward from the layer), '
        '"input" (a saliency call: forward and full backward to the input) or "forward" (a '
        "forward without gradients).",
    )
    work_option: str | None = Field(
        description="The option the method declares as counting its passes (Option passes=True: "
        "max_iterations, steps, samples, top_k); null for methods whose count is fixed."
    )
    at_most: bool = Field(
        default=False,
        description="passes is an upper bound, as the method declares it (Option at_most=True: "
        "FGVis stops early, Score-CAM skips constant channels).",
    )
    seconds: float | None = Field(
        description="Estimated seconds per class on this service: passes × seconds_per_pass."
    )
    seconds_per_pass: float | None = Field(
        description="One pass of that kind on the served model, timed once by this service."
    )
    last_seconds: float | None = Field(
        description="Seconds per class of the latest run of this method on this service "
        "(any options); null before the first."
    )
    last_work: Any = Field(
        default=None, description="The work option's value in that run (null: its default)."
    )


class MethodInfo(BaseModel):
    """A method the service can run."""

    name: str
    aliases: list[str]
    uses_layer: bool = Field(description="Whether the method explains a layer's activations.")
    summary: str = Field(description="First line of the method's documentation.")
    options: dict[str, Any] = Field(
        description="Keyword options the method accepts, with their defaults."
    )
    option_specs: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Each option described: name, kind, default, doc, expected, choices, "
        "low/high, nullable, cost ('work': time grows with it, 'chunk': memory), cap "
        "(the largest value this service accepts; null: no cap), passes (it counts the "
        "method's model passes), at_most (that count is an upper bound) and passes_if_none "
        "('channels': null means one pass per channel of the layer).",
    )
    cost: MethodCost | None = Field(
        default=None, description="Its expected cost per class on the served model."
    )
    applies: bool = Field(
        default=True,
        description="Whether the method can explain the served model (a static check: e.g. "
        "attention methods need a transformer, layer methods a model that is not TorchScript).",
    )
    reason: str | None = Field(
        default=None, description="Why it cannot, when it cannot; null when it applies."
    )


class ModelInfo(BaseModel):
    """A built-in model."""

    name: str
    installed: bool = Field(description="Whether its weights are installed.")
    served: bool = Field(description="Whether this server explains it.")


class Health(BaseModel):
    """Liveness: the service answers and its model is loaded."""

    status: str = Field(description='"ok".')
    model: str
    version: str
    workers: int = Field(description="Explanation threads.")
    busy: int = Field(description="Explanation requests being computed or waiting now.")


class ProgressStep(BaseModel):
    """The running method's own step (FGVis iterations, Score-CAM channels …)."""

    desc: str = Field(description="The step's name (usually the method's).")
    done: int = Field(description="Units done.")
    total: int = Field(description="Units in all.")


class ProgressInfo(BaseModel):
    """The state of one explanation request (``GET /api/progress/{request_id}``)."""

    request_id: str
    state: str = Field(
        description='"unknown" (not seen, or forgotten), "queued" (waiting for a worker), '
        '"running", "cancelling" (cancelled, stopping at its next checkpoint), "done", '
        '"failed" or "cancelled".'
    )
    elapsed: float = Field(description="Seconds since the service registered the request.")
    methods: list[str] = Field(description="The request's methods, in order.")
    method_index: int = Field(description="How many of them have finished.")
    method: str | None = Field(description="The method running now; null when none.")
    step: ProgressStep | None = Field(description="Its step; null for single-pass methods.")
    fraction: float = Field(description="Estimated fraction done, in [0, 1].")


class NpzRequest(BaseModel):
    """A map to download as ``.npz`` (``POST /api/download/npz``): the fields of one
    :class:`ExplanationResult` that it holds."""

    map: ArrayData = Field(description="The normalised map (ExplanationResult.map).")
    raw: list[ArrayData] = Field(description="The raw maps (ExplanationResult.raw).")
    target: int = Field(description="The class explained.")
    method: str = Field("", description="The method (ExplanationResult.method).")
    score: float | None = Field(None, description="The target score (ExplanationResult.score).")
    layer: str | list[str] | None = Field(
        None, description="The layer(s) (ExplanationResult.layer)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="The method's options (ExplanationResult.options)."
    )
