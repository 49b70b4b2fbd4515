"""Exact low-dose simulation by Poisson thinning (Zabic et al. 2013) and counts-to-line-integrals.

Derivation of :func:`reduce_dose`. Let the full-dose count be ``n = q + e`` with ``q ~ Poisson(lam)``
(quantum noise) and ``e ~ N(0, s^2)`` (electronic noise, ``s`` = ``electronic_noise_sigma``).
Zabic's resampling of a count at dose fraction ``f`` is ``y = (1 - f) * Poisson(f / (1 - f) * n)``:

* mean:      E[y] = (1 - f) * f / (1 - f) * E[n] = f lam
* variance:  Var[y] = E[Var(y | n)] + Var(E[y | n])
                    = (1 - f)^2 * f / (1 - f) * lam + f^2 (lam + s^2)
                    = f lam + f^2 s^2

A true acquisition at dose ``f`` has quantum variance ``f lam`` plus the *same* electronic noise
``s^2`` (the electronics do not scale with tube current), i.e. ``f lam + s^2``. The thinned counts lack
``s^2 (1 - f^2)``, which is added as independent Gaussian noise. Without electronic noise (s = 0) the
output has exactly the low-dose Poisson mean and variance. Electronic noise can make ``n`` negative;
the Poisson parameter is then taken at ``max(n, 0)`` (a bias only where fewer than ~s photons arrive).
"""

from __future__ import annotations

import numpy as np

#: Counts below half the smallest non-zero count are raised to it before the logarithm: halfway
#: between no photon and one. Line integrals stay finite and large (a starved ray stays "very
#: attenuating"), never NaN, inf, or a falsely transparent p = 0.
COUNT_FLOOR_PHOTONS = 0.5


def count_floor(dose_fraction: float) -> float:
    """The guard for counts at ``dose_fraction``: thinned counts come in steps of (1 - f) photons
    (see :func:`reduce_dose`), so half a step; at full dose half a photon."""
    f = _check_fraction(dose_fraction)
    return COUNT_FLOOR_PHOTONS * ((1.0 - f) if f < 1.0 else 1.0)


def _check_fraction(dose_fraction: float) -> float:
    f = float(dose_fraction)
    if not np.isfinite(f) or f <= 0.0 or f > 1.0:
        raise ValueError(f"dose fraction must be in (0, 1], got {dose_fraction!r}")
    return f


def reduce_dose(counts: np.ndarray, dose_fraction: float, rng: np.random.Generator, *,
                electronic_noise_sigma: float = 0.0) -> np.ndarray:
    """Photon counts of the same scan at ``dose_fraction`` of its dose.

    Parameters
    ----------
    counts : ndarray
        Detected photon counts at the full dose (any shape; non-negative and finite unless
        ``electronic_noise_sigma > 0``, when negative values are allowed).
    dose_fraction : float
        f in (0, 1]; f == 1 returns the input unchanged.
    rng : numpy.random.Generator
        The random stream (see :func:`dosebench.core.seeds.rng_for`).
    electronic_noise_sigma : float
        Std of the electronic noise the input carries, in photon counts; the output carries the
        same (see the module docstring for the derivation).

    Returns
    -------
    ndarray of float64, same shape: mean ``f * E[counts]``, variance ``f * E[q] + sigma^2``.
    """
    f = _check_fraction(dose_fraction)
    if electronic_noise_sigma < 0 or not np.isfinite(electronic_noise_sigma):
        raise ValueError(f"electronic_noise_sigma must be finite and >= 0, got {electronic_noise_sigma!r}")
    counts = np.asarray(counts)
    if not np.all(np.isfinite(counts)):
        raise ValueError("counts hold non-finite values (NaN or inf)")
    if electronic_noise_sigma == 0.0 and np.any(counts < 0):
        raise ValueError("counts hold negative values; photon counts without electronic noise are >= 0")
    if f == 1.0:
        return counts.astype(np.float64, copy=True)
    base = np.maximum(counts, 0.0) if electronic_noise_sigma > 0 else counts
    low = (1.0 - f) * rng.poisson((f / (1.0 - f)) * base)
    if electronic_noise_sigma > 0:
        low = low + rng.normal(0.0, electronic_noise_sigma * np.sqrt(1.0 - f * f), size=low.shape)
    return low.astype(np.float64, copy=False)


def counts_to_line_integrals(counts: np.ndarray, air_counts: np.ndarray | float,
                             out: np.ndarray | None = None, *,
                             floor: float = COUNT_FLOOR_PHOTONS) -> np.ndarray:
    """``p = -ln(max(n, floor) / N0)`` (float32 result) for finite counts.

    ``air_counts`` is the expected unattenuated count at the same dose (the flat field / air scan),
    positive and broadcastable to ``counts``; ``floor`` is :func:`count_floor` of the counts' dose.
    """
    if floor <= 0:
        raise ValueError("floor must be positive")
    guarded = np.maximum(counts, floor)
    result = np.log(np.asarray(air_counts, dtype=np.float64) / guarded)
    if out is None:
        return result.astype(np.float32)
    out[...] = result
    return out
