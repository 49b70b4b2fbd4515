"""Scan protocols as data: scanner geometry, photon model and reconstruction settings.

Built-in protocols live in ``dosebench/core/protocols/*.yaml``; a user's own protocol is a YAML or
JSON file with the same fields (``dosebench run --protocol my_scanner.yaml``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError
from .geometry import ScannerModel

#: Linear attenuation of water at the effective energy of a 120 kVp abdominal spectrum (~70 keV):
#: NIST XCOM gives mu/rho = 0.1929 cm^2/g at 70 keV, i.e. 0.01929 / mm.
MU_WATER_120KVP_PER_MM = 0.0193


class BowtieModel(BaseModel):
    """Bowtie filter transmission over the fan.

    ``water-cylinder``: the filter complements a water cylinder of ``radius_mm`` centred at the
    isocentre, so a ray at distance t from the axis is attenuated by mu_water * (2 radius - chord(t)),
    floored at ``min_transmission`` (real bowties level off towards the fan's edge).
    ``flat``: no bowtie.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["water-cylinder", "flat"] = "water-cylinder"
    radius_mm: float = Field(default=160.0, gt=0)
    min_transmission: float = Field(default=0.1, gt=0, le=1)


class PhotonModel(BaseModel):
    """Detected photons per detector element and view at full dose.

    Expected counts of an unattenuated ray (the air scan) are::

        N0 = fluence_photons_per_mas_mm2 * mAs_per_view(k) * element_area_at_isocenter_mm2 * bowtie(gamma)

    ``fluence_photons_per_mas_mm2`` is the *detected* fluence at the isocentre behind the bowtie
    centre per mAs. The default 2.5e6 corresponds to ~0.15 mGy/mAs air kerma at the isocentre for
    120 kVp (about 5e6 photons/mm^2/mAs) times a detection efficiency of ~0.5: typical of clinical
    scanners. ``mas_per_rotation`` of 200 is a typical effective abdominal tube current-time product.
    Tube current modulation is a relative per-view profile (mean 1), repeated if shorter than the scan.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mas_per_rotation: float = Field(default=200.0, gt=0)
    fluence_photons_per_mas_mm2: float = Field(default=2.5e6, gt=0)
    tube_current_modulation: list[float] | None = None
    bowtie: BowtieModel = BowtieModel()
    #: std of the detector's electronic noise, in photon counts (0 = quantum noise only)
    electronic_noise_sigma: float = Field(default=0.0, ge=0)
    mu_water_per_mm: float = Field(default=MU_WATER_120KVP_PER_MM, gt=0)


class ReconstructionSettings(BaseModel):
    """Helical WFBP settings. Grid fields left None mean: the input volume's own grid."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Literal["ram-lak", "shepp-logan", "cosine", "hann"] = "shepp-logan"
    #: cut-off as a fraction of the rebinned detector's Nyquist frequency
    cutoff: float = Field(default=1.0, gt=0, le=1.0)
    #: aperture weighting: weight 1 for |q| <= Q, cos^2 taper to 0 at |q| = 1 (q: normalised row)
    aperture_q: float = Field(default=0.7, ge=0, lt=1)
    fov_mm: float | None = None
    matrix: int | None = None
    slice_thickness_mm: float | None = None
    slice_increment_mm: float | None = None


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    scanner: ScannerModel
    photons: PhotonModel = PhotonModel()
    reconstruction: ReconstructionSettings = ReconstructionSettings()
    #: views per random-number chunk: fixes the seeding, independent of memory settings
    views_per_chunk: int = Field(default=64, ge=1)


def builtin_protocol_names() -> list[str]:
    folder = resources.files("dosebench.core") / "protocols"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_protocol(name_or_path: str) -> Protocol:
    """A built-in protocol by name (``demo``, ``paper``, ``tiny``) or a YAML/JSON file."""
    path = Path(name_or_path)
    if name_or_path in builtin_protocol_names():
        text = (resources.files("dosebench.core") / "protocols" / f"{name_or_path}.yaml").read_text()
        source = f"built-in protocol {name_or_path!r}"
    elif path.suffix.lower() in {".yaml", ".yml", ".json"} and path.is_file():
        text = path.read_text()
        source = str(path)
    else:
        raise InputError(
            f"unknown protocol {name_or_path!r}",
            fix=f"use one of {', '.join(builtin_protocol_names())} or the path of a YAML/JSON protocol file",
        )
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        return Protocol.model_validate(data)
    except (ValidationError, yaml.YAMLError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()
        raise InputError(f"invalid protocol in {source}: {' '.join(first[:3])}",
                         fix="correct the protocol file (see dosebench/core/protocols/demo.yaml)") from exc
