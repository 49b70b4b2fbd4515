"""The projection store: chunked per view block, complete only once store.json is written."""

from __future__ import annotations

import numpy as np
import pytest

from dosebench.core.errors import InputError
from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.simulator.store import create_store, open_store


@pytest.fixture
def geometry() -> HelicalGeometry:
    scanner = load_protocol("tiny").scanner.model_copy(update={"detector_rows": 4, "detector_columns": 20})
    return HelicalGeometry.covering(scanner, -3.0, 3.0)


def filled(url: str, geometry: HelicalGeometry, views_per_block: int = 7):
    store = create_store(url, geometry, "line_integrals", views_per_block, attrs={"dose_fraction": 0.5})
    data = np.random.default_rng(0).random(store.shape, dtype=np.float32)
    for index in range(store.number_of_blocks):
        views = store.block_views(index)
        store.write_block(index, data[views.start:views.stop])
    return store, data


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_round_trip_and_partial_reads(tmp_path, geometry, scheme):
    url = str(tmp_path / "store") if scheme == "file" else "memory://dosebench-test/store"
    store, data = filled(url, geometry)
    store.finalise()
    reopened = open_store(url)
    assert reopened.geometry == geometry
    assert reopened.attrs == {"dose_fraction": 0.5}
    assert np.array_equal(reopened.read_all(), data)
    # a range that straddles block boundaries reads just those blocks' views
    views = range(5, 23)
    assert np.array_equal(reopened.read_views(views), data[5:23])
    assert sum(len(v) for v, _ in reopened.iter_blocks()) == geometry.number_of_views


def test_incomplete_store_is_refused(tmp_path, geometry):
    url = str(tmp_path / "store")
    store, _ = filled(url, geometry)
    with pytest.raises(InputError, match="not a complete"):
        open_store(url)  # no store.json yet
    (tmp_path / "store" / "block-000001.npy").unlink()
    with pytest.raises(ValueError, match="never written"):
        store.finalise()


def test_existing_store_is_not_overwritten(tmp_path, geometry):
    url = str(tmp_path / "store")
    store, _ = filled(url, geometry)
    store.finalise()
    with pytest.raises(InputError, match="already exists"):
        create_store(url, geometry, "counts", 7)


def test_wrong_block_shape_is_refused(tmp_path, geometry):
    store = create_store(str(tmp_path / "store"), geometry, "counts", 7)
    with pytest.raises(ValueError, match="shape"):
        store.write_block(0, np.zeros((6, 4, 20), np.float32))
