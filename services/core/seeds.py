"""Reproducible random streams: one ``numpy.random.Generator`` per (job seed, purpose, dose, chunk).

Any stage re-run gives identical bytes on any worker in any order, because each chunk's stream is
derived from its coordinates alone (``SeedSequence`` spawning keys), never from a shared state.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Purpose(IntEnum):
    FULL_DOSE_SYNTHESIS = 1
    DOSE_REDUCTION = 2
    ELECTRONIC_NOISE = 3


def dose_key(dose_fraction: float) -> int:
    """Dose fraction as an integer key (1e-4 resolution): 0.2 -> 2000."""
    return int(round(dose_fraction * 10_000))


def rng_for(seed: int, purpose: Purpose, dose_fraction: float, chunk: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError("seed must be a non-negative integer")
    sequence = np.random.SeedSequence([int(seed), int(purpose), dose_key(dose_fraction), int(chunk)])
    return np.random.Generator(np.random.PCG64(sequence))
