"""Region selection: which spots lie inside user-drawn shapes.

Shapes come as ``(shape_type, vertices)`` pairs in napari's vocabulary and must be in the same
frame as the spot coordinates (the prediction widget converts both to world coordinates first).
Polygons and rectangles (4 corners, possibly rotated) are tested as polygons; ellipses are tested
analytically, because napari stores an ellipse as the 4 corners of its (possibly rotated or, after
a non-uniform scale, sheared) bounding box, not as an outline. Lines and paths enclose no area and
select nothing. No napari import: this is plain geometry, unit-tested with hand-made spots.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: napari shape types that enclose an area.
AREA_SHAPE_TYPES = ("polygon", "rectangle", "ellipse")


def points_in_polygon(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Boolean mask of ``points`` (n, 2) inside the polygon ``vertices`` (m, 2); same axis order."""
    from skimage.measure import points_in_poly

    points = _as_2d(points)
    vertices = _as_2d(vertices)
    if len(points) == 0 or len(vertices) < 3:
        return np.zeros(len(points), dtype=bool)
    return np.asarray(points_in_poly(points, vertices), dtype=bool)


def points_in_ellipse(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Boolean mask of ``points`` inside an ellipse given as napari stores it.

    ``vertices`` are the 4 corners of the bounding box in order around it (napari's storage), or
    ``(centre, radii)`` as a 2 × 2 array (napari's input form, axis-aligned). With corners
    c0..c3 the ellipse is the affine image of the unit disc: ``centre + s·u + t·v`` with
    ``u = (c1 − c0)/2``, ``v = (c3 − c0)/2`` and ``s² + t² ≤ 1`` — exact for rotated boxes and for
    boxes sheared by a layer transform.
    """
    points = _as_2d(points)
    vertices = _as_2d(vertices)
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    if len(vertices) == 2:
        centre, radii = vertices
        half_axes = np.array([[radii[0], 0.0], [0.0, radii[1]]])
    elif len(vertices) == 4:
        centre = vertices.mean(axis=0)
        half_axes = np.stack([(vertices[1] - vertices[0]) / 2, (vertices[3] - vertices[0]) / 2])
    else:
        raise ValueError(f"an ellipse needs 4 bounding-box corners or (centre, radii), got {len(vertices)} vertices")
    if abs(np.linalg.det(half_axes)) < 1e-12:  # degenerate: no area
        return np.zeros(len(points), dtype=bool)
    # points - centre = [s, t] @ half_axes  →  [s, t] = (points - centre) @ inv(half_axes)
    st = (points - centre) @ np.linalg.inv(half_axes)
    return (st**2).sum(axis=1) <= 1.0


def points_in_shape(points: np.ndarray, shape_type: str, vertices: np.ndarray) -> np.ndarray:
    """Boolean mask of ``points`` inside one napari shape (lines and paths select nothing)."""
    points = _as_2d(points)
    if shape_type == "ellipse":
        return points_in_ellipse(points, vertices)
    if shape_type in ("polygon", "rectangle"):
        return points_in_polygon(points, vertices)
    return np.zeros(len(points), dtype=bool)


def select_in_shapes(points: np.ndarray, shapes: Iterable[tuple[str, np.ndarray]]) -> np.ndarray | None:
    """Union of the area shapes' selections, or ``None`` when there is no area shape (= everything).

    ``shapes`` are ``(shape_type, vertices)`` pairs; ``points`` and vertices share one frame.
    """
    points = _as_2d(points)
    selected = None
    for shape_type, vertices in shapes:
        if shape_type not in AREA_SHAPE_TYPES:
            continue
        inside = points_in_shape(points, shape_type, vertices)
        selected = inside if selected is None else selected | inside
    return selected


def has_area_shapes(shape_types: Sequence[str]) -> bool:
    return any(shape_type in AREA_SHAPE_TYPES for shape_type in shape_types)


def _as_2d(array: np.ndarray) -> np.ndarray:
    """The last two axes (row, col) of napari coordinates, as float (n, 2)."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        if array.size == 0:
            return np.zeros((0, 2))
        raise ValueError(f"expected (n, 2) coordinates, got shape {array.shape}")
    return array[:, -2:]
