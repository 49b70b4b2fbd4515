"""Flying focal spot in the scan geometry: only the source moves, the detector stays nominal."""

from __future__ import annotations

import numpy as np
import pytest

from dosebench.core.geometry import FocalSpotOffset, HelicalGeometry


def _geometry(shape: str = "curved", offsets: list[FocalSpotOffset] | None = None,
              direction: int = 1) -> HelicalGeometry:
    return HelicalGeometry(
        source_to_isocenter_mm=595.0, source_to_detector_mm=1085.6, detector_shape=shape,
        detector_rows=8, detector_columns=40, row_height_at_isocenter_mm=1.2,
        column_width_at_isocenter_mm=1.1, views_per_turn=64, pitch=1.0, start_angle_rad=0.3,
        rotation_direction=direction, number_of_views=12, start_z_mm=-5.0,
        focal_spot_offsets=offsets or [])


FFS = [FocalSpotOffset(angle_rad=-1.2e-3, axial_mm=-0.3, radial_mm=-1.5),
       FocalSpotOffset(angle_rad=1.2e-3, axial_mm=0.3, radial_mm=1.5)]


def test_json_round_trip_keeps_the_offsets() -> None:
    g = _geometry(offsets=FFS)
    again = HelicalGeometry.model_validate_json(g.model_dump_json())
    assert again == g
    assert again.focal_spot_offsets == FFS
    assert HelicalGeometry.model_validate(g.model_dump(mode="json")) == g


def test_offset_is_frozen_and_strict() -> None:
    with pytest.raises(ValueError):
        FocalSpotOffset(angle_rad=0.0, lateral_mm=1.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        FFS[0].angle_rad = 0.0  # type: ignore[misc]


def test_focal_spot_index_cycles() -> None:
    g = _geometry(offsets=FFS)
    assert g.focal_spot_index().tolist() == [0, 1] * 6
    assert g.focal_spot_index(range(3, 6)).tolist() == [1, 0, 1]
    assert g.focal_spot_index().dtype.kind == "i"
    assert _geometry().focal_spot_index(range(2, 5)).tolist() == [0, 0, 0]


@pytest.mark.parametrize("shape", ["curved", "flat"])
def test_no_offsets_leaves_everything_unchanged(shape: str) -> None:
    plain = _geometry(shape)
    zero = _geometry(shape, offsets=[FocalSpotOffset()])
    views = range(2, 9)
    # the nominal rays, written out independently of the module (its docstring's formulas)
    beta = plain.view_angles_rad()[2:9][:, None, None]
    gamma = plain.fan_angles_rad()[None, None, :]
    v = plain.row_offsets_mm()[None, :, None]
    d_gamma = plain.source_to_detector_mm / (np.cos(gamma) if shape == "flat" else 1.0)
    u = np.stack(np.broadcast_arrays(-np.cos(gamma) * np.cos(beta) - np.sin(gamma) * np.sin(beta),
                                     -np.cos(gamma) * np.sin(beta) + np.sin(gamma) * np.cos(beta),
                                     v / d_gamma), axis=-1)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    np.testing.assert_allclose(plain.ray_directions(views), u, atol=1e-12)
    np.testing.assert_array_equal(zero.source_positions_mm(views), plain.source_positions_mm(views))
    np.testing.assert_allclose(zero.ray_directions(views), plain.ray_directions(views), atol=1e-12)


@pytest.mark.parametrize("shape", ["curved", "flat"])
@pytest.mark.parametrize("direction", [1, -1])
def test_only_the_source_moves(shape: str, direction: int) -> None:
    plain = _geometry(shape, direction=direction)
    ffs = _geometry(shape, offsets=FFS, direction=direction)
    views = range(1, 7)
    # detector elements are where the nominal geometry puts them
    np.testing.assert_array_equal(ffs.detector_positions_mm(views), plain.detector_positions_mm(views))
    # nominal: element = source + D_gamma * (in-plane unit, v / D_gamma); its distance from the source
    # in plane is D (curved) or D / cos gamma (flat)
    elements = plain.detector_positions_mm(views)
    in_plane = np.linalg.norm(elements[..., :2] - plain.source_positions_mm(views)[:, None, None, :2], axis=-1)
    gamma = plain.fan_angles_rad()
    expected = plain.source_to_detector_mm / (np.cos(gamma) if shape == "flat" else 1.0)
    np.testing.assert_allclose(in_plane, np.broadcast_to(expected, in_plane.shape), rtol=1e-12)
    # actual source: nominal angle + d_beta, radius R + d_R, z + d_z
    source = ffs.source_positions_mm(views)
    index = ffs.focal_spot_index(views)
    beta = plain.view_angles_rad()[1:7]
    for n, k in enumerate(index):
        o = FFS[k]
        radius = plain.source_to_isocenter_mm + o.radial_mm
        np.testing.assert_allclose(source[n], [radius * np.cos(beta[n] + o.angle_rad),
                                               radius * np.sin(beta[n] + o.angle_rad),
                                               plain.source_z_mm()[1 + n] + o.axial_mm], atol=1e-9)
    # rays: unit vectors from the actual source that pass through the nominal element
    directions = ffs.ray_directions(views)
    np.testing.assert_allclose(np.linalg.norm(directions, axis=-1), 1.0, atol=1e-12)
    to_element = elements - source[:, None, None, :]
    cross = np.cross(directions, to_element)
    assert np.abs(cross).max() < 1e-9 * np.abs(to_element).max()
    assert np.all(np.sum(directions * to_element, axis=-1) > 0)
