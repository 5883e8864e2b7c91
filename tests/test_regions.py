"""Region selection (polygon, rectangle, ellipse — also rotated) and the frames spots live in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_stem.plugin.layers import SlideFrame
from napari_stem.regions import points_in_ellipse, points_in_shape, select_in_shapes


def _rotation(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def test_polygon_picks_spots_inside_a_concave_outline() -> None:
    # an L shape: the notch (top right) must not be selected
    outline = np.array([[0, 0], [0, 10], [4, 10], [4, 4], [10, 4], [10, 0]], dtype=float)
    spots = np.array([[1, 1], [2, 8], [8, 2], [8, 8], [5, 5], [-1, 5], [11, 1]], dtype=float)
    inside = points_in_shape(spots, "polygon", outline)
    assert inside.tolist() == [True, True, True, False, False, False, False]


def test_rectangle_axis_aligned_and_rotated() -> None:
    corners = np.array([[0, 0], [0, 20], [10, 20], [10, 0]], dtype=float)  # napari: 4 corners
    spots = np.array([[5, 10], [5, 19], [5, 21], [11, 10]], dtype=float)
    assert points_in_shape(spots, "rectangle", corners).tolist() == [True, True, False, False]
    # rotate the rectangle by 90° about its centre: now 20 tall, 10 wide
    centre = corners.mean(axis=0)
    rotated = (corners - centre) @ _rotation(90).T + centre
    assert points_in_shape(spots, "rectangle", rotated).tolist() == [True, False, False, True]


def test_ellipse_is_analytic_not_its_bounding_box() -> None:
    # napari stores an ellipse as its bounding box: centre (0, 0), semi-axes 10 (rows) and 4 (cols)
    box = np.array([[-10, -4], [-10, 4], [10, 4], [10, -4]], dtype=float)
    spots = np.array([[0, 0], [9.9, 0], [0, 3.9], [9, 3.5], [10.1, 0], [0, 4.1]], dtype=float)
    assert points_in_ellipse(spots, box).tolist() == [True, True, True, False, False, False]
    # the same ellipse in napari's input form (centre, radii)
    assert points_in_ellipse(spots, np.array([[0, 0], [10, 4]])).tolist() == [True, True, True, False, False, False]


def test_rotated_and_sheared_ellipse() -> None:
    box = np.array([[-10, -4], [-10, 4], [10, 4], [10, -4]], dtype=float)
    turn = _rotation(30)
    rotated_box = box @ turn.T + np.array([100, 50])
    # points given in the ellipse's own axes, then rotated the same way
    local = np.array([[9.5, 0], [-9.5, 0], [0, 3.8], [0, -3.8], [0, 5], [7, 3], [0, 0]], dtype=float)
    world = local @ turn.T + np.array([100, 50])
    expected = ((local[:, 0] / 10) ** 2 + (local[:, 1] / 4) ** 2 <= 1).tolist()
    assert expected == [True, True, True, True, False, False, True]
    assert points_in_ellipse(world, rotated_box).tolist() == expected
    # a layer transform with shear/anisotropic scale maps the box to a parallelogram: still exact
    affine = np.array([[2.0, 0.5], [0.0, 0.7]])
    assert points_in_ellipse(world @ affine.T, rotated_box @ affine.T).tolist() == expected


def test_select_in_shapes_union_and_whole_slide() -> None:
    spots = np.array([[0, 0], [20, 20], [50, 50]], dtype=float)
    square = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]], dtype=float)
    circle = np.array([[20, 20], [2, 2]], dtype=float)  # (centre, radii)
    line = np.array([[40, 40], [60, 60]], dtype=float)
    assert select_in_shapes(spots, [("rectangle", square), ("ellipse", circle), ("line", line)]).tolist() == [
        True,
        True,
        False,
    ]
    assert select_in_shapes(spots, []) is None  # no region: every spot
    assert select_in_shapes(spots, [("path", line)]) is None  # no area: nothing to select by
    assert points_in_shape(spots, "line", line).tolist() == [False, False, False]


def test_slide_frame_round_trip() -> None:
    frame = SlideFrame(scale=(0.5, 0.5), translate=(10.0, -3.0), units=("um", "um"))
    centers_px = np.array([[100.0, 40.0], [0.0, 0.0]])  # (x, y)
    world = frame.pixels_to_world(centers_px)
    np.testing.assert_allclose(world, [[40 * 0.5 + 10, 100 * 0.5 - 3], [10, -3]])
    np.testing.assert_allclose(frame.world_to_pixels(world), centers_px)
    assert frame.length_to_world(110) == pytest.approx(55)
    assert SlideFrame.microns(None) == SlideFrame()


def test_h5ad_spots_land_on_their_slide_pixels(synthetic_hest: Path) -> None:
    """A known spot: its napari (row, col) in µm is its obsm['spatial'] pixel (x, y) × µm/px, flipped."""
    import anndata

    from napari_stem.plugin.reader import get_reader

    layers = get_reader(str(synthetic_hest))(str(synthetic_hest))
    (_, image_kwargs, _), (points, points_kwargs, _) = layers
    mpp = image_kwargs["scale"][0]
    adata = anndata.read_h5ad(synthetic_hest / "st" / "SYN000.h5ad")
    index = len(adata) // 2
    x_px, y_px = adata.obsm["spatial"][index]
    np.testing.assert_allclose(points[index], [y_px * mpp, x_px * mpp])
    assert points_kwargs["features"]["barcode"].iloc[index] == adata.obs_names[index]
    # and the slide layer maps that pixel to the same world position
    frame = SlideFrame(scale=image_kwargs["scale"], units=image_kwargs["units"])
    np.testing.assert_allclose(frame.pixels_to_world([[x_px, y_px]])[0], points[index])
