"""The explain/batch engine: read inputs, explain them in batches, write one result per input.

What ``evidencemap explain`` and ``evidencemap batch`` run, and what every actor of
:mod:`evidencemap.distributed` runs: library code that never parses arguments and never prints;
it reports through the callbacks it is given (``on_result``, ``on_failure``) and through the
warnings of each :class:`Result`.

:class:`Settings` (a frozen dataclass) says how to explain; :func:`make_settings` builds it from
plain values (a model, a method name, a target, options), checking everything;
:func:`check_request` checks what can be checked before a model is loaded (the method's options
against its description, the colour map, the target's syntax and, for built-in models, its
class range).

Per input ``NAME`` and method ``M`` it writes, next to each other, under the *stem*
``NAME_M`` (:func:`output_stem`; ``top_k`` adds ``_topK``, a target other than the top class
adds ``_t<target>``, options, layer, frame or window other than the defaults add ``_o<hash>``
of them):

* ``STEM.png`` (``.pdf`` / ``.svg`` with ``format``; with ``top_k`` one picture per class,
  ``STEM_1.png`` … ``STEM_K.png``): photos get the overlay on the original photo, coloured
  only where the model looked (its centre crop, dashed box), with a colour bar and the title
  ``"LABEL — class probability"`` (``LABEL``: the method and the variant its options select,
  ``Explanation.label``); volumes get axial,
  coronal and sagittal slices through the map's maximum. When a method returns an explanation
  image (FGVis: ``extras["explanation"]``, or ``extras["deleted"]`` in the deletion game) it
  is shown beside the model's view of the photo and the map. With ``bare``:
  ``STEM_bare.png`` (the map over the photo, nothing else) or ``STEM_bare.tiff`` (16-bit
  values at the model's input resolution).
* ``STEM.npz``: the one maps schema (:func:`evidencemap.io.save_explanation`, read back with
  :func:`evidencemap.io.load_maps`): ``maps`` ``(K, 1, *input)`` in [0, 1] at the model's
  input resolution, ``raw`` (the unnormalised maps at the layer's resolution), ``targets``,
  ``scores`` and what made them.
* ``STEM.nii.gz`` for volumes read with an affine (NIfTI, DICOM): the map on the input's grid
  with its affine (:func:`evidencemap.io.save_nifti`), to lay over the scan in a viewer.
* ``STEM.json``: the manifest, written last (atomically), so a manifest on disk means the
  input is finished. Its ``request`` records what was asked (model and its input size,
  method, target, top_k, options, layer, frame, window, picture settings);
  :func:`already_done` compares it with a new request, so a resumed ``batch`` skips only
  inputs computed with the same request.

Every name is importable from :mod:`evidencemap.engine`; the code lives in modules named after
what they hold: :mod:`~evidencemap.engine.settings` (:class:`Settings`, :func:`make_settings`,
targets and the checks made before a model loads), :mod:`~evidencemap.engine.items` (inputs →
items), :mod:`~evidencemap.engine.run` (explaining batches, :func:`run_inputs`),
:mod:`~evidencemap.engine.outputs` (names, manifests, resume, pictures, ``.npz``) and
:mod:`~evidencemap.engine.predictions` (probabilities and top classes).
"""

from __future__ import annotations

from evidencemap.engine.items import (
    Item,
    crop_region,
    prepare,
)
from evidencemap.engine.outputs import (
    Result,
    already_done,
    output_bases,
    output_stem,
    request_of,
    strip_suffix,
    versions,
)
from evidencemap.engine.predictions import (
    is_embedding,
    probabilities,
    top_predictions,
)
from evidencemap.engine.run import (
    Failure,
    explain_items,
    run_inputs,
)
from evidencemap.engine.settings import (
    DEFAULT_CMAP,
    FORMATS,
    Settings,
    TargetRequest,
    build_method,
    check_picture,
    check_request,
    known_labels,
    make_settings,
    parse_target,
    resolve_device,
    with_engine,
)

__all__ = [
    "DEFAULT_CMAP",
    "FORMATS",
    "Failure",
    "Item",
    "Result",
    "Settings",
    "TargetRequest",
    "already_done",
    "build_method",
    "check_picture",
    "check_request",
    "crop_region",
    "explain_items",
    "is_embedding",
    "known_labels",
    "make_settings",
    "output_bases",
    "output_stem",
    "parse_target",
    "prepare",
    "probabilities",
    "request_of",
    "resolve_device",
    "run_inputs",
    "strip_suffix",
    "top_predictions",
    "versions",
    "with_engine",
]
