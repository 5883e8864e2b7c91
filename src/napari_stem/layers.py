"""napari LayerData tuples for slides and spots, built without importing napari or Qt.

Every layer napari-stem makes lives in the slide's physical frame: data in µm (or pixels with
``scale`` = µm/px), ``units`` = µm, napari's ``(row, col)`` axis order. Readers, sample data and
the prediction widget all build their layers here so the frames cannot disagree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_stem.slide import Slide
from napari_stem.spots import Spots

LayerData = tuple[Any, dict[str, Any], str]

_UNITS = ("um", "um")


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
