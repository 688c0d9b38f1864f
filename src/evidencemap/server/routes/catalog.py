"""What the service offers: ``GET /api/methods``, ``GET /api/models`` and ``GET /api/labels``."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter

from evidencemap import models as builtin_models
from evidencemap.methods import describe, method_names
from evidencemap.methods.registry import MethodSpec
from evidencemap.server.routes.deps import ServiceDep
from evidencemap.server.schemas import MethodCost, MethodInfo, ModelInfo
from evidencemap.server.service import Service

__all__ = ["router"]

logger = logging.getLogger("evidencemap.server")
router = APIRouter(tags=["explain"])
Calibrated = tuple[dict[str, float], int | None] | None


def method_info(service: Service, spec: MethodSpec, calibration: Calibrated) -> MethodInfo:
    """One entry of ``GET /api/methods``: the method, its options with the caps in force,
    its expected cost, and whether it applies to the served model (and why not)."""
    caps = service.caps_for(spec)
    reason = service.unsupported(spec)
    described = {name: option.describe() for name, option in spec.options.items()}
    return MethodInfo(
        name=spec.name,
        aliases=list(spec.aliases),
        uses_layer=spec.uses_layer,
        summary=spec.summary,
        options={name: d["default"] for name, d in described.items()},
        option_specs=[{**d, "cap": caps.get(name)} for name, d in described.items()],
        cost=MethodCost(**service.costs.cost(spec, calibration)),
        applies=reason is None,
        reason=reason,
    )


@router.get("/api/methods", response_model=list[MethodInfo])
async def list_methods(service: ServiceDep) -> list[MethodInfo]:
    """Every method name (for ``method``), its aliases, its options with defaults and caps,
    its expected cost, and whether it applies to the served model (``applies``, ``reason``)."""
    calibration: Calibrated
    try:
        calibration = await asyncio.to_thread(service.calibration.measure)
    except (RuntimeError, ValueError, TypeError) as err:  # estimates stay null
        logger.warning("could not time the passes of the model (no cost estimates): %s", err)
        calibration = None
    return [method_info(service, describe(name), calibration) for name in method_names()]


@router.get("/api/models", response_model=list[ModelInfo])
async def list_models(service: ServiceDep) -> list[ModelInfo]:
    """The built-in models, whether installed, and which one this server explains."""
    served = service.model_name
    installed = set(builtin_models.available())
    names = list(dict.fromkeys([*builtin_models.builtin_names(), served]))
    return [
        ModelInfo(name=n, installed=n in installed or n == served, served=n == served)
        for n in names
    ]


@router.get("/api/labels", response_model=list[str])
async def list_labels(service: ServiceDep) -> list[str]:
    """The served model's class names, index-aligned with ``target`` (empty when the
    model has none: targets are then class indices)."""
    return service.labels
