"""Low-dose simulation by Poisson thinning, counts -> line integrals, and the synthesis end to end.

Statistical checks use fixed seeds and tolerances of ``K_SE`` standard errors, each estimated from
the sample itself:

* SE of the sample mean:     sqrt(m2 / N)
* SE of the sample variance: sqrt((m4 - m2^2) / N)   (m2, m4: the sample's central moments; the
  variance of the 2nd sample moment is (mu4 - sigma^4) / N to leading order)

A two-sided 5-SE band has a false-failure probability of ~6e-7 per assertion for a correct
implementation (normal approximation; N >= 2e5 here). Where a plausible bug would shift a statistic,
the tests also assert that the shift is >= ``K_SENSITIVE`` SEs, so that the check is sensitive (the
buggy estimate would land >= 5 SE outside the band).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import PhotonModel, Protocol, load_protocol
from dosebench.core.seeds import Purpose, rng_for
from dosebench.core.units import hu_to_mu
from dosebench.core.volume import Volume
from dosebench.simulator.dose import COUNT_FLOOR_PHOTONS, counts_to_line_integrals, reduce_dose
from dosebench.simulator.photons import air_counts
from dosebench.simulator.projector import forward_project
from dosebench.simulator.synthesis import chunks, simulate_dose, synthesise_counts

K_SE = 5.0
#: a bug's shift must be at least this many SEs: 5 for the band plus 5 to land well outside it
K_SENSITIVE = 10.0

FRACTIONS = [0.05, 0.2, 0.5, 0.8]


# -- helpers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Moments:
    n: int
    mean: float
    var: float  # m2, the (biased) sample variance; the bias m2/N is far below the SE
    se_mean: float
    se_var: float


def moments(x: np.ndarray) -> Moments:
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    mean = float(x.mean())
    c = x - mean
    m2 = float(np.mean(c * c))
    m4 = float(np.mean(c**4))
    return Moments(n, mean, m2, math.sqrt(m2 / n), math.sqrt(max(m4 - m2 * m2, 0.0) / n))


def assert_close(estimate: float, expected: float, se: float, what: str) -> None:
    assert se > 0, f"{what}: zero standard error (degenerate sample)"
    z = (estimate - expected) / se
    assert abs(z) <= K_SE, f"{what}: {estimate:.6g} vs expected {expected:.6g} ({z:+.1f} SE, SE {se:.3g})"


def assert_sensitive(wrong: float, expected: float, se: float, what: str) -> None:
    """The value a plausible bug would give is far outside the acceptance band."""
    assert abs(wrong - expected) >= K_SENSITIVE * se, (
        f"test not sensitive to {what}: {wrong:.6g} vs {expected:.6g} is only "
        f"{abs(wrong - expected) / se:.1f} SE")


# -- 1. thinning of pure Poisson counts -------------------------------------------------------------
N_POISSON = 200_000


@pytest.mark.parametrize("lam", [40.0, 2000.0])
@pytest.mark.parametrize("f", FRACTIONS)
def test_thinned_poisson_has_low_dose_poisson_moments(lam, f):
    n = np.random.default_rng([1, int(lam), int(f * 100)]).poisson(lam, size=N_POISSON).astype(np.float64)
    n_before = n.copy()
    y = reduce_dose(n, f, rng_for(2024, Purpose.DOSE_REDUCTION, f, 0))
    assert y.dtype == np.float64 and y.shape == n.shape
    assert np.array_equal(n, n_before), "reduce_dose modified its input"

    m = moments(y)
    # Zabic: y = (1-f) Poisson(f/(1-f) n) has mean f lam and variance f lam (a Poisson(f lam) at dose f)
    assert_close(m.mean, f * lam, m.se_mean, f"mean at f={f}, lam={lam}")
    assert_close(m.var, f * lam, m.se_var, f"variance at f={f}, lam={lam}")
    # forgetting the (1-f) factor, Poisson(f/(1-f) n): mean f lam / (1-f)
    assert_sensitive(f * lam / (1 - f), f * lam, m.se_mean, "a missing (1-f) factor")
    # naive Poisson(f n): variance f lam + f^2 lam
    assert_sensitive(f * lam + f * f * lam, f * lam, m.se_var, "naive Poisson(f n) resampling")
    # a scaled copy f n: variance f^2 lam
    assert_sensitive(f * f * lam, f * lam, m.se_var, "a scaled copy")

    # not a scaled copy: given n, y - f n has mean 0 and variance (1-f)^2 f/(1-f) n = f(1-f) n,
    # hence Var(y - f n) = f (1-f) lam > 0 (exactly 0 for y = f n)
    d = moments(y - f * n)
    assert_close(d.mean, 0.0, d.se_mean, "mean of y - f n")
    assert_close(d.var, f * (1 - f) * lam, d.se_var, "variance of y - f n")
    assert d.var > K_SENSITIVE * d.se_var

    # values are integer multiples of (1 - f) (rounding error ~ k * 1e-16, k <= ~1e4)
    k = y / (1.0 - f)
    assert np.all(np.abs(k - np.rint(k)) < 1e-6)
    assert np.all(k >= 0)
    assert np.unique(k).size > 5


# -- 2. with electronic noise -----------------------------------------------------------------------
#: larger N than in test 1 so that the f^2 s^2 term at f = 0.2 (1 count^2) is >= 10 SE
N_NOISY = 500_000
LAM_NOISY = 40.0
SIGMA = 5.0


@pytest.mark.parametrize("f", FRACTIONS)
def test_thinning_with_electronic_noise_keeps_the_full_electronic_noise(f):
    rng = np.random.default_rng([2, int(f * 100)])
    n = rng.poisson(LAM_NOISY, size=N_NOISY) + rng.normal(0.0, SIGMA, size=N_NOISY)
    y = reduce_dose(n, f, rng_for(77, Purpose.DOSE_REDUCTION, f, 3), electronic_noise_sigma=SIGMA)
    m = moments(y)
    expected_var = f * LAM_NOISY + SIGMA**2
    assert_close(m.mean, f * LAM_NOISY, m.se_mean, f"mean at f={f}")
    assert_close(m.var, expected_var, m.se_var, f"variance at f={f}")
    # without the added s^2 (1 - f^2) the thinned counts have f lam + f^2 s^2
    assert_sensitive(f * LAM_NOISY + f * f * SIGMA**2, expected_var, m.se_var, "the missing s^2(1-f^2) term")
    # adding s^2 instead of s^2 (1-f^2) gives f lam + s^2 + f^2 s^2: an excess of f^2 s^2, which is
    # resolvable for f >= 0.2 (1 count^2) but not at f = 0.05 (0.06 count^2 ~ 1 SE)
    if f >= 0.2:
        assert_sensitive(expected_var + f * f * SIGMA**2, expected_var, m.se_var,
                         "noise s^2 instead of s^2(1-f^2)")


def test_negative_counts_are_allowed_with_electronic_noise():
    n = np.array([-12.0, -0.5, 0.0, 3.0, 50.0])
    y = reduce_dose(n, 0.5, rng_for(1, Purpose.DOSE_REDUCTION, 0.5, 0), electronic_noise_sigma=4.0)
    assert y.shape == n.shape and np.all(np.isfinite(y))


# -- 3. f == 1 and reproducibility ------------------------------------------------------------------
def test_full_dose_returns_an_unchanged_copy():
    n = np.random.default_rng(3).poisson(100.0, size=(4, 5, 6)).astype(np.float64)
    for sigma in (0.0, 5.0):
        y = reduce_dose(n, 1.0, rng_for(1, Purpose.DOSE_REDUCTION, 1.0, 0), electronic_noise_sigma=sigma)
        assert np.array_equal(y, n)
        assert y.dtype == np.float64
        assert y is not n and not np.shares_memory(y, n)
        y[0, 0, 0] = -1.0
        assert n[0, 0, 0] != -1.0


@pytest.mark.parametrize("sigma", [0.0, 5.0])
def test_same_seed_same_bytes_other_seed_other_values(sigma):
    n = np.random.default_rng(4).poisson(500.0, size=(3, 8, 16)).astype(np.float64)

    def run(seed):
        rng = rng_for(seed, Purpose.DOSE_REDUCTION, 0.3, 0)
        return reduce_dose(n, 0.3, rng, electronic_noise_sigma=sigma)

    first = run(10)
    assert first.tobytes() == run(10).tobytes()
    other = run(11)
    assert not np.array_equal(first, other)
    assert np.mean(first != other) > 0.5  # not a few coincidences: the draws differ


# -- 4. errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("f", [0.0, -0.2, 1.5, 1.0000001, float("nan"), float("inf")])
def test_invalid_dose_fraction_is_refused(f):
    with pytest.raises(ValueError, match="dose fraction"):
        reduce_dose(np.array([10.0, 20.0]), f, rng_for(1, Purpose.DOSE_REDUCTION, 0.5, 0))


def test_negative_counts_without_electronic_noise_are_refused():
    with pytest.raises(ValueError, match="negative"):
        reduce_dose(np.array([10.0, -1.0]), 0.5, rng_for(1, Purpose.DOSE_REDUCTION, 0.5, 0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("sigma", [0.0, 5.0])
def test_non_finite_counts_are_refused(bad, sigma):
    with pytest.raises(ValueError, match="non-finite"):
        reduce_dose(np.array([10.0, bad]), 0.5, rng_for(1, Purpose.DOSE_REDUCTION, 0.5, 0),
                    electronic_noise_sigma=sigma)


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf")])
def test_invalid_electronic_noise_is_refused(sigma):
    with pytest.raises(ValueError, match="electronic_noise_sigma"):
        reduce_dose(np.array([10.0]), 0.5, rng_for(1, Purpose.DOSE_REDUCTION, 0.5, 0),
                    electronic_noise_sigma=sigma)


# -- 5. counts -> line integrals --------------------------------------------------------------------
def test_line_integrals_of_positive_counts_are_minus_log_transmission():
    n0 = 1.0e5
    counts = np.array([n0, 2 * n0, 5.0e4, 1.0, COUNT_FLOOR_PHOTONS, 3.7, 12345.0])
    p = counts_to_line_integrals(counts, n0)
    assert p.dtype == np.float32 and p.shape == counts.shape
    np.testing.assert_allclose(p, -np.log(counts / n0), rtol=1e-6, atol=1e-7)
    assert p[0] == 0.0
    assert p[1] < 0  # more than the air scan: negative, not clipped


def test_starved_rays_give_the_floor_value():
    n0 = 1.0e5
    counts = np.array([0.0, -3.0, -1e6, 0.2, 0.4999])
    p = counts_to_line_integrals(counts, n0)
    floor = np.float32(np.log(n0 / COUNT_FLOOR_PHOTONS))
    assert np.all(np.isfinite(p))
    assert np.all(p == floor)
    assert floor > 0
    # the floor is above every p of a real (>= 1 photon) count
    assert floor > counts_to_line_integrals(np.array([1.0]), n0)[0]


def test_line_integrals_broadcast_air_counts_and_write_in_place():
    rng = np.random.default_rng(5)
    air = rng.uniform(1e3, 1e5, size=(3, 1, 7))
    counts = rng.poisson(air * 0.3, size=(3, 4, 7)).astype(np.float64)
    counts[0, 0, 0] = 0.0
    expected = counts_to_line_integrals(counts, air)
    assert expected.shape == (3, 4, 7) and expected.dtype == np.float32
    np.testing.assert_allclose(expected[0, 1:], -np.log(counts[0, 1:] / air[0]), rtol=1e-6)

    big = np.full((5, 4, 7), -7.0, dtype=np.float32)
    view = big[1:4]
    returned = counts_to_line_integrals(counts, air, out=view)
    assert returned is view
    assert np.array_equal(big[1:4], expected)  # written into the caller's buffer
    assert np.all(big[0] == -7.0) and np.all(big[4] == -7.0)  # nothing outside it


# -- 6. synthesis end to end ------------------------------------------------------------------------
SEED = 20240611
DOSE = 0.25


@dataclass(frozen=True)
class Scan:
    protocol: Protocol
    volume: Volume
    geometry: HelicalGeometry
    p: np.ndarray  # noiseless line integrals of the volume
    air: np.ndarray  # air counts broadcast to the projections' shape
    counts: np.ndarray  # full-dose counts, seed SEED


def water_cube() -> Volume:
    affine = np.diag([10.0, 10.0, 10.0, 1.0])
    return Volume(hu=np.zeros((20, 20, 4), dtype=np.float32), affine=affine, source_affine=affine.copy(),
                  source_shape=(20, 20, 4), source_name="water-cube")


@pytest.fixture(scope="module")
def scan() -> Scan:
    protocol = load_protocol("tiny")
    volume = water_cube()
    z = volume.scanner_coordinates_mm()[2]
    geometry = HelicalGeometry.covering(protocol.scanner, float(z[0]), float(z[-1]))
    mu = hu_to_mu(volume.hu, protocol.photons.mu_water_per_mm)
    p = forward_project(mu, volume.spacing_mm, geometry)
    air = np.broadcast_to(air_counts(protocol.photons, geometry), p.shape)
    counts = synthesise_counts(volume, geometry, protocol.photons, SEED, protocol.views_per_chunk)
    return Scan(protocol, volume, geometry, p, air, counts)


def air_rays(scan: Scan) -> np.ndarray:
    mask = scan.p == 0
    # the scan must hold both rays through the cube and rays that miss it, and many of the latter
    assert 0.2 < mask.mean() < 0.9, f"unexpected air fraction {mask.mean():.2f}"
    return mask


def test_scan_setup_is_what_the_tests_assume(scan):
    g = scan.geometry
    assert scan.counts.shape == (g.number_of_views, g.detector_rows, g.detector_columns)
    assert scan.counts.dtype == np.float32
    assert len(chunks(g, scan.protocol.views_per_chunk)) > 2  # several random-number chunks
    assert g.number_of_views % scan.protocol.views_per_chunk != 0  # and a partial last chunk
    assert scan.protocol.photons.electronic_noise_sigma == 0.0
    assert np.all(scan.air > 1e5)  # Poisson counts well in the normal regime


def test_synthesis_is_reproducible(scan):
    again = synthesise_counts(scan.volume, scan.geometry, scan.protocol.photons, SEED,
                              scan.protocol.views_per_chunk)
    assert again.tobytes() == scan.counts.tobytes()
    other = synthesise_counts(scan.volume, scan.geometry, scan.protocol.photons, SEED + 1,
                              scan.protocol.views_per_chunk)
    assert not np.array_equal(other, scan.counts)
    assert np.mean(other != scan.counts) > 0.9


def test_synthesis_reports_progress(scan):
    reported: list[int] = []
    synthesise_counts(scan.volume, scan.geometry, scan.protocol.photons, SEED, scan.protocol.views_per_chunk,
                      progress=reported.append)
    assert sum(reported) == scan.geometry.number_of_views
    assert len(reported) == len(chunks(scan.geometry, scan.protocol.views_per_chunk))


def test_air_rays_are_poisson_with_the_air_scan_mean(scan):
    # (n - N0) / sqrt(N0) of Poisson(N0): mean 0, variance 1 (N0 > 1e5: skewness N0^-1/2 negligible)
    mask = air_rays(scan)
    n0 = scan.air[mask]
    r = (scan.counts[mask].astype(np.float64) - n0) / np.sqrt(n0)
    m = moments(r)
    assert_close(m.mean, 0.0, m.se_mean, "normalised air residual mean")
    assert_close(m.var, 1.0, m.se_var, "normalised air residual variance")
    # e.g. a bowtie applied twice or missing would move the mean by >> 1e3 SE; a noiseless N0 gives 0
    assert_sensitive(0.0, 1.0, m.se_var, "noiseless counts")


def test_all_rays_are_poisson_about_the_attenuated_mean(scan):
    expected = scan.air * np.exp(-scan.p.astype(np.float64))
    through = scan.p > 0
    # the water cube attenuates: rays through it have clearly fewer counts than the air scan
    assert np.all(expected[through] < scan.air[through])
    assert expected.min() > 1e3
    r = (scan.counts.astype(np.float64) - expected) / np.sqrt(expected)
    for what, sel in (("all rays", slice(None)), ("rays through the cube", through)):
        m = moments(r[sel])
        assert_close(m.mean, 0.0, m.se_mean, f"normalised residual mean, {what}")
        assert_close(m.var, 1.0, m.se_var, f"normalised residual variance, {what}")


def test_simulated_dose_has_low_dose_poisson_statistics(scan):
    photons = scan.protocol.photons
    p_low = simulate_dose(scan.counts, scan.geometry, photons, DOSE, SEED, scan.protocol.views_per_chunk)
    assert p_low.dtype == np.float32 and p_low.shape == scan.counts.shape
    assert np.all(np.isfinite(p_low))
    mask = air_rays(scan)
    fn0 = DOSE * scan.air[mask]
    low = np.exp(-p_low[mask].astype(np.float64)) * fn0
    # thinned counts are Poisson(f N0) in distribution: (y - f N0)/sqrt(f N0) has mean 0, variance 1
    m = moments((low - fn0) / np.sqrt(fn0))
    assert_close(m.mean, 0.0, m.se_mean, "normalised low-dose air residual mean")
    assert_close(m.var, 1.0, m.se_var, "normalised low-dose air residual variance")
    # a scaled copy f n would give variance f (normalised); the air scan at full dose in place of
    # f N0 would move the mean by (1/f - 1) sqrt(f N0) ~ 3e3
    assert_sensitive(DOSE, 1.0, m.se_var, "a scaled copy")


def test_simulated_dose_is_reproducible_and_chunkwise(scan):
    photons = scan.protocol.photons
    vpc = scan.protocol.views_per_chunk
    first = simulate_dose(scan.counts, scan.geometry, photons, DOSE, SEED, vpc)
    assert simulate_dose(scan.counts, scan.geometry, photons, DOSE, SEED, vpc).tobytes() == first.tobytes()
    other = simulate_dose(scan.counts, scan.geometry, photons, DOSE, SEED + 1, vpc)
    assert not np.array_equal(other, first)
    # each chunk depends on its own counts and (seed, purpose, dose, chunk index) only: recomputed
    # alone, out of order, it gives the same bytes (a different views_per_chunk changes the draws
    # legitimately, so it is not compared)
    all_chunks = chunks(scan.geometry, vpc)
    air = air_counts(photons, scan.geometry)
    for index in (len(all_chunks) - 1, 0, len(all_chunks) // 2):
        views = all_chunks[index]
        rng = rng_for(SEED, Purpose.DOSE_REDUCTION, DOSE, index)
        low = reduce_dose(scan.counts[views.start:views.stop], DOSE, rng)
        alone = counts_to_line_integrals(low, DOSE * air[views.start:views.stop])
        assert alone.tobytes() == first[views.start:views.stop].tobytes(), f"chunk {index}"


def test_synthesis_and_dose_reduction_with_electronic_noise(scan):
    # low fluence (air N0 ~ 1e3) so that electronic noise s = 10 matters: full dose N0 + s^2,
    # at f = 0.25: f N0 + s^2 = ~350 against ~256 without the s^2(1-f^2) term. f N0 >= ~250 keeps
    # thinned counts >= 10 SD above the 0.5-photon floor and full-dose counts far from 0.
    sigma = 10.0
    photons = PhotonModel(**(scan.protocol.photons.model_dump()
                             | {"fluence_photons_per_mas_mm2": 750.0, "electronic_noise_sigma": sigma}))
    vpc = scan.protocol.views_per_chunk
    counts = synthesise_counts(scan.volume, scan.geometry, photons, SEED, vpc)
    mask = air_rays(scan)
    n0 = np.broadcast_to(air_counts(photons, scan.geometry), counts.shape)[mask]
    assert n0.min() > 900

    full = moments((counts[mask].astype(np.float64) - n0) / np.sqrt(n0 + sigma**2))
    assert_close(full.mean, 0.0, full.se_mean, "full-dose residual mean")
    assert_close(full.var, 1.0, full.se_var, "full-dose residual variance (N0 + s^2)")
    wrong = float(np.mean(n0 / (n0 + sigma**2)))  # no electronic noise at all
    assert_sensitive(wrong, 1.0, full.se_var, "missing electronic noise in the synthesis")

    p_low = simulate_dose(counts, scan.geometry, photons, DOSE, SEED, vpc)
    fn0 = DOSE * n0
    low = np.exp(-p_low[mask].astype(np.float64)) * fn0
    m = moments((low - fn0) / np.sqrt(fn0 + sigma**2))
    assert_close(m.mean, 0.0, m.se_mean, "low-dose residual mean")
    assert_close(m.var, 1.0, m.se_var, "low-dose residual variance (f N0 + s^2)")
    missing = float(np.mean((fn0 + DOSE**2 * sigma**2) / (fn0 + sigma**2)))
    assert_sensitive(missing, 1.0, m.se_var, "the missing s^2(1-f^2) term")


def test_count_floor_is_half_a_count_step():
    """Thinned counts come in steps of (1 - f) photons: the guard is half a step, at full dose half a photon."""
    from dosebench.simulator.dose import count_floor

    assert count_floor(1.0) == 0.5
    assert count_floor(0.2) == pytest.approx(0.4)
    assert count_floor(0.8) == pytest.approx(0.1)
    # one resampled photon at f = 0.8 (0.2 counts) is kept, not floored to "no photon"
    p = counts_to_line_integrals(np.array([0.0, 0.2]), 100.0, floor=count_floor(0.8))
    assert p[0] == pytest.approx(np.log(100.0 / 0.1), rel=1e-6)
    assert p[1] == pytest.approx(np.log(100.0 / 0.2), rel=1e-6)
    with pytest.raises(ValueError):
        count_floor(0.0)
