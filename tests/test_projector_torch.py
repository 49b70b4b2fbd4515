"""The torch Joseph projector against the numba one: same conventions, same numbers (CPU here; CUDA
when a device is present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.simulator.phantoms import Ellipsoid, voxelize
from dosebench.simulator.projector import forward_project, resolve_backend
from dosebench.simulator.projector_torch import forward_project_torch

MU_WATER = 0.0193
SPACING = (2.0, 2.5, 3.0)
SHAPE = (70, 60, 16)
#: parity bound, as a fraction of the largest line integral (float32 arithmetic in torch, float64 in numba)
PARITY = 1e-4

PHANTOM = [
    Ellipsoid((0.0, 0.0, 0.0), (60.0, 50.0, 30.0), MU_WATER),
    Ellipsoid((20.0, 10.0, 5.0), (15.0, 20.0, 12.0), 0.5 * MU_WATER, angle_rad=0.4),
    Ellipsoid((-25.0, -15.0, -4.0), (12.0, 12.0, 15.0), -0.3 * MU_WATER),
]


def scan(detector_shape: str = "curved", direction: int = 1, start: float = 0.0) -> HelicalGeometry:
    scanner = load_protocol("tiny").scanner.model_copy(update={
        "detector_shape": detector_shape, "rotation_direction": direction, "start_angle_rad": start,
        "row_height_at_isocenter_mm": 2.0, "column_width_at_isocenter_mm": 2.0, "detector_columns": 150,
        "central_column": 74.25})
    return HelicalGeometry.covering(scanner, -20.0, 20.0)


def volume() -> np.ndarray:
    grid = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(SHAPE, SPACING, strict=True)]
    rng = np.random.default_rng(3)
    mu = voxelize(PHANTOM, *grid, SPACING, supersample=2)
    # texture, so interpolation errors would show
    return (mu + 0.002 * rng.random(mu.shape) * (mu > 0)).astype(np.float32)


@pytest.mark.parametrize("detector_shape,direction,start", [("curved", 1, 0.0), ("flat", -1, 1.1)])
def test_torch_cpu_matches_numba(detector_shape, direction, start):
    geometry = scan(detector_shape, direction, start)
    mu = volume()
    # the first views see the slab's end (z clamping), the middle ones the whole phantom
    for views in (range(0, 40), range(geometry.number_of_views // 2, geometry.number_of_views // 2 + 40)):
        reference = forward_project(mu, SPACING, geometry, views, backend="numba")
        result = forward_project_torch(mu, SPACING, geometry, views, device="cpu").numpy()
        assert reference.max() > 50 * MU_WATER
        assert np.abs(result - reference).max() < PARITY * reference.max()
    # and through the dispatching entry point, into a given array
    out = np.empty_like(reference)
    forward_project(mu, SPACING, geometry, views, out=out, backend="torch")
    assert np.abs(out - reference).max() < PARITY * reference.max()


def test_torch_chunking_and_thin_volumes_match_numba():
    geometry = scan()
    mu = volume()[:, :, 7:8].copy()  # one slice: z continues it everywhere
    views = range(100, 130)
    reference = forward_project(mu, SPACING, geometry, views, backend="numba")
    small_chunks = forward_project_torch(mu, SPACING, geometry, views, device="cpu", max_samples=5000).numpy()
    assert np.abs(small_chunks - reference).max() < PARITY * reference.max()


def test_backend_selection():
    assert resolve_backend("numba") == "numba"
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") == ("torch" if torch.cuda.is_available() else "numba")
    with pytest.raises(ValueError):
        resolve_backend("cupy")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_cuda_matches_numba():
    geometry = scan("curved", -1, 0.7)
    mu = volume()
    views = range(geometry.number_of_views // 2, geometry.number_of_views // 2 + 120)
    reference = forward_project(mu, SPACING, geometry, views, backend="numba")
    result = forward_project_torch(mu, SPACING, geometry, views, device="cuda")
    assert result.device.type == "cuda"
    assert np.abs(result.cpu().numpy() - reference).max() < PARITY * reference.max()
    # auto picks the CUDA projector here
    assert np.abs(forward_project(mu, SPACING, geometry, views) - reference).max() < PARITY * reference.max()
