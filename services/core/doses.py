"""Dose levels: fractions in (0, 1]; 1.0 is the acquired (or synthesised) full dose."""

from __future__ import annotations

import math

from .errors import InputError

FULL_DOSE = 1.0


def validate_dose_fraction(value: float) -> float:
    if not math.isfinite(value) or value <= 0.0 or value > 1.0:
        raise InputError(f"dose fraction {value:g} is outside (0, 1]",
                         fix="give fractions of the full dose, e.g. --doses 0.2,0.4,0.6,0.8,1.0")
    return round(float(value), 4)


def parse_doses(text: str) -> list[float]:
    """``"0.2,0.4,1.0"`` -> [1.0, 0.4, 0.2]: validated, de-duplicated, full dose always included
    (it is the reference every lower dose is compared with), highest first."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise InputError("no dose levels given", fix="e.g. --doses 0.2,0.4,0.6,0.8,1.0")
    doses = set()
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise InputError(f"dose level {item!r} is not a number",
                             fix="give fractions of the full dose, e.g. --doses 0.2,0.4,1.0") from None
        doses.add(validate_dose_fraction(value))
    doses.add(FULL_DOSE)
    return sorted(doses, reverse=True)


def dose_label(dose: float) -> str:
    """File-name form: 0.2 -> '0.20'; finer fractions keep their digits (0.125 -> '0.125')."""
    if abs(round(dose, 2) - dose) < 1e-9:
        return f"{dose:.2f}"
    return f"{dose:.4f}".rstrip("0")
