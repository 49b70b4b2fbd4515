"""Reconstructor service: grids (FOV, matrix, slice thickness/increment), slab streaming, the torch
backend's parity with numba, and `dosebench reconstruct` on a projection store."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_reconstruction import INSERTS, MU_WATER, PHANTOM, interior, scan

from dosebench.core.protocol import ReconstructionSettings, load_protocol
from dosebench.core.units import mu_to_hu
from dosebench.reconstructor import wfbp
from dosebench.reconstructor.grid import covered_z_range, plan_grid, reconstruct_grid, slice_weights
from dosebench.simulator.phantoms import analytic_line_integrals
from dosebench.simulator.store import create_store

XS = (np.arange(84) - 41.5) * 3.0
YS = (np.arange(66) - 32.5) * 3.0


@pytest.fixture(scope="module")
def short_scan():
    geometry = scan(1.2, "flat", -1, 0.3, z_half=9.0)
    return geometry, analytic_line_integrals(PHANTOM, geometry)


@pytest.fixture(scope="module")
def numba_reference(short_scan):
    geometry, line_integrals = short_scan
    zs = np.arange(-9.0, 9.1, 3.0)
    return zs, wfbp.reconstruct(line_integrals, geometry, ReconstructionSettings(), XS, YS, zs, backend="numba")


def test_slice_profiles():
    native = np.arange(-10.0, 10.01, 0.25)
    out = np.array([-2.0, 0.0, 3.0])
    for profile in ("triangle", "rect"):
        w = slice_weights(native, out, 2.0, profile)
        assert np.allclose(w.sum(axis=1), 1.0)
        assert np.allclose(w @ native, out)  # symmetric profiles keep the slice centre
    tri = slice_weights(native, np.array([0.0]), 2.0, "triangle")[0]
    assert np.isclose(tri[native == 1.0][0], 0.5 * tri.max())  # FWHM = thickness
    assert np.all(tri[np.abs(native) >= 2.0] == 0)
    rect = slice_weights(native, np.array([0.0]), 2.0, "rect")[0]
    assert np.ptp(rect[np.abs(native) < 1.0]) == 0 and np.all(rect[np.abs(native) > 1.0] == 0)


def test_paper_protocol_grid():
    protocol = load_protocol("paper")
    geometry = type(scan(1.0)).covering(protocol.scanner, -20.0, 20.0)
    plan = plan_grid(geometry, protocol.reconstruction)
    assert plan.shape[:2] == (512, 512)
    assert np.isclose(plan.xs_mm[1] - plan.xs_mm[0], 420.0 / 512) and np.isclose(plan.xs_mm.mean(), 0.0)
    assert np.allclose(np.diff(plan.zs_mm), 0.5) and np.allclose(np.diff(plan.native_zs_mm), 0.5)
    lo, hi = covered_z_range(geometry, 1.0)
    assert plan.zs_mm[0] >= lo - 1e-9 and plan.zs_mm[-1] <= hi + 1e-9 and plan.zs_mm[-1] - plan.zs_mm[0] > hi - lo - 0.5
    assert np.allclose(plan.weights[0][plan.weights[0] > 0], [0.25, 0.5, 0.25])  # triangle of FWHM 1 mm
    affine = plan.affine
    assert np.allclose(affine[:3, :3], np.diag([420.0 / 512, 420.0 / 512, 0.5]))
    assert np.allclose(affine[:3, 3], [plan.xs_mm[0], plan.ys_mm[0], plan.zs_mm[0]])


def test_default_settings_keep_the_given_grid(short_scan, numba_reference):
    geometry, line_integrals = short_scan
    zs, reference = numba_reference
    result = reconstruct_grid(line_integrals, geometry, ReconstructionSettings(), default_grid=(XS, YS, zs),
                              backend="numba")
    assert np.array_equal(result.mu_per_mm, reference.mu_per_mm)
    assert result.incomplete_voxels == 0
    assert np.allclose(result.affine[:3, 3], [XS[0], YS[0], zs[0]]) and np.allclose(np.diag(result.affine)[:3], 3.0)


def test_slabs_change_nothing(short_scan, numba_reference):
    """A memory bound that forces one slab per slice gives the same image (numba: bit for bit)."""
    geometry, line_integrals = short_scan
    zs, reference = numba_reference
    parallel = wfbp.rebin_to_parallel(line_integrals, geometry)
    wfbp.filter_rows(parallel, "shepp-logan", 1.0)
    bytes_per_view = parallel.values.shape[1] * parallel.values.shape[2] * 4
    plan = wfbp.slab_plan(geometry, parallel.values.shape[2], parallel.t_spacing_mm, zs, bytes_per_view,
                          bytes_per_view * 10)
    assert len(plan) == zs.size
    sliced = wfbp.backproject(parallel, geometry, ReconstructionSettings(), XS, YS, zs, max_slab_bytes=bytes_per_view * 10)
    assert np.array_equal(sliced.mu_per_mm, reference.mu_per_mm)
    # slices in any order
    shuffled = wfbp.backproject(parallel, geometry, ReconstructionSettings(), XS, YS, zs[::-1])
    assert np.array_equal(shuffled.mu_per_mm[:, :, ::-1], reference.mu_per_mm)


@pytest.mark.parametrize("dtype_name,tolerance_hu", [("float64", 0.01), ("float32", 0.05)])
def test_torch_matches_numba_on_cpu(short_scan, numba_reference, dtype_name, tolerance_hu):
    """Measured: max |torch - numba| = 0.0006 HU (float64) and 0.0065 HU (float32) on this phantom."""
    torch = pytest.importorskip("torch")
    from dosebench.reconstructor import wfbp_torch

    geometry, line_integrals = short_scan
    zs, reference = numba_reference
    result = wfbp_torch.reconstruct(line_integrals, geometry, ReconstructionSettings(), XS, YS, zs, device="cpu",
                                    dtype=getattr(torch, dtype_name), max_slab_bytes=40 << 20)
    assert result.incomplete_voxels == reference.incomplete_voxels == 0
    difference = np.abs(mu_to_hu(result.mu_per_mm, MU_WATER) - mu_to_hu(reference.mu_per_mm, MU_WATER))
    assert difference.max() < tolerance_hu


def test_fused_torch_update_matches_the_plain_one(short_scan, numba_reference):
    """The view update fused by torch.compile (the CUDA default; here compiled for the CPU) gives the
    plain torch update's image. Measured: max difference 0.0004 HU in float32."""
    torch = pytest.importorskip("torch")
    from dosebench.reconstructor import wfbp_torch

    geometry, line_integrals = short_scan
    zs, _ = numba_reference
    parallel = wfbp_torch.rebin_and_filter(line_integrals, geometry, ReconstructionSettings(), device="cpu",
                                           dtype=torch.float32)
    images = [wfbp_torch.backproject(parallel, geometry, ReconstructionSettings(), XS, YS, zs, device="cpu",
                                     dtype=torch.float32, compile_kernels=fused).mu_per_mm for fused in (False, True)]
    assert wfbp_torch._fused_view_update().failure is None  # it compiled, not fell back
    difference = np.abs(mu_to_hu(images[1], MU_WATER) - mu_to_hu(images[0], MU_WATER))
    assert difference.max() < 0.01


