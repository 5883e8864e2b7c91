"""napari LayerData tuples for slides and spots, built without importing napari or Qt.

Every layer napari-stem makes lives in the slide's physical frame: data in µm (or pixels with
``scale`` = µm/px), ``units`` = µm, napari's ``(row, col)`` axis order. Readers, sample data and
the prediction widget all build their layers here so the frames cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_stem.slide import Slide
from napari_stem.spots import Spots

LayerData = tuple[Any, dict[str, Any], str]

_UNITS = ("um", "um")

#: Colormaps of the prediction layers: expression and its uncertainty must not look alike.
PREDICTION_COLORMAPS = {"mean": "viridis", "variance": "magma"}
#: Robust colour range: outlier spots should not wash out the map.
CONTRAST_PERCENTILES = (2.0, 98.0)


@dataclass(frozen=True)
class SlideFrame:
    """How level-0 slide pixels map to napari world coordinates.

    ``world (row, col) = pixel (row, col) × scale + translate``: the slide image layer's own
    transform, so spots drawn with it sit on the slide whatever frame the slide was opened in
    (µm by napari-stem's reader, pixels by others).
    """

    scale: tuple[float, float] = (1.0, 1.0)
    translate: tuple[float, float] = (0.0, 0.0)
    units: tuple[str, str] | None = None

    @classmethod
    def microns(cls, mpp: float | None) -> SlideFrame:
        """napari-stem's frame: µm from the slide origin (pixels when the µm/px is unknown)."""
        return cls((float(mpp), float(mpp)), (0.0, 0.0), _UNITS) if mpp else cls()

    def pixels_to_world(self, centers_px: np.ndarray) -> np.ndarray:
        """``(x, y)`` level-0 pixels (the ``obsm['spatial']`` convention) → world ``(row, col)``."""
        rows_cols = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2)[:, ::-1]
        return rows_cols * np.asarray(self.scale) + np.asarray(self.translate)

    def world_to_pixels(self, world_rc: np.ndarray) -> np.ndarray:
        """World ``(row, col)`` → ``(x, y)`` level-0 pixels."""
        world_rc = np.asarray(world_rc, dtype=np.float64).reshape(-1, 2)
        return ((world_rc - np.asarray(self.translate)) / np.asarray(self.scale))[:, ::-1].copy()

    def length_to_world(self, length_px: float) -> float:
        return float(length_px) * float(np.mean(np.abs(self.scale)))

    def length_to_pixels(self, length_world: float) -> float:
        return float(length_world) / float(np.mean(np.abs(self.scale)))


def slide_layer_data(slide: Slide, name: str | None = None) -> LayerData:
    """A lazy multiscale RGB image layer of the slide, scaled to µm when the pixel size is known."""
    scale = (slide.mpp, slide.mpp) if slide.mpp else (1.0, 1.0)
    kwargs: dict[str, Any] = {
        "name": name or slide.path.stem,
        "rgb": True,
        "multiscale": len(slide.levels) > 1,
        "contrast_limits": (0, 255),
        "scale": scale,
        "metadata": {
            "napari_stem": "slide",
            "path": str(slide.path),
            "mpp": slide.mpp,
            "levels": [tuple(level.shape[:2]) for level in slide.levels],
            "backend": slide.backend,
        },
    }
    if slide.mpp:
        kwargs["units"] = _UNITS
    data = slide.levels if len(slide.levels) > 1 else slide.levels[0]
    return data, kwargs, "image"


def spots_layer_data(spots: Spots, name: str = "spots", features: Any = None) -> LayerData:
    """A Points layer of spots in the slide's µm frame, sized by the spot diameter."""
    import pandas as pd

    if spots.mpp:
        coords, size, extra = spots.napari_coords_um, spots.diameter_um, {"units": _UNITS}
    else:
        coords, size, extra = spots.centers_px[:, ::-1].copy(), spots.diameter_px, {}
    table = spots.obs.reset_index(drop=True) if features is None else features
    table = pd.DataFrame(table).copy()
    table.insert(0, "barcode", np.asarray(spots.barcodes, dtype=str))
    kwargs = {
        "name": name,
        "size": size,
        "features": table,
        "face_color": "transparent",
        "border_color": "#00ffff",
        "border_width": 0.08,
        "border_width_is_relative": True,
        "opacity": 0.9,
        "metadata": {"napari_stem": "spots", "mpp": spots.mpp, "spot_diameter_px": spots.diameter_px},
        **extra,
    }
    return coords, kwargs, "points"


def gene_contrast_limits(values: Any, percentiles: tuple[float, float] = CONTRAST_PERCENTILES) -> tuple[float, float]:
    """Robust colour range of one gene (NaN = not predicted yet, ignored).

    napari keeps the previous column's limits when ``face_color`` switches to another feature, so
    every gene switch and every partial update sets these explicitly.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if not high > low:  # constant gene: centre a tiny range on it so the colour is mid-map
        pad = max(abs(low) * 1e-3, 1e-6)
        low, high = low - pad, high + pad
    return (low, high)


def prediction_values(prediction: Any, kind: str) -> np.ndarray:
    if kind not in PREDICTION_COLORMAPS:
        raise ValueError(f"kind must be one of {', '.join(PREDICTION_COLORMAPS)}, got {kind!r}")
    return np.asarray(prediction.mean if kind == "mean" else prediction.variance)


def prediction_features(prediction: Any, spots: Spots, kind: str) -> Any:
    """One row per spot: ``barcode`` then one column per gene (what napari shows on hover)."""
    import pandas as pd

    values = prediction_values(prediction, kind)
    table = pd.DataFrame(values, columns=[str(g) for g in prediction.genes])
    table.insert(0, "barcode", np.asarray(spots.barcodes, dtype=str))
    return table


def prediction_layer_data(
    prediction: Any,
    spots: Spots,
    kind: str = "mean",
    gene: str | None = None,
    *,
    frame: SlideFrame | None = None,
    name: str | None = None,
    shown: np.ndarray | None = None,
    slide_path: str | None = None,
) -> LayerData:
    """A Points layer of predicted ``kind`` ("mean" or "variance") per spot, coloured by ``gene``.

    Features hold every gene, so switching genes only recolours (no recomputation). The metadata
    keeps the :class:`~napari_stem.sampling.Prediction` and :class:`Spots` behind the layer so the
    writer exports exactly what ``stem-train predict`` writes. ``frame`` defaults to the slide's µm
    frame; ``shown`` hides spots whose values are not in yet (NaN).
    """
    genes = [str(g) for g in prediction.genes]
    gene = gene if gene in genes else (genes[0] if genes else None)
    frame = frame or SlideFrame.microns(spots.mpp)
    features = prediction_features(prediction, spots, kind)
    kwargs: dict[str, Any] = {
        "name": name or kind,
        "size": frame.length_to_world(spots.diameter_px),
        "features": features,
        "face_colormap": PREDICTION_COLORMAPS[kind],
        "border_width": 0,
        "opacity": 1.0,
        "metadata": {
            "napari_stem": "prediction",
            "kind": kind,
            "genes": genes,
            "prediction": prediction,
            "spots": spots,
            "slide_path": slide_path if slide_path is not None else prediction.metadata.get("slide"),
        },
    }
    if gene is not None:
        kwargs["face_color"] = gene
        kwargs["face_contrast_limits"] = gene_contrast_limits(features[gene])
    if shown is not None:
        kwargs["shown"] = np.asarray(shown, dtype=bool)
    if frame.units:
        kwargs["units"] = frame.units
    return frame.pixels_to_world(spots.centers_px), kwargs, "points"
