"""Rotary settings of HF configs, read and written the way both transformers generations expect.

transformers 5 keeps rope settings in `rope_parameters`; 4.x (the NeMo containers' version)
reads `rope_theta` / `rope_scaling` at the top level. Families share these helpers so both
layouts are handled in one place.
"""

from __future__ import annotations


def rope_theta(cfg: dict) -> float:
    """The rotary base of an HF config dict (10000 when absent, HF's default)."""
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def put_rope_theta(cfg: dict, value: float) -> None:
    """Stores the rotary base where transformers 5 and 4.x both find it."""
    params = dict(cfg.get("rope_parameters") or {"rope_type": "default"})
    params["rope_theta"] = value
    cfg["rope_parameters"] = params
    cfg["rope_theta"] = value


def rope_type(cfg: dict) -> str:
    """"default" for plain rotary; anything else (linear, yarn, llama3, ...) rescales frequencies."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return params.get("rope_type", params.get("type", "default"))
