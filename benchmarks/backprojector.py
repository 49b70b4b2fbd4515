"""`python -m benchmarks.backprojector`: throughput of the helical WFBP backprojector.

1. GUPS (giga voxel updates per second: voxels x contributing views / s, with the views per voxel
   estimated as in ``benchmarks/__main__.py``: twice the cone's z-reach at half the scan field, in views)
   of the numba backprojector on the demo helical data (the bundled CT, demo protocol), on 2 threads,
   best of ``--repeats`` after a warm-up; optionally (``--torch``) the torch backend on the CPU.
2. Side by side, diffct 2.5.0's torch-backend ``Projector.backproject`` (CPU, float32) on the same
   helical projections and voxel grid, if diffct is installed (it is not a dosebench dependency:
   ``pip install diffct==2.5.0``). It is the matched adjoint of a flat-detector cone projector (no
   rebinning, filtering or aperture weighting), so only the throughput is compared. It is slow on the
   CPU: it runs ``--diffct-views`` views from the middle of the scan and the full-scan time is
   extrapolated per view (printed as such).
3. The paper protocol (512 x 512 over a 420 mm FOV, 1 mm slices every 0.5 mm over 30 cm): one slab
   of the streaming slab plan reconstructed end to end at the full matrix (``reconstruct_streamed``),
   rebinning + filtering timed on 256 views, extrapolated to all slabs of a 30 cm scan (printed as an
   extrapolation). Where a CUDA device is present, the torch backend reconstructs the whole 30 cm paper
   protocol end to end on it (``--device``), measured.

Figures are printed, never asserted. Timings depend on the machine's load: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from dosebench.core.data import sample_ct
from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.core.units import hu_to_mu
from dosebench.core.volume import load_volume
from dosebench.reconstructor.grid import plan_grid
from dosebench.reconstructor.wfbp import (
    DEFAULT_MAX_SLAB_BYTES,
    backproject,
    filter_rows,
    rebin_to_parallel,
    reconstruct_streamed,
    slab_plan,
    streaming_bytes,
)
from dosebench.simulator.projector import forward_project
from dosebench.simulator.synthesis import plan_scan

THREADS = 2


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def views_per_voxel(geometry: HelicalGeometry) -> float:
    reach = geometry.z_reach_mm(geometry.scan_field_radius_mm / 2)
    return 2 * reach / geometry.table_feed_per_turn_mm * geometry.views_per_turn


def best_of(repeats: int, function, *args, **kwargs) -> float:
    function(*args, **kwargs)  # warm-up (numba compiles on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def demo_case():
    volume = load_volume(sample_ct())
    protocol = load_protocol("demo")
    geometry = plan_scan(volume, protocol.scanner)
    mu = hu_to_mu(volume.hu, protocol.photons.mu_water_per_mm)
    line_integrals = forward_project(mu, volume.spacing_mm, geometry)
    return volume, protocol, geometry, line_integrals


def bench_diffct(volume, geometry: HelicalGeometry, line_integrals: np.ndarray, n_views: int) -> float | None:
    """Seconds per view of diffct's torch CPU backprojection onto the same grid (None: not installed)."""
    try:
        import diffct
        import torch
    except ImportError:
        return None
    torch.set_num_threads(THREADS)
    first = max(0, geometry.number_of_views // 2 - n_views // 2)
    views = range(first, first + n_views)
    src = torch.as_tensor(geometry.source_positions_mm(views), dtype=torch.float32)
    beta = torch.as_tensor(geometry.view_angles_rad()[first:first + n_views], dtype=torch.float32)
    distance = geometry.source_to_detector_mm
    detector = src.clone()
    detector[:, 0] -= distance * torch.cos(beta)
    detector[:, 1] -= distance * torch.sin(beta)
    u = torch.stack([-torch.sin(beta), torch.cos(beta), torch.zeros_like(beta)], 1)  # columns: lateral
    v = torch.zeros_like(u)
    v[:, 2] = 1.0  # rows: z
    nx, ny, nz = volume.shape
    sinogram = torch.as_tensor(np.ascontiguousarray(line_integrals[first:first + n_views].transpose(0, 2, 1)))
    projector = diffct.Projector(
        (src, detector, u, v), (nz, ny, nx), (geometry.detector_columns, geometry.detector_rows), beam="cone",
        detector_spacing=(geometry.column_width_at_isocenter_mm * geometry.magnification,
                          geometry.row_height_at_detector_mm),
        voxel_spacing=tuple(float(s) for s in volume.spacing_mm[::-1]), backend="torch", precision="float32")
    start = time.perf_counter()
    projector.backproject(sinogram)
    return (time.perf_counter() - start) / n_views


def paper_protocol() -> None:
    """The paper protocol's time on a 30 cm scan, from one of its streamed slabs measured end to end at
    the full 512 x 512 matrix (read, rebin, filter and backproject the slab's views; projections are
    zeros, as the work does not depend on the values), extrapolated to all slabs by their slices and
    views. The rebinning + filtering of 256 views is timed on its own, so that the backprojection's
    share (and its GUPS on this grid) can be stated."""
    protocol = load_protocol("paper")
    settings = protocol.reconstruction
    scanner = protocol.scanner
    scan_mm = 300.0
    full = HelicalGeometry.covering(scanner, -scan_mm / 2, scan_mm / 2)
    full_plan = plan_grid(full, settings, z_range_mm=(-scan_mm / 2, scan_mm / 2))
    n_t, n_rows = scanner.detector_columns, scanner.detector_rows
    per_view, fixed = streaming_bytes(full)
    native_zs = full_plan.native_zs_mm
    full_slabs = slab_plan(full, n_t, scanner.column_width_at_isocenter_mm, native_zs, per_view,
                           DEFAULT_MAX_SLAB_BYTES - fixed)
    views_read = sum(len(views) for _, views in full_slabs)
    print(f"paper protocol: {scan_mm:.0f} mm scan = {full.number_of_views} views x {n_rows} x {n_t}; output "
          f"{full_plan.shape} ({settings.slice_thickness_mm} mm every {settings.slice_increment_mm} mm), "
          f"{native_zs.size} native slices of {np.diff(native_zs)[0]:.2f} mm in "
          f"{len(full_slabs)} streamed slabs of <= {DEFAULT_MAX_SLAB_BYTES >> 20} MiB ({views_read} views "
          f"read and rebinned in all)")

    def zeros(views: range) -> np.ndarray:
        return np.zeros((len(views), n_rows, n_t), np.float32)

    block = full.model_copy(update={"number_of_views": 256})
    prep_seconds = best_of(1, lambda: filter_rows(rebin_to_parallel(zeros(range(256)), block), settings.kernel,
                                                  settings.cutoff))
    per_view_seconds = prep_seconds / 256
    print(f"  measured: rebinning + filtering {per_view_seconds * 1e3:.2f} ms per view (256 views)")
    z_slice, views = full_slabs[len(full_slabs) // 2]
    zs = native_zs[z_slice]
    reconstruct_streamed(zeros, full, settings, full_plan.xs_mm, full_plan.ys_mm, zs[:2])  # warm-up
    start = time.perf_counter()
    reconstruct_streamed(zeros, full, settings, full_plan.xs_mm, full_plan.ys_mm, zs)
    slab_seconds = time.perf_counter() - start
    backprojection_seconds = max(slab_seconds - per_view_seconds * len(views), 1e-9)
    updates = full_plan.xs_mm.size * full_plan.ys_mm.size * zs.size * views_per_voxel(full)
    print(f"  measured: one slab end to end, 512^2 x {zs.size} native slices from {len(views)} views: "
          f"{slab_seconds:.1f} s, of which backprojection ~{backprojection_seconds:.1f} s "
          f"({updates / backprojection_seconds / 1e9:.2f} GUPS on this grid, corners outside the field included)")
    total = (backprojection_seconds * native_zs.size / zs.size + per_view_seconds * views_read)
    print(f"  extrapolated to 30 cm (all {len(full_slabs)} slabs; not measured end to end): backprojection "
          f"{backprojection_seconds * native_zs.size / zs.size / 60:.1f} min, rebinning + filtering "
          f"{per_view_seconds * views_read / 60:.1f} min: total ~{total / 60:.1f} min per dose level on "
          f"{THREADS} threads")


def paper_protocol_torch(device: str, scan_mm: float = 300.0) -> None:
    """The paper protocol reconstructed end to end by the torch backend on ``device`` (meant for CUDA:
    float32, the backend's default there), measured, not extrapolated: rebinning + filtering of all
    views, then the slab-by-slab backprojection onto 512 x 512 native slices. Projections are zeros
    (the work does not depend on the values); they are made on the host, as a projection store would
    deliver them."""
    from dosebench.reconstructor import wfbp_torch

    protocol = load_protocol("paper")
    settings = protocol.reconstruction
    scanner = protocol.scanner
    geometry = HelicalGeometry.covering(scanner, -scan_mm / 2, scan_mm / 2)
    plan = plan_grid(geometry, settings, z_range_mm=(-scan_mm / 2, scan_mm / 2))
    zs = plan.native_zs_mm
    detector = (scanner.detector_rows, scanner.detector_columns)
    warm = HelicalGeometry.covering(scanner, -0.5, 0.5)  # a short scan first: CUDA start-up, FFT plans
    wfbp_torch.reconstruct(np.zeros((warm.number_of_views, *detector), np.float32), warm, settings,
                           plan.xs_mm, plan.ys_mm, np.array([0.0]), device=device)
    zeros = np.zeros((geometry.number_of_views, *detector), np.float32)
    start = time.perf_counter()
    parallel = wfbp_torch.rebin_and_filter(zeros, geometry, settings, device=device)
    prep_seconds = time.perf_counter() - start
    start = time.perf_counter()
    wfbp_torch.backproject(parallel, geometry, settings, plan.xs_mm, plan.ys_mm, zs, device=device)
    backprojection_seconds = time.perf_counter() - start
    updates = plan.xs_mm.size * plan.ys_mm.size * zs.size * views_per_voxel(geometry)
    name = device
    if device.startswith("cuda"):
        import torch

        name = f"{device} ({torch.cuda.get_device_name(device)})"
    print(f"paper protocol, torch backend on {name}, measured end to end over {scan_mm:g} mm "
          f"({geometry.number_of_views} views, 512^2 x {zs.size} native slices): rebinning + filtering "
          f"{prep_seconds:.1f} s, backprojection {backprojection_seconds:.1f} s "
          f"({updates / backprojection_seconds / 1e9:.2f} GUPS): total {prep_seconds + backprojection_seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--torch", action="store_true", help="also time the torch backend on the CPU")
    parser.add_argument("--diffct-views", type=int, default=24, help="views diffct runs (0: skip)")
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--device", default="auto",
                        help="torch device for the paper protocol's end-to-end run (auto: cuda if available, "
                             "else none; 'cpu' to try the code path, with --device-scan-mm small)")
    parser.add_argument("--device-scan-mm", type=float, default=300.0)
    args = parser.parse_args()

    import numba

    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    print(f"numba threads: {numba.get_num_threads()}; {_load()} (figures taken under this load)")
    volume, protocol, geometry, line_integrals = demo_case()
    settings = protocol.reconstruction
    print(f"demo: bundled CT {volume.shape} at {volume.spacing_mm} mm; {geometry.number_of_views} views x "
          f"{geometry.detector_rows} rows x {geometry.detector_columns} columns")
    parallel = rebin_to_parallel(line_integrals, geometry)
    filter_rows(parallel, settings.kernel, settings.cutoff)
    xs, ys, zs = volume.scanner_coordinates_mm()
    per_voxel = views_per_voxel(geometry)
    updates = volume.hu.size * per_voxel
    seconds = best_of(args.repeats, backproject, parallel, geometry, settings, xs, ys, zs)
    gups = updates / seconds / 1e9
    print(f"numba backprojection: {seconds:.2f} s, {volume.hu.size} voxels x ~{per_voxel:.0f} views: {gups:.3f} GUPS")
    if args.torch:
        from dosebench.reconstructor import wfbp_torch

        start = time.perf_counter()
        wfbp_torch.backproject(parallel, geometry, settings, xs, ys, zs, device="cpu")
        torch_seconds = time.perf_counter() - start
        print(f"torch backend (CPU, float64) backprojection: {torch_seconds:.2f} s: {updates / torch_seconds / 1e9:.3f} GUPS")
    if args.diffct_views > 0:
        per_view = bench_diffct(volume, geometry, line_integrals, args.diffct_views)
        if per_view is None:
            print("diffct: not installed (pip install diffct==2.5.0 to compare)")
        else:
            import diffct

            diffct_seconds = per_view * geometry.number_of_views
            print(f"diffct {diffct.__version__} torch CPU Projector.backproject: {per_view:.3f} s per view on "
                  f"{args.diffct_views} views, extrapolated to all {geometry.number_of_views} views: "
                  f"{diffct_seconds:.0f} s ({updates / diffct_seconds / 1e9:.2e} GUPS by the same count); "
                  f"dosebench numba ({seconds:.2f} s, measured above in this run) is {diffct_seconds / seconds:.0f}x "
                  f"faster")
    print(f"({_load()})")
    if not args.skip_paper:
        paper_protocol()
        print(f"({_load()})")
        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else ""
        if device:
            paper_protocol_torch(device, args.device_scan_mm)
        else:
            print("paper protocol on a GPU: no CUDA device here (the torch backend's time is measured where one is)")


if __name__ == "__main__":
    main()
