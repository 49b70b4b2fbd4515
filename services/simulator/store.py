"""The projection store: a projection set (views x rows x columns) chunked per view block.

Layout under any fsspec URL (a local folder, ``s3://bucket/prefix``, ``memory://…``)::

    store.json          format, shape, dtype, views per block, quantity, geometry, provenance
    block-000000.npy    views [0, views_per_block)
    block-000001.npy    ...

Blocks are plain ``.npy`` files: readable with numpy alone, one block at a time, so a reconstructor
streams a clinical projection set without ever holding it twice. ``store.json`` is written last and is
what makes a store complete: a reader refuses a folder without it. (Zarr would serve too; .npy blocks
need no further dependency and keep the on-disk format obvious.)
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import fsspec
import numpy as np

from ..core.errors import InputError
from ..core.geometry import HelicalGeometry

FORMAT = "dosebench-projections/1"
Quantity = Literal["counts", "line_integrals"]


def _block_name(index: int) -> str:
    return f"block-{index:06d}.npy"


@dataclass(frozen=True)
class ProjectionStore:
    url: str
    geometry: HelicalGeometry
    quantity: Quantity
    views_per_block: int
    dtype: str
    attrs: dict

    @property
    def shape(self) -> tuple[int, int, int]:
        g = self.geometry
        return (g.number_of_views, g.detector_rows, g.detector_columns)

    @property
    def number_of_blocks(self) -> int:
        return -(-self.shape[0] // self.views_per_block)

    def block_views(self, index: int) -> range:
        start = index * self.views_per_block
        return range(start, min(start + self.views_per_block, self.shape[0]))

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.url)
        return fs, root.rstrip("/")

    # -- writing ---------------------------------------------------------------------------------
    def write_block(self, index: int, values: np.ndarray) -> None:
        views = self.block_views(index)
        expected = (len(views), *self.shape[1:])
        if values.shape != expected:
            raise ValueError(f"block {index} has shape {values.shape}, expected {expected}")
        fs, root = self._fs()
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(values, dtype=self.dtype), allow_pickle=False)
        fs.pipe_file(f"{root}/{_block_name(index)}", buffer.getvalue())

    def finalise(self) -> None:
        """Write ``store.json``: the store is complete from now on."""
        fs, root = self._fs()
        missing = [i for i in range(self.number_of_blocks) if not fs.exists(f"{root}/{_block_name(i)}")]
        if missing:
            raise ValueError(f"cannot finalise {self.url}: blocks {missing[:5]} were never written")
        meta = {"format": FORMAT, "shape": list(self.shape), "dtype": self.dtype, "quantity": self.quantity,
                "views_per_block": self.views_per_block, "geometry": self.geometry.model_dump(mode="json"),
                "attrs": self.attrs}
        fs.pipe_file(f"{root}/store.json", json.dumps(meta, indent=2).encode())

    # -- reading ---------------------------------------------------------------------------------
    def read_block(self, index: int) -> np.ndarray:
        fs, root = self._fs()
        with fs.open(f"{root}/{_block_name(index)}", "rb") as handle:
            values = np.load(io.BytesIO(handle.read()), allow_pickle=False)
        if values.shape != (len(self.block_views(index)), *self.shape[1:]):
            raise InputError(f"block {index} of {self.url} has the wrong shape {values.shape}",
                             fix="the store is corrupt: simulate it again")
        return values

    def iter_blocks(self) -> Iterator[tuple[range, np.ndarray]]:
        for index in range(self.number_of_blocks):
            yield self.block_views(index), self.read_block(index)

    def read_views(self, views: range) -> np.ndarray:
        """Views ``views`` (contiguous), reading only the blocks that hold them."""
        out = np.empty((len(views), *self.shape[1:]), dtype=self.dtype)
        first = views.start // self.views_per_block
        last = (views.stop - 1) // self.views_per_block
        for index in range(first, last + 1):
            block_range = self.block_views(index)
            lo, hi = max(views.start, block_range.start), min(views.stop, block_range.stop)
            out[lo - views.start:hi - views.start] = self.read_block(index)[lo - block_range.start:hi - block_range.start]
        return out

    def read_all(self) -> np.ndarray:
        return self.read_views(range(self.shape[0]))


def create_store(url: str, geometry: HelicalGeometry, quantity: Quantity, views_per_block: int,
                 dtype: str = "float32", attrs: dict | None = None) -> ProjectionStore:
    """A new, empty store at ``url`` (any fsspec URL); refuses to overwrite a complete one."""
    if views_per_block < 1:
        raise ValueError("views_per_block must be >= 1")
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(f"{root.rstrip('/')}/store.json"):
        raise InputError(f"a projection store already exists at {url}", fix="choose another location")
    fs.makedirs(root, exist_ok=True)
    return ProjectionStore(url=url, geometry=geometry, quantity=quantity, views_per_block=views_per_block,
                           dtype=np.dtype(dtype).name, attrs=dict(attrs or {}))


def open_store(url: str) -> ProjectionStore:
    fs, root = fsspec.core.url_to_fs(url)
    meta_path = f"{root.rstrip('/')}/store.json"
    if not fs.exists(meta_path):
        raise InputError(f"{url} is not a complete dosebench projection store (no store.json)",
                         fix="give the folder written by `dosebench simulate`, or simulate again")
    try:
        meta = json.loads(fs.cat_file(meta_path))
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        store = ProjectionStore(url=url, geometry=HelicalGeometry.model_validate(meta["geometry"]),
                                quantity=meta["quantity"], views_per_block=int(meta["views_per_block"]),
                                dtype=meta["dtype"], attrs=meta.get("attrs", {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{url}/store.json is unreadable ({exc})", fix="simulate the projections again") from exc
    if list(store.shape) != meta["shape"]:
        raise InputError(f"{url}: shape in store.json disagrees with its geometry", fix="simulate again")
    return store
