"""`make bench`: throughput of the hot kernels and the demo's wall time and peak memory.

Figures are printed, never asserted. Each kernel is timed after a warm-up call (numba compiles on
first use) as the best of three runs.
"""

from __future__ import annotations

import resource
import time

import numpy as np

from dosebench.core.data import sample_ct
from dosebench.core.protocol import load_protocol
from dosebench.core.units import hu_to_mu
from dosebench.core.volume import load_volume
from dosebench.reconstructor.wfbp import backproject, filter_rows, rebin_to_parallel
from dosebench.simulator.projector import forward_project
from dosebench.simulator.synthesis import plan_scan


def best_of(runs: int, function, *args):
    function(*args)  # warm-up: compile
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import numba

    print(f"numba threads: {numba.get_num_threads()}")
    volume = load_volume(sample_ct())
    protocol = load_protocol("demo")
    geometry = plan_scan(volume, protocol.scanner)
    mu = hu_to_mu(volume.hu, protocol.photons.mu_water_per_mm)
    print(f"bundled CT {volume.shape} at {volume.spacing_mm} mm, demo protocol: {geometry.number_of_views} views "
          f"x {geometry.detector_rows} rows x {geometry.detector_columns} columns")

    seconds = best_of(3, forward_project, mu, volume.spacing_mm, geometry)
    rays = geometry.number_of_views * geometry.detector_rows * geometry.detector_columns
    # Joseph: one bilinear sample per voxel plane crossed along the dominant axis
    samples = rays * max(volume.shape[0], volume.shape[1])
    print(f"forward projection: {seconds:.2f} s, {rays / seconds / 1e6:.1f} Mrays/s, "
          f"{samples / seconds / 1e9:.2f} G ray-plane samples/s (upper bound: every plane visited)")

    line_integrals = forward_project(mu, volume.spacing_mm, geometry)
    parallel = rebin_to_parallel(line_integrals, geometry)
    filter_rows(parallel, protocol.reconstruction.kernel, protocol.reconstruction.cutoff)
    xs, ys, zs = volume.scanner_coordinates_mm()
    seconds = best_of(3, backproject, parallel, geometry, protocol.reconstruction, xs, ys, zs)
    # voxel updates: each voxel visits the views whose cone can reach it (about one turn plus the
    # cone's z-reach, as the kernel's view window)
    reach = geometry.z_reach_mm(geometry.scan_field_radius_mm / 2)
    views_per_voxel = 2 * reach / geometry.table_feed_per_turn_mm * geometry.views_per_turn
    updates = volume.hu.size * views_per_voxel
    print(f"backprojection: {seconds:.2f} s for {volume.hu.size} voxels, ~{views_per_voxel:.0f} views each: "
          f"{updates / seconds / 1e9:.3f} GUPS")

    import tempfile
    from pathlib import Path

    from dosebench.pipeline import RunRequest, run_study

    with tempfile.TemporaryDirectory() as tmp:
        request = RunRequest(input_path=sample_ct(), doses=[1.0, 0.8, 0.6, 0.4, 0.2], protocol=protocol,
                             segmenter="threshold", seed=7, out_dir=Path(tmp) / "demo")
        start = time.perf_counter()
        result = run_study(request)
        wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"demo (5 doses, warm kernels): {wall:.1f} s; peak RSS of this process {peak_mb:.0f} MB")
    for stage, value in result.timings_s.items():
        print(f"  {stage:24s} {value:6.2f} s")
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
