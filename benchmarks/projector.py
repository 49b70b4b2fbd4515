"""`python -m benchmarks.projector`: forward projector throughput, and the paper protocol's projections.

1. Throughput in ray-voxel samples per second (rays x voxel planes along the dominant axis / s) of
   dosebench's numba Joseph projector (and its torch projector on the CPU) on a helical geometry,
   side by side with diffct 2.5.0's portable torch backend (Siddon) on the CPU, same geometry (flat
   detector, since that is diffct's detector), and their ratio. diffct is not a dependency of
   dosebench: ``make bench`` installs it first; by hand: ``python -m pip install diffct==2.5.0``.
   Both are charged the same sample count per ray (the Joseph count), so the ratio is a ratio of rays/s.
2. The paper protocol (``paper.yaml``): full-dose acquisition plus one dose's line integrals through the
   projection stores, on a synthetic water + bone phantom (512 x 512 x ``--slices`` voxels at 0.8 mm):
   wall time and peak memory. By default only the first ``--views`` views are simulated and the time is
   extrapolated linearly to the whole helix (the projector's cost per view is constant); ``--full``
   simulates them all.

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.core.volume import Volume
from dosebench.simulator.phantoms import Ellipsoid, voxelize
from dosebench.simulator.photons import air_counts
from dosebench.simulator.projector import forward_project
from dosebench.simulator.store import create_store
from dosebench.simulator.synthesis import plan_scan, synthesise_blocks, thin_block

DIFFCT_VERSION = "2.5.0"
INSTALL_HINT = f"python -m pip install diffct=={DIFFCT_VERSION}   (or: make bench)"


def best_of(runs: int, function, *args, **kwargs) -> float:
    function(*args, **kwargs)  # warm-up: numba compiles / loads its cache, torch allocates
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- 1. projector throughput ---------------------------------------------------------------------------

def comparison_case() -> tuple[np.ndarray, tuple[float, float, float], HelicalGeometry, range]:
    """A water ellipse with a bone rod on 160 x 160 x 40 voxels of 1.5 x 1.5 x 2 mm, empty end slices
    (so that dosebench's z continuation and diffct's zero outside the grid agree); a flat-detector
    helix of 24 rows x 256 columns, 360 views per turn, pitch 1; 24 views from its middle."""
    scanner = load_protocol("tiny").scanner.model_copy(update={
        "detector_shape": "flat", "detector_rows": 24, "detector_columns": 256,
        "row_height_at_isocenter_mm": 1.0, "column_width_at_isocenter_mm": 1.2, "views_per_turn": 360,
        "pitch": 1.0})
    shape, spacing = (160, 160, 40), (1.5, 1.5, 2.0)
    grid = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]
    phantom = [Ellipsoid((0.0, 0.0, 0.0), (110.0, 80.0, 30.0), 0.0193),
               Ellipsoid((25.0, -20.0, 0.0), (12.0, 12.0, 30.0), 0.02)]
    mu = voxelize(phantom, *grid, spacing, supersample=2)
    geometry = HelicalGeometry.covering(scanner, -10.0, 10.0)
    middle = geometry.number_of_views // 2
    return mu, spacing, geometry, range(middle, middle + 24)


def diffct_project(mu: np.ndarray, spacing, geometry: HelicalGeometry, views: range):
    """The same rays with diffct's cone-beam Projector (torch backend, float32, CPU)."""
    import diffct
    import torch

    beta = geometry.view_angles_rad()[views.start:views.stop]
    sources = geometry.source_positions_mm(views)
    central = np.stack([-np.cos(beta), -np.sin(beta), np.zeros_like(beta)], axis=1)
    lateral = np.stack([-np.sin(beta), np.cos(beta), np.zeros_like(beta)], axis=1)
    up = np.tile([0.0, 0.0, 1.0], (len(beta), 1))
    du, dv = geometry.column_pitch_at_detector, geometry.row_height_at_detector_mm
    shift = geometry.central_column_index - (geometry.detector_columns - 1) / 2.0
    centres = sources + geometry.source_to_detector_mm * central + shift * du * lateral

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.float32)

    # diffct's volume tensor is (z, y, x), world axes in reverse tensor order
    volume = torch.from_numpy(np.ascontiguousarray(mu.transpose(2, 1, 0)))
    projector = diffct.Projector((as_tensor(sources), as_tensor(centres), as_tensor(lateral), as_tensor(up)),
                                 tuple(volume.shape), (geometry.detector_columns, geometry.detector_rows),
                                 beam="cone", detector_spacing=(du, dv),
                                 voxel_spacing=(spacing[2], spacing[1], spacing[0]),
                                 backend="torch", precision="float32")

    def run():
        with torch.no_grad():
            return projector.project(volume).numpy().transpose(0, 2, 1)

    return run


