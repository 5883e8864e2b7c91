"""Write a prediction to a file: the one entry point the widget, the napari writer, ``stem-train
predict`` and the baselines share, whichever format the user chose.

It sits above the format modules (SpatialData's table is the ``.h5ad`` layout, so
:mod:`napari_stem.spatialdata_io` builds on :mod:`napari_stem.anndata_io`), so neither imports the other's
writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_stem.anndata_io import prediction_to_anndata, write_h5ad_atomic
from napari_stem.spatialdata_io import write_prediction_zarr
from napari_stem.spots import Spots

#: The formats :func:`write_prediction` writes.
PREDICTION_FORMATS = ("h5ad", "zarr")


def write_prediction(path: str | Path, prediction: Any, spots: Spots, slide: Any = None, format: str = "h5ad") -> Path:
    """Export a prediction as ``.h5ad`` (scanpy's spatial layout, :mod:`napari_stem.anndata_io`), or with
    ``format="zarr"`` as a SpatialData ``.zarr`` folder (:mod:`napari_stem.spatialdata_io`)."""
    if format == "zarr":
        return write_prediction_zarr(path, prediction, spots, slide)
    if format != "h5ad":
        raise ValueError(f"format must be one of {', '.join(PREDICTION_FORMATS)}, got {format!r}")
    return write_h5ad_atomic(prediction_to_anndata(prediction, spots, slide), path)
