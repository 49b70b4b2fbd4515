"""`python -m benchmarks.projector`: forward projector throughput, and the paper protocol's projections.

1. Throughput in ray-voxel samples per second (rays x voxel planes along the dominant axis / s) of
   dosebench's numba Joseph projector (and its torch projector on the CPU) on a helical geometry,
   side by side with diffct 2.5.0's portable torch backend (Siddon) on the CPU, same geometry (flat
   detector, since that is diffct's detector), and their ratio. diffct is not a dependency of
   dosebench: ``make bench`` installs it first; by hand: ``python -m pip install diffct==2.5.0``.
   Both are charged the same sample count per ray (the Joseph count), so the ratio is a ratio of rays/s.
2. The paper protocol (``paper.yaml``): full-dose acquisition plus one dose's line integrals through the
   projection stores, on a synthetic water + bone phantom (512 x 512 x ``--slices`` voxels at 0.8 mm):
   the forward projection's time and the whole simulation's, per view, per turn and for the whole helix,
   and peak memory. By default only the first ``--views`` views are simulated and the time is
   extrapolated linearly to the whole helix (the projector's cost per view is constant); ``--full``
   simulates them all. It runs first, so that the process' peak RSS is its own.

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
    """Best wall time of ``runs`` calls after a warm-up call."""
    return best_of_timed(runs, function, *args, **kwargs)[0]


def best_of_timed(runs: int, function, *args, **kwargs) -> tuple[float, float]:
    """Best wall time and best CPU time (all threads) of ``runs`` calls after a warm-up call. On a
    shared machine the CPU time is the steadier figure: other processes lengthen the wall time."""
    function(*args, **kwargs)  # warm-up: numba compiles / loads its cache, torch allocates
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        function(*args, **kwargs)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


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


def throughput(torch_views: int = 4) -> None:
    """Samples per second of each projector on :func:`comparison_case`, and the ratio to diffct.

    dosebench's numba projector is timed as the best of three runs over the 24 views; the two torch
    CPU projectors (two orders of magnitude slower) once after a warm-up call: dosebench's torch one
    over ``torch_views`` views (its cost is linear in the views), diffct over the same 24 views. Wall
    and CPU time (all threads) are both printed, and both ratios: on a shared machine the CPU-time
    ratio is the steadier one.
    """
    import os

    import numba
    import torch

    mu, spacing, geometry, views = comparison_case()
    planes = max(mu.shape[0], mu.shape[1])
    rays_per_view = geometry.detector_rows * geometry.detector_columns
    rays = len(views) * rays_per_view
    print(f"## projector throughput (CPU: numba {numba.get_num_threads()} threads, "
          f"torch {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f})")
    print(f"volume {mu.shape} at {spacing} mm; flat-detector helix {geometry.detector_rows} x "
          f"{geometry.detector_columns}, {len(views)} views: {rays} rays x {planes} planes = "
          f"{rays * planes / 1e6:.0f} M samples")
    rows: list[tuple[str, float, float, int]] = []  # name, wall s, CPU s, rays
    wall, cpu = best_of_timed(3, forward_project, mu, spacing, geometry, views, backend="numba")
    rows.append(("dosebench numba (Joseph)", wall, cpu, rays))
    reference = forward_project(mu, spacing, geometry, views, backend="numba")
    few = range(views.start, views.start + torch_views)
    wall, cpu = best_of_timed(1, forward_project, mu, spacing, geometry, few, backend="torch")
    rows.append((f"dosebench torch CPU (Joseph, {torch_views} views)", wall, cpu, torch_views * rays_per_view))
    try:
        import diffct
    except ImportError:
        diffct = None
        print(f"diffct is not installed: {INSTALL_HINT}")
    if diffct is not None:
        if diffct.__version__ != DIFFCT_VERSION:
            print(f"note: diffct {diffct.__version__} installed, the comparison was written for {DIFFCT_VERSION}")
        # diffct's cost is not linear in the views (a 1-view warm-up leaves its first full call slow),
        # so it runs the same 24 views: one call as warm-up and geometry check, one timed
        run = diffct_project(mu, spacing, geometry, views)
        theirs = run()
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append((f"diffct {diffct.__version__} torch CPU (Siddon)", wall, cpu, rays))
        print(f"same geometry check: mean |diffct - dosebench| / mean = "
              f"{np.abs(theirs - reference).mean() / reference.mean():.3%} (Siddon vs Joseph, 1.5 mm voxels)")
    for name, wall, cpu, n_rays in rows:
        print(f"  {name:44s} wall {wall:8.3f} s {n_rays * planes / wall / 1e6:9.1f} M samples/s;  "
              f"CPU {cpu:8.3f} s {n_rays * planes / cpu / 1e6:9.1f} M samples/CPU-s")
    if diffct is not None:
        (_, our_wall, our_cpu, our_rays), (_, their_wall, their_cpu, their_rays) = rows[0], rows[2]
        print(f"  ratio dosebench numba / diffct torch CPU: {our_rays / our_wall / (their_rays / their_wall):.1f}x "
              f"(wall), {our_rays / our_cpu / (their_rays / their_cpu):.1f}x (CPU time); "
              f"load average now {os.getloadavg()[0]:.2f}")


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
    """The paper protocol on :func:`paper_phantom`: full-dose synthesis plus one dose, through the stores.

    Prints the forward projection's own time (the calls into the projector, timed) and the whole
    simulation's, per view and extrapolated to the helix, and the peak memory: the largest numpy/Python
    heap during the run (tracemalloc, which sees numpy's buffers) and the process' peak RSS.
    """
    import os
    import tracemalloc

    from dosebench.simulator import synthesis

    protocol = load_protocol("paper")
    volume = paper_phantom(slices)
    full = plan_scan(volume, protocol.scanner)
    geometry = full if views is None else full.model_copy(update={"number_of_views": min(views, full.number_of_views)})
    chunk = min(protocol.views_per_chunk, geometry.number_of_views)
    print(f"## paper protocol (load average {os.getloadavg()[0]:.2f}): phantom {volume.shape} at 0.8 mm "
          f"({volume.hu.nbytes / 2**20:.0f} MiB HU); helix {full.number_of_views} views x {full.detector_rows} rows "
          f"x {full.detector_columns} columns ({full.views_per_turn} views per turn; "
          f"{full.number_of_views * full.detector_rows * full.detector_columns * 4 / 2**30:.1f} GiB per store)")
    projection_s = [0.0]

    def timed_projection(*args, **kwargs):
        start = time.perf_counter()
        result = forward_project(*args, **kwargs)
        projection_s[0] += time.perf_counter() - start
        return result

    forward_project(np.zeros((4, 4, 4), np.float32), (1.0, 1.0, 1.0), geometry, range(0, 1))  # compile / load
    tracemalloc.start()
    synthesis.forward_project = timed_projection
    try:
        with tempfile.TemporaryDirectory(prefix="dosebench-bench-") as tmp:
            counts = create_store(str(Path(tmp) / "counts"), geometry, "counts", chunk)
            thinned = create_store(str(Path(tmp) / "dose"), geometry, "line_integrals", chunk)
            air = air_counts(protocol.photons, geometry)
            start = time.perf_counter()
            for index, block_views, block in synthesise_blocks(volume, geometry, protocol.photons, seed, chunk):
                counts.write_block(index, block)
                thinned.write_block(index, thin_block(block, air[block_views.start:block_views.stop], dose, seed,
                                                      index, protocol.photons.electronic_noise_sigma))
            counts.finalise()
            thinned.finalise()
            seconds = time.perf_counter() - start
    finally:
        synthesis.forward_project = forward_project
        heap_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    n = geometry.number_of_views
    measured = "measured" if n == full.number_of_views else f"measured on the first {n} views, extrapolated"
    for name, total in (("forward projection", projection_s[0]), (f"simulation (full dose + dose {dose})", seconds)):
        per_view = total / n
        print(f"  {name:38s} {total:7.1f} s for {n} views = {per_view * 1e3:6.0f} ms/view; "
              f"{per_view * full.views_per_turn:6.1f} s/turn; whole helix {per_view * full.number_of_views / 60:6.1f} "
              f"min ({measured})")
    print(f"  peak memory: numpy/Python heap {heap_peak / 2**20:.0f} MiB during the run (tracemalloc); process peak "
          f"RSS so far {peak_rss_mb():.0f} MB. Stores stream one {chunk}-view block at a time, so neither grows "
          f"with the number of views")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.projector", description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="phantom slices at 0.8 mm (default 300)")
    parser.add_argument("--views", type=int, default=64, help="views simulated for the paper figure (default 64)")
    parser.add_argument("--full", action="store_true", help="simulate the paper protocol's whole helix")
    parser.add_argument("--skip-paper", action="store_true", help="only the throughput comparison")
    parser.add_argument("--skip-throughput", action="store_true", help="only the paper protocol")
    args = parser.parse_args(argv)
    if not args.skip_paper:  # first, so that the process' peak RSS is the paper run's
        paper(args.slices, None if args.full else args.views)
    if not args.skip_throughput:
        throughput()


if __name__ == "__main__":
    main()