@pytest.mark.gpu
def test_torch_on_cuda_matches_numba(short_scan, numba_reference):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from dosebench.reconstructor import wfbp_torch

    geometry, line_integrals = short_scan
    zs, reference = numba_reference
    assert wfbp.resolve_backend("auto") == "torch"
    result = wfbp.reconstruct(line_integrals, geometry, ReconstructionSettings(), XS, YS, zs, backend="auto")
    small_slabs = wfbp_torch.reconstruct(line_integrals, geometry, ReconstructionSettings(), XS, YS, zs,
                                         device="cuda", max_slab_bytes=8 << 20)
    for image in (result, small_slabs):
        difference = np.abs(mu_to_hu(image.mu_per_mm, MU_WATER) - mu_to_hu(reference.mu_per_mm, MU_WATER))
        assert difference.max() < 0.5


def test_backend_choice():
    assert wfbp.resolve_backend("numba") == "numba"
    assert wfbp.resolve_backend("auto") in ("numba", "torch")
    with pytest.raises(ValueError):
        wfbp.resolve_backend("opencl")  # type: ignore[arg-type]


def test_cli_reconstructs_a_store(tmp_path, run_cli):
    geometry = scan(1.0, z_half=12.0)
    store = create_store(str(tmp_path / "line_integrals"), geometry, "line_integrals", views_per_block=64)
    for index in range(store.number_of_blocks):
        store.write_block(index, analytic_line_integrals(PHANTOM, geometry, store.block_views(index)))
    store.finalise()
    out = tmp_path / "recon"
    result = run_cli("reconstruct", "--projections", store.url, "--out", out, "--fov-mm", 252, "--matrix", 84,
                     "--thickness-mm", 6, "--increment-mm", 3, "--kernel", "shepp-logan", "--backend", "numba")
    assert result.returncode == 0, result.stderr
    image = nib.load(str(out / "recon.nii.gz"))
    settings = ReconstructionSettings(fov_mm=252, matrix=84, slice_thickness_mm=6, slice_increment_mm=3)
    plan = plan_grid(geometry, settings)
    assert image.shape == plan.shape and plan.shape[2] >= 2
    assert np.allclose(image.affine, plan.affine) and np.allclose(np.diag(image.affine)[:3], [3.0, 3.0, 3.0])
    assert np.isclose(image.affine[0, 3], -124.5) and np.isclose(image.affine[1, 3], -124.5)
    assert image.header.get_qform(coded=True)[1] == 1
    meta = json.loads((out / "recon.json").read_text())
    assert meta["incomplete_voxels"] == 0 and meta["slice_thickness_mm"] == 6
    hu = np.asarray(image.dataobj, np.float32)
    i, j, k = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    world = np.einsum("ab,b...->a...", image.affine, np.stack([i, j, k, np.ones_like(i)]))
    x, y, z = world[0], world[1], world[2]
    for ellipsoid, truth in INSERTS.values():
        mask = interior(ellipsoid, x, y, z)
        assert mask.sum() > 20
        assert abs(hu[mask].mean() - truth) < 5.0
