"""Streaming reconstruction: a projection store is reconstructed slab by slab from the view blocks each
slab needs, never read whole, with the working set bounded by ``max_slab_bytes``; the numbers are the
in-memory reconstruction's, bit for bit (the same arithmetic on every view)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from test_reconstruction import PHANTOM, scan

from dosebench.core.protocol import ReconstructionSettings
from dosebench.reconstructor import wfbp
from dosebench.reconstructor.grid import reconstruct_grid
from dosebench.reconstructor.store_io import StoreViews
from dosebench.simulator.phantoms import analytic_line_integrals
from dosebench.simulator.store import ProjectionStore, create_store

XS = (np.arange(84) - 41.5) * 3.0
YS = (np.arange(66) - 32.5) * 3.0
ZS = np.arange(-24.0, 24.1, 3.0)
SETTINGS = ReconstructionSettings(kernel="shepp-logan")


@pytest.fixture(scope="module")
def helical():
    geometry = scan(1.0, z_half=90.0)
    return geometry, analytic_line_integrals(PHANTOM, geometry).astype(np.float32)


@pytest.fixture(scope="module")
def reference(helical):
    """Rebin and filter the whole set, then backproject: the plain, non-streamed pipeline."""
    geometry, line_integrals = helical
    parallel = wfbp.rebin_to_parallel(line_integrals, geometry)
    wfbp.filter_rows(parallel, SETTINGS.kernel, SETTINGS.cutoff)
    return wfbp.backproject(parallel, geometry, SETTINGS, XS, YS, ZS)


def write_store(path, geometry, line_integrals, views_per_block: int = 50) -> ProjectionStore:
    store = create_store(str(path), geometry, "line_integrals", views_per_block=views_per_block)
    for index in range(store.number_of_blocks):
        views = store.block_views(index)
        store.write_block(index, line_integrals[views.start:views.stop])
    store.finalise()
    return store


def test_rebinning_any_split_of_the_views_is_exact(helical):
    geometry, line_integrals = helical
    whole = wfbp.rebin_to_parallel(line_integrals, geometry).values
    for views in (range(0, 37), range(500, 611), range(geometry.number_of_views - 20, geometry.number_of_views)):
        needed = wfbp.fan_views_needed(geometry, views)
        part = wfbp.rebin_views(line_integrals[needed.start:needed.stop], needed.start, views, geometry)
        assert np.array_equal(part.values, whole[views.start:views.stop])
    with pytest.raises(ValueError):  # too few fan views for the rebinning's reach
        wfbp.rebin_views(line_integrals[100:140], 100, range(100, 140), geometry)


def test_in_memory_reconstruction_streams_and_equals_the_plain_pipeline(helical, reference):
    geometry, line_integrals = helical
    result = wfbp.reconstruct(line_integrals, geometry, SETTINGS, XS, YS, ZS, backend="numba")
    assert np.array_equal(result.mu_per_mm, reference.mu_per_mm)
    assert result.incomplete_voxels == reference.incomplete_voxels == 0


def test_store_reconstruction_equals_in_memory_without_reading_it_whole(helical, reference, tmp_path, monkeypatch):
    geometry, line_integrals = helical
    store = write_store(tmp_path / "store", geometry, line_integrals)

    def refuse(self):
        raise AssertionError("read_all called: the store must be streamed")

    calls: list[range] = []
    read_views = ProjectionStore.read_views

    def record(self, views):
        calls.append(views)
        return read_views(self, views)

    monkeypatch.setattr(ProjectionStore, "read_all", refuse)
    monkeypatch.setattr(ProjectionStore, "read_views", record)
    per_view, fixed = wfbp.streaming_bytes(geometry)
    budget = fixed + 400 * per_view  # slabs of at most 400 views: several slabs over this scan
    plan = wfbp.slab_plan(geometry, geometry.detector_columns, geometry.column_width_at_isocenter_mm, ZS,
                          per_view, budget - fixed)
    assert len(plan) >= 3
    result = reconstruct_grid(StoreViews(store), geometry, SETTINGS, default_grid=(XS, YS, ZS), backend="numba",
                              max_slab_bytes=budget)
    # exact: rebinning, filtering (per row) and the kernel do the same arithmetic on every view
    assert np.array_equal(result.mu_per_mm, reference.mu_per_mm)
    # each read is one chunk's fan views (or the part of it not held yet), never the whole set
    middle = geometry.number_of_views // 2
    chunk_fan = len(wfbp.fan_views_needed(geometry, range(middle, middle + wfbp.VIEWS_PER_CHUNK)))
    assert max(len(views) for views in calls) <= chunk_fan
    # each slab reads its views once (slabs overlap in views, so the sum exceeds the scan's views)
    assert sum(len(views) for views in calls) <= sum(len(wfbp.fan_views_needed(geometry, v)) for _, v in plan)


def test_peak_memory_of_the_views_is_bounded(helical, tmp_path):
    """numpy's allocations are traced: the peak stays near ``max_slab_bytes`` plus the output volume,
    well below the projection set (which a read_all would hold, twice with the rebinned copy)."""
    geometry, line_integrals = helical
    store = write_store(tmp_path / "store", geometry, line_integrals)
    set_bytes = line_integrals.nbytes
    per_view, fixed = wfbp.streaming_bytes(geometry)
    budget = fixed + 450 * per_view  # one slice needs about 400 views
    assert budget < set_bytes / 2  # the bound is meaningful: half the set
    output_bytes = XS.size * YS.size * ZS.size * 4 * 6  # image, counts, their unsorted copies, the mask
    block_bytes = 2 * 50 * per_view  # one store block as read (file bytes and array)
    tracemalloc.start()
    try:
        wfbp.reconstruct_streamed(store.read_views, geometry, SETTINGS, XS, YS, ZS, max_slab_bytes=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < budget + output_bytes + block_bytes
    assert peak < set_bytes


def test_a_budget_below_one_slice_is_refused(helical):
    geometry, line_integrals = helical
    with pytest.raises(ValueError, match="max_slab_bytes"):
        wfbp.reconstruct(line_integrals, geometry, SETTINGS, XS, YS, ZS, backend="numba", max_slab_bytes=1 << 16)


def test_torch_backend_reads_a_store_by_view_blocks(tmp_path, monkeypatch):
    """The torch backend slices the store like an array (block by block of views), never read_all."""
    pytest.importorskip("torch")
    geometry = scan(1.2, z_half=9.0)
    line_integrals = analytic_line_integrals(PHANTOM, geometry).astype(np.float32)
    store = write_store(tmp_path / "store", geometry, line_integrals)

    def refuse(self):
        raise AssertionError("read_all called: the store must be streamed")

    monkeypatch.setattr(ProjectionStore, "read_all", refuse)
    zs = np.array([-3.0, 0.0, 3.0])
    from_store = reconstruct_grid(StoreViews(store), geometry, SETTINGS, default_grid=(XS, YS, zs), backend="torch")
    in_memory = reconstruct_grid(line_integrals, geometry, SETTINGS, default_grid=(XS, YS, zs), backend="torch")
    assert np.array_equal(from_store.mu_per_mm, in_memory.mu_per_mm)
