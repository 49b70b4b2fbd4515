"""Reproducible random streams: one generator per (job seed, purpose, dose, chunk)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dosebench.core.seeds import Purpose, dose_key, rng_for

BASE = (1234, Purpose.DOSE_REDUCTION, 0.2, 0)


def _stream(seed: int, purpose: Purpose, dose: float, chunk: int, n: int = 64) -> bytes:
    """The first draws of a stream as bytes (raw 64-bit integers: exact, no float rounding)."""
    return rng_for(seed, purpose, dose, chunk).integers(0, 2**63, size=n, dtype=np.int64).tobytes()


def test_identical_coordinates_give_identical_streams():
    assert _stream(*BASE) == _stream(*BASE)
    # independent of what was drawn from other streams in between (no shared state)
    rng_for(99, Purpose.FULL_DOSE_SYNTHESIS, 1.0, 5).random(1000)
    assert _stream(*BASE) == _stream(*BASE)
    # the same generator state, not merely the same first draws
    a = rng_for(*BASE)
    b = rng_for(*BASE)
    assert a.bit_generator.state == b.bit_generator.state


@pytest.mark.parametrize(
    "changed",
    [
        (1235, Purpose.DOSE_REDUCTION, 0.2, 0),  # seed
        (0, Purpose.DOSE_REDUCTION, 0.2, 0),  # seed 0 is valid and distinct
        (1234, Purpose.FULL_DOSE_SYNTHESIS, 0.2, 0),  # purpose
        (1234, Purpose.ELECTRONIC_NOISE, 0.2, 0),  # purpose
        (1234, Purpose.DOSE_REDUCTION, 0.4, 0),  # dose 0.2 vs 0.4
        (1234, Purpose.DOSE_REDUCTION, 0.2001, 0),  # dose, one key step (1e-4) apart
        (1234, Purpose.DOSE_REDUCTION, 0.2, 1),  # chunk 0 vs 1
    ],
)
def test_any_changed_coordinate_gives_a_different_stream(changed):
    assert _stream(*changed) != _stream(*BASE)


def test_all_purposes_doses_and_chunks_are_pairwise_distinct():
    coordinates = list(itertools.product([0, 7], list(Purpose), [0.2, 0.4, 1.0], [0, 1, 2]))
    streams = {_stream(*c, n=4) for c in coordinates}
    assert len(streams) == len(coordinates)


@pytest.mark.parametrize("seed", [-1, -2**40])
def test_negative_seed_is_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        rng_for(seed, Purpose.DOSE_REDUCTION, 0.2, 0)


def test_dose_key():
    assert dose_key(0.2) == 2000
    assert isinstance(dose_key(0.2), int)
    assert dose_key(1.0) == 10_000
    assert dose_key(0.25) == 2500
    assert dose_key(0.05) == 500
    # rounding, not truncation: 0.1 + 0.2 == 0.30000000000000004 and 0.29 * 10_000 == 2899.9999999999995
    assert dose_key(0.1 + 0.2) == 3000
    assert dose_key(0.29) == 2900