def throughput() -> None:
    import numba
    import torch

    mu, spacing, geometry, views = comparison_case()
    rays = len(views) * geometry.detector_rows * geometry.detector_columns
    planes = max(mu.shape[0], mu.shape[1])
    samples = rays * planes
    print(f"## projector throughput (CPU: numba {numba.get_num_threads()} threads, "
          f"torch {torch.get_num_threads()} threads)")
    print(f"volume {mu.shape} at {spacing} mm; flat-detector helix {geometry.detector_rows} x "
          f"{geometry.detector_columns}, {len(views)} views: {rays} rays x {planes} planes = {samples / 1e6:.0f} M samples")
    rows = []
    seconds = best_of(3, forward_project, mu, spacing, geometry, views, backend="numba")
    rows.append(("dosebench numba (Joseph)", seconds))
    reference = forward_project(mu, spacing, geometry, views, backend="numba")
    seconds = best_of(1, forward_project, mu, spacing, geometry, views, backend="torch")
    rows.append(("dosebench torch CPU (Joseph)", seconds))
    try:
        import diffct
    except ImportError:
        diffct = None
        print(f"diffct is not installed: {INSTALL_HINT}")
    if diffct is not None:
        if diffct.__version__ != DIFFCT_VERSION:
            print(f"note: diffct {diffct.__version__} installed, the comparison was written for {DIFFCT_VERSION}")
        run = diffct_project(mu, spacing, geometry, views)
        theirs = run()
        seconds = best_of(1, run)
        rows.append((f"diffct {diffct.__version__} torch CPU (Siddon)", seconds))
        print(f"same geometry check: mean |diffct - dosebench| / mean = "
              f"{np.abs(theirs - reference).mean() / reference.mean():.3%} (Siddon vs Joseph, 1.5 mm voxels)")
    for name, seconds in rows:
        print(f"  {name:34s} {seconds:8.3f} s  {rays / seconds / 1e6:8.3f} Mrays/s  "
              f"{samples / seconds / 1e6:9.1f} M samples/s")
    if diffct is not None:
        print(f"  ratio dosebench numba / diffct torch CPU: {rows[2][1] / rows[0][1]:.1f}x")


# -- 2. the paper protocol -----------------------------------------------------------------------------

def paper_phantom(slices: int, spacing_mm: float = 0.8) -> Volume:
    """Water body (350 x 250 mm ellipse) with a spine and two rib-like bone rods, air around, HU."""
    shape = (512, 512, slices)
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2.0) * spacing_mm
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2.0) * spacing_mm
    xx, yy = np.meshgrid(x, y, indexing="ij")
    plane = np.full(shape[:2], -1000.0, dtype=np.float32)
    plane[(xx / 175.0) ** 2 + (yy / 125.0) ** 2 <= 1.0] = 0.0
    for cx, cy, r in ((0.0, 70.0, 20.0), (-120.0, 20.0, 8.0), (120.0, 20.0, 8.0)):
        plane[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = 1000.0
    hu = np.ascontiguousarray(np.repeat(plane[:, :, None], slices, axis=2))
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    return Volume(hu=hu, affine=affine, source_affine=affine, source_shape=shape, source_name="synthetic")


def paper(slices: int, views: int | None, dose: float = 0.2, seed: int = 7) -> None:
    protocol = load_protocol("paper")
    before = peak_rss_mb()
    volume = paper_phantom(slices)
    full = plan_scan(volume, protocol.scanner)
    geometry = full if views is None else full.model_copy(update={"number_of_views": min(views, full.number_of_views)})
    chunk = protocol.views_per_chunk
    print(f"## paper protocol: phantom {volume.shape} at 0.8 mm ({volume.hu.nbytes / 2**20:.0f} MiB HU); helix "
          f"{full.number_of_views} views x {full.detector_rows} rows x {full.detector_columns} columns "
          f"({full.number_of_views * full.detector_rows * full.detector_columns * 4 / 2**30:.1f} GiB per store)")
    with tempfile.TemporaryDirectory(prefix="dosebench-bench-") as tmp:
        counts = create_store(str(Path(tmp) / "counts"), geometry, "counts", chunk)
        thinned = create_store(str(Path(tmp) / "dose"), geometry, "line_integrals", chunk)
        air = air_counts(protocol.photons, geometry)
        forward_project(np.zeros((4, 4, 4), np.float32), (1.0, 1.0, 1.0), geometry, range(0, 1))  # compile
        start = time.perf_counter()
        for index, block_views, block in synthesise_blocks(volume, geometry, protocol.photons, seed, chunk):
            counts.write_block(index, block)
            thinned.write_block(index, thin_block(block, air[block_views.start:block_views.stop], dose, seed, index,
                                                  protocol.photons.electronic_noise_sigma))
        counts.finalise()
        thinned.finalise()
        seconds = time.perf_counter() - start
    per_view = seconds / geometry.number_of_views
    print(f"  simulated {geometry.number_of_views} views (full dose + dose {dose}): {seconds:.1f} s, "
          f"{per_view * 1e3:.0f} ms per view")
    if geometry.number_of_views < full.number_of_views:
        print(f"  extrapolated to all {full.number_of_views} views: {per_view * full.number_of_views / 60:.1f} min "
              f"(run with --full for the measured figure)")
    print(f"  peak RSS {peak_rss_mb():.0f} MB (before the phantom: {before:.0f} MB); stores stream one "
          f"{chunk}-view block at a time, so the peak does not grow with the number of views")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.projector", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="phantom slices at 0.8 mm (default 300)")
    parser.add_argument("--views", type=int, default=64, help="views simulated for the paper figure (default 64)")
    parser.add_argument("--full", action="store_true", help="simulate the paper protocol's whole helix")
    parser.add_argument("--skip-paper", action="store_true", help="only the throughput comparison")
    args = parser.parse_args(argv)
    throughput()
    if not args.skip_paper:
        paper(args.slices, None if args.full else args.views)


if __name__ == "__main__":
    main()
