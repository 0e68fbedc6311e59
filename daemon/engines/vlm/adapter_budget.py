"""The image budget an adapter was trained with, kept beside it (``ftmllm_budget.json`` in the adapter dir).

A LoRA trained on pages of 0.26 Mpx reads pages of 1 Mpx badly, and nothing in the adapter's own files says
which it saw. So a train job writes what it trained with: LLaMA-Factory's ``image_max_pixels`` and
``image_min_pixels`` (its defaults when the job left them out) and, for datasets built by ``ftctl dataset
from-pages``, how their pages were rendered (dpi, pixel cap, prompt). ``ftctl deploy`` reads it to refuse an
engine that cannot serve that budget (:func:`plan_for`); :func:`render_cap` is the cap to render the pages
of an OCR job that names the adapter at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.core.atomic import write_atomic
from daemon.engines.vlm.budget import BudgetError, Limits, RenderPlan, adapter_plan

BUDGET_FILE = "ftmllm_budget.json"
# LLaMA-Factory's own defaults (hparams/model_args.py), for a job that did not set them
LF_IMAGE_MAX_PIXELS = 768 * 768
LF_IMAGE_MIN_PIXELS = 32 * 32


@dataclass(frozen=True)
class AdapterBudget:
    image_max_pixels: int
    image_min_pixels: int
    # dataset name -> how `dataset from-pages` rendered its pages (dpi, max_pixels, prompt, mode, renderer)
    rendered: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"image_max_pixels": self.image_max_pixels, "image_min_pixels": self.image_min_pixels,
                "datasets": self.rendered}


def budget_of(params: dict[str, Any], rendered: dict[str, dict[str, Any]]) -> AdapterBudget:
    """What a train job with these LLaMA-Factory params trains with."""
    def pixels(key: str, default: int) -> int:
        value = params.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

    return AdapterBudget(pixels("image_max_pixels", LF_IMAGE_MAX_PIXELS),
                         pixels("image_min_pixels", LF_IMAGE_MIN_PIXELS), dict(rendered))


def write_budget(adapter_dir: Path, budget: AdapterBudget) -> Path:
    path = adapter_dir / BUDGET_FILE
    write_atomic(path, json.dumps(budget.to_json(), ensure_ascii=False, indent=1) + "\n", mode=0o600)
    return path


def read_budget(adapter_dir: Path) -> AdapterBudget | None:
    """The recorded budget; None for an adapter trained elsewhere (or before budgets were recorded)."""
    try:
        data = json.loads((adapter_dir / BUDGET_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("image_max_pixels"), int):
        return None
    rendered = data.get("datasets")
    return AdapterBudget(int(data["image_max_pixels"]), int(data.get("image_min_pixels") or LF_IMAGE_MIN_PIXELS),
                         dict(rendered) if isinstance(rendered, dict) else {})


def plan_for(budget: AdapterBudget, limits: Limits, *, dpi: float, prompt: str) -> tuple[RenderPlan, list[str]]:
    """The render plan for the adapter's pages on an engine with ``limits``, rendering at ``dpi`` with
    ``prompt``; and notes on what differs from its training pages. BudgetError when the engine cannot."""
    plan = adapter_plan(limits, budget.image_max_pixels)
    notes = [plan.detail] if plan.detail else []
    for name, how in sorted(budget.rendered.items()):
        if how.get("dpi") not in (None, dpi):
            notes.append(f"dataset {name} was rendered at {how['dpi']} dpi, ocr.dpi is {dpi}")
        if how.get("prompt") not in (None, prompt):
            notes.append(f"dataset {name} was built with another prompt than ocr.prompt's")
    return plan, notes


def render_cap(adapter_dir: Path | None, limits: Limits, *, dpi: float, prompt: str) -> int | None:
    """The pixel cap to render an adapter's pages at: its recorded budget when the engine can serve it; None
    (render as for the base model) for an adapter without one, or one the engine cannot serve (deploy refuses
    those; one loaded before its budget was known is served as before rather than failing every page)."""
    budget = read_budget(adapter_dir) if adapter_dir is not None else None
    if budget is None:
        return None
    try:
        return plan_for(budget, limits, dpi=dpi, prompt=prompt)[0].max_pixels
    except BudgetError:
        return None
