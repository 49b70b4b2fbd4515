"""Label maps and their label tables, shared by every segmenter backend and the metrics.

A segmentation is an integer label map (0 = background) plus a table that names each label id and
assigns it to a *group* (a TotalSegmentator part such as ``organs`` or ``vertebrae``; ``tissue`` for the
threshold baseline). Groups are what the cohort figures are aggregated over (see
:func:`dosebench.segmenter.metrics.aggregate`).

The table serialises to JSON as ``{"1": {"name": ..., "group": ...}, ...}`` so it can be stored next to
the NIfTI label map as an artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dosebench.core.errors import InputError

__all__ = ["LabelInfo", "Segmentation", "table_from_json", "table_to_json"]


@dataclass(frozen=True)
class LabelInfo:
    """One label of a label map.

    Attributes
    ----------
    id : int
        The value in the label map (> 0; 0 is background).
    name : str
        A short machine name, e.g. ``liver`` or ``soft_tissue``.
    group : str
        The group the label is aggregated in, e.g. ``organs`` or ``tissue``.
    """

    id: int
    name: str
    group: str


# eq=False: a generated __eq__ would compare the arrays element-wise and raise on ``bool(...)``.
@dataclass(frozen=True, eq=False)
class Segmentation:
    """A label map and the table that describes its labels.

    Attributes
    ----------
    labels : numpy.ndarray
        Integer label map (``uint8`` or ``uint16``), same shape as the segmented image;
        0 is background.
    table : dict[int, LabelInfo]
        Label id -> description. Every non-zero value in ``labels`` should have an entry.
    """

    labels: np.ndarray
    table: dict[int, LabelInfo]

    def __post_init__(self) -> None:
        # Only cheap checks here: scanning the map for unknown ids would cost a pass over the volume.
        dtype = np.asarray(self.labels).dtype
        if dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise InputError(
                f"a label map must be uint8 or uint16, got {dtype}",
                fix="cast it with labels.astype(np.uint16) after checking its values are in 0..65535",
            )
        _check_table(self.table)


def _check_table(table: Mapping[int, LabelInfo]) -> None:
    """Raise :class:`InputError` if a table key is not a positive id equal to its entry's id."""
    for key, info in table.items():
        if not isinstance(info, LabelInfo):
            raise InputError(
                f"label table entry {key!r} is not a LabelInfo", fix="build it with LabelInfo(...)"
            )
        if int(key) != info.id or info.id <= 0:
            raise InputError(
                f"label table key {key!r} does not match a positive LabelInfo id ({info.id})",
                fix="key each entry by its own id; 0 is reserved for background",
            )


def table_to_json(table: Mapping[int, LabelInfo]) -> dict[str, dict[str, str]]:
    """Serialise a label table to a JSON-ready dict.

    Parameters
    ----------
    table : Mapping[int, LabelInfo]
        Label id -> description.

    Returns
    -------
    dict[str, dict[str, str]]
        ``{"<id>": {"name": ..., "group": ...}}``, ordered by id (JSON object keys must be strings).
    """
    _check_table(table)
    return {str(i): {"name": table[i].name, "group": table[i].group} for i in sorted(table)}


def table_from_json(data: Mapping[str, Any]) -> dict[int, LabelInfo]:
    """Rebuild a label table from :func:`table_to_json`'s output.

    Parameters
    ----------
    data : Mapping[str, Any]
        ``{"<id>": {"name": ..., "group": ...}}``.

    Returns
    -------
    dict[int, LabelInfo]
        Label id -> description, ordered by id.

    Raises
    ------
    InputError
        If a key is not a positive integer or an entry lacks ``name`` or ``group``.
    """
    table: dict[int, LabelInfo] = {}
    for key, entry in data.items():
        try:
            label_id = int(key)
            info = LabelInfo(id=label_id, name=str(entry["name"]), group=str(entry["group"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"bad label table entry {key!r}: {entry!r}",
                fix='write entries as {"<id>": {"name": ..., "group": ...}}',
            ) from exc
        table[label_id] = info
    _check_table(table)
    return dict(sorted(table.items()))
