"""The one model of a helical CT scan, shared by the simulator and the reconstructor.

Scanner frame (mm): the rotation axis is z; the isocentre is the origin. For image-domain inputs the
scanner frame is the input volume's canonical (RAS-oriented) voxel grid, centred on the volume's centre
(see :mod:`dosebench.core.volume`).

Source position of view ``k`` (``k`` may be fractional)::

    beta_k = start_angle_rad + rotation_direction * 2 pi k / views_per_turn
    S_k    = (R cos beta_k, R sin beta_k, start_z_mm + table_feed_per_turn_mm * k / views_per_turn)

with R = ``source_to_isocenter_mm``. A ray leaves the source at fan angle ``gamma`` measured from the
central ray (which points from the source to the isocentre) towards the lateral direction
``e_l = (-sin beta, cos beta)``; detector columns run along ``e_l`` whatever the rotation direction.
Its in-plane direction is ``-(cos phi, sin phi)`` with the *parallel angle* ``phi = beta - gamma``; the
ray's signed distance from the axis is ``t = R sin gamma = -x sin phi + y cos phi``.

Detector: curved (a cylinder about the source, radius D = ``source_to_detector_mm``, columns
equiangular) or flat (plane at distance D, columns equispaced). Rows are equispaced in z at the
detector. A ray to row offset ``v`` (mm at the detector) climbs ``v / D_gamma`` mm per mm travelled in
plane, where ``D_gamma = D`` (curved) or ``D / cos gamma`` (flat).

Flying focal spot: ``ScannerModel.focal_spot_offsets`` lists the focal spot positions the tube cycles
through; view ``k`` uses ``offsets[k % len(offsets)]`` (:meth:`HelicalGeometry.focal_spot_index`); an
empty list means no flying focal spot. Only the source moves: with offset ``(d_beta, d_z, d_R)`` view
``k``'s actual source is::

    S'_k = ((R + d_R) cos(beta_k + d_beta), (R + d_R) sin(beta_k + d_beta), z_k + d_z)

while the detector stays where the nominal geometry puts it: the element of fan angle ``gamma`` and row
offset ``v`` is at ``S_k + D_gamma (cos gamma e_c + sin gamma e_l) + v e_z`` with ``S_k`` the nominal
focal centre above, ``e_c = -(cos beta_k, sin beta_k, 0)`` and ``D_gamma`` as above
(:meth:`HelicalGeometry.detector_positions_mm`). The ray of an element runs from ``S'_k`` to the
element (:meth:`HelicalGeometry.ray_directions`); with no offsets it is the ray described above. The
angular offset is in this frame's angle (a reader turning its frame converts it).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class FocalSpotOffset(BaseModel):
    """One flying focal spot position, relative to the nominal focal centre of a view (DICOM-CT-PD
    (7033,100B/C/D)). Only the source moves; the detector stays put (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: added to the view's source angle beta (rad)
    angle_rad: float = 0.0
    #: added to the source z (mm)
    axial_mm: float = 0.0
    #: added to the source-to-isocentre distance (mm)
    radial_mm: float = 0.0


class ScannerModel(BaseModel):
    """The fixed part of a helical acquisition: what a protocol file describes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_to_isocenter_mm: float = Field(gt=0)
    source_to_detector_mm: float = Field(gt=0)
    detector_shape: Literal["curved", "flat"] = "curved"
    detector_rows: int = Field(ge=1)
    detector_columns: int = Field(ge=8)
    #: row pitch at the isocentre (the nominal slice collimation of one row)
    row_height_at_isocenter_mm: float = Field(gt=0)
    #: column pitch at the isocentre (for a curved detector: R * angular pitch)
    column_width_at_isocenter_mm: float = Field(gt=0)
    #: detector column (0-based, fractional) hit by the central ray; None = the middle
    central_column: float | None = None
    views_per_turn: int = Field(ge=32)
    #: table feed per turn divided by the total collimation at the isocentre
    pitch: float = Field(gt=0, le=2.0)
    start_angle_rad: float = 0.0
    rotation_direction: Literal[1, -1] = 1
    #: flying focal spot positions, cycled over the views (view k uses [k % len]); [] = none
    focal_spot_offsets: list[FocalSpotOffset] = []

    @model_validator(mode="after")
    def _check(self) -> ScannerModel:
        if self.source_to_detector_mm <= self.source_to_isocenter_mm:
            raise ValueError("source_to_detector_mm must exceed source_to_isocenter_mm")
        if self.views_per_turn % 2:
            raise ValueError("views_per_turn must be even (parallel rebinning pairs views pi apart)")
        return self

    # -- derived quantities -------------------------------------------------------------------------
    @property
    def magnification(self) -> float:
        return self.source_to_detector_mm / self.source_to_isocenter_mm

    @property
    def row_height_at_detector_mm(self) -> float:
        return self.row_height_at_isocenter_mm * self.magnification

    @property
    def collimation_at_isocenter_mm(self) -> float:
        return self.detector_rows * self.row_height_at_isocenter_mm

    @property
    def table_feed_per_turn_mm(self) -> float:
        return self.pitch * self.collimation_at_isocenter_mm

    @property
    def central_column_index(self) -> float:
        if self.central_column is None:
            return (self.detector_columns - 1) / 2.0
        return self.central_column

    @property
    def central_row_index(self) -> float:
        return (self.detector_rows - 1) / 2.0

    @property
    def column_pitch_at_detector(self) -> float:
        """Angular pitch (rad) for a curved detector, mm for a flat one."""
        if self.detector_shape == "curved":
            return self.column_width_at_isocenter_mm / self.source_to_isocenter_mm
        return self.column_width_at_isocenter_mm * self.magnification

    def fan_angles_rad(self) -> np.ndarray:
        """Fan angle gamma of each detector column's centre."""
        offsets = np.arange(self.detector_columns) - self.central_column_index
        if self.detector_shape == "curved":
            return offsets * self.column_pitch_at_detector
        return np.arctan(offsets * self.column_pitch_at_detector / self.source_to_detector_mm)

    def row_offsets_mm(self) -> np.ndarray:
        """Offset v of each row's centre from the central row, mm at the detector (z upwards)."""
        return (np.arange(self.detector_rows) - self.central_row_index) * self.row_height_at_detector_mm

    @property
    def scan_field_radius_mm(self) -> float:
        """Radius of the circle that every view's fan covers (the scan field of view)."""
        gammas = self.fan_angles_rad()
        gamma_max = min(abs(gammas[0]), abs(gammas[-1]))
        return self.source_to_isocenter_mm * math.sin(gamma_max)

    def z_reach_mm(self, radius_mm: float) -> float:
        """Largest |z - z_source| of a point within ``radius_mm`` of the axis that the cone sees."""
        half_height = (self.detector_rows / 2.0) * self.row_height_at_detector_mm
        return half_height * (self.source_to_isocenter_mm + radius_mm) / self.source_to_detector_mm


class HelicalGeometry(ScannerModel):
    """A concrete helical scan: the scanner plus where the helix starts and how many views it has."""

    number_of_views: int = Field(ge=2)
    start_z_mm: float

    def view_angles_rad(self) -> np.ndarray:
        k = np.arange(self.number_of_views, dtype=np.float64)
        return self.start_angle_rad + self.rotation_direction * 2.0 * np.pi * k / self.views_per_turn

    def source_z_mm(self) -> np.ndarray:
        k = np.arange(self.number_of_views, dtype=np.float64)
        return self.start_z_mm + self.table_feed_per_turn_mm * k / self.views_per_turn

    def focal_spot_index(self, views: range | None = None) -> np.ndarray:
        """Index into ``focal_spot_offsets`` (int, per view) of ``views`` (default all); zeros when
        there is no flying focal spot."""
        views = range(self.number_of_views) if views is None else views
        k = np.arange(views.start, views.stop, dtype=np.int64)
        if not self.focal_spot_offsets:
            return np.zeros_like(k)
        return k % len(self.focal_spot_offsets)

    def focal_spot_offsets_of(self, views: range | None = None) -> np.ndarray:
        """Offsets (n, 3) = (angle rad, axial mm, radial mm) of ``views`` (default all); zeros without
        a flying focal spot."""
        views = range(self.number_of_views) if views is None else views
        if not self.focal_spot_offsets:
            return np.zeros((len(views), 3))
        table = np.array([[o.angle_rad, o.axial_mm, o.radial_mm] for o in self.focal_spot_offsets])
        return table[self.focal_spot_index(views)]

    def source_positions_mm(self, views: range | None = None) -> np.ndarray:
        """Actual source positions (n, 3) of ``views`` (default all), flying focal spot included."""
        views = range(self.number_of_views) if views is None else views
        beta = self.view_angles_rad()[views.start:views.stop]
        z = self.source_z_mm()[views.start:views.stop]
        radius = self.source_to_isocenter_mm
        if self.focal_spot_offsets:
            offsets = self.focal_spot_offsets_of(views)
            beta = beta + offsets[:, 0]
            z = z + offsets[:, 1]
            radius = radius + offsets[:, 2]
        return np.stack([radius * np.cos(beta), radius * np.sin(beta), z], axis=-1)

    def focal_centre_positions_mm(self, views: range | None = None) -> np.ndarray:
        """Nominal focal centres (n, 3) of ``views``: where the source would be without a flying focal
        spot, the point the detector is built around."""
        views = range(self.number_of_views) if views is None else views
        beta = self.view_angles_rad()[views.start:views.stop]
        z = self.source_z_mm()[views.start:views.stop]
        radius = self.source_to_isocenter_mm
        return np.stack([radius * np.cos(beta), radius * np.sin(beta), z], axis=-1)

    def _nominal_ray_vectors(self, views: range) -> np.ndarray:
        """(n, rows, columns, 3): from the nominal focal centre to each detector element divided by
        D_gamma, i.e. (cos gamma e_c + sin gamma e_l, v / D_gamma)."""
        beta = self.view_angles_rad()[views.start:views.stop][:, None, None]
        gamma = self.fan_angles_rad()[None, None, :]
        v = self.row_offsets_mm()[None, :, None]
        d_gamma = self.source_to_detector_mm / (np.cos(gamma) if self.detector_shape == "flat" else 1.0)
        ux = -np.cos(gamma) * np.cos(beta) - np.sin(gamma) * np.sin(beta)
        uy = -np.cos(gamma) * np.sin(beta) + np.sin(gamma) * np.cos(beta)
        uz = v / d_gamma
        shape = (beta.shape[0], v.shape[1], gamma.shape[2])
        return np.stack([np.broadcast_to(ux, shape), np.broadcast_to(uy, shape),
                         np.broadcast_to(uz, shape)], axis=-1)

    def detector_positions_mm(self, views: range | None = None) -> np.ndarray:
        """World positions (n, rows, columns, 3) of the detector element centres of ``views`` (default
        all); they follow the nominal focal centre, not the flying focal spot."""
        views = range(self.number_of_views) if views is None else views
        gamma = self.fan_angles_rad()[None, None, :, None]
        d_gamma = self.source_to_detector_mm / (np.cos(gamma) if self.detector_shape == "flat" else 1.0)
        centres = self.focal_centre_positions_mm(views)[:, None, None, :]
        return centres + d_gamma * self._nominal_ray_vectors(views)

    def ray_directions(self, views: range | None = None) -> np.ndarray:
        """Unit direction (n, rows, columns, 3) of every detector element's ray, from the actual
        source to the element: the reference (numpy) statement of the conventions in this module's
        docstring."""
        views = range(self.number_of_views) if views is None else views
        if self.focal_spot_offsets:
            direction = self.detector_positions_mm(views) - self.source_positions_mm(views)[:, None, None, :]
        else:
            direction = self._nominal_ray_vectors(views)
        return direction / np.linalg.norm(direction, axis=-1, keepdims=True)

    @property
    def end_z_mm(self) -> float:
        return self.start_z_mm + self.table_feed_per_turn_mm * (self.number_of_views - 1) / self.views_per_turn

    @classmethod
    def covering(cls, scanner: ScannerModel, z_min_mm: float, z_max_mm: float,
                 radius_mm: float | None = None) -> HelicalGeometry:
        """The shortest helix of ``scanner`` whose data fully cover slices ``z_min_mm..z_max_mm``.

        A slice at z needs every source position within the cone's reach of it (for points up to
        ``radius_mm`` from the axis, default the scan field), plus half a turn either side so that
        each parallel direction has its rays from both sides.
        """
        if z_max_mm < z_min_mm:
            raise ValueError("z_max_mm must not be below z_min_mm")
        radius = scanner.scan_field_radius_mm if radius_mm is None else radius_mm
        margin = scanner.z_reach_mm(radius) + 0.5 * scanner.table_feed_per_turn_mm
        start = z_min_mm - margin
        length = (z_max_mm + margin) - start
        n_views = int(math.ceil(length / scanner.table_feed_per_turn_mm * scanner.views_per_turn)) + 1
        return cls(**scanner.model_dump(), number_of_views=n_views, start_z_mm=start)
