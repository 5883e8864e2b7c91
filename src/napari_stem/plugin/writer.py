"""npe2 writers: napari-stem prediction layers → ``.h5ad`` (as ``stem-train predict`` writes) or ``.csv``.

The prediction layers (``<gene> mean``, ``<gene> sd`` …) carry the :class:`~napari_stem.values.Prediction` and
:class:`~napari_stem.spots.Spots` behind them in their metadata, so the ``.h5ad`` goes through
:func:`napari_stem.export.write_prediction`: one code path with the CLI. Only spots still in
the layer and already predicted (not NaN, e.g. after a cancelled run) are written; the ``.csv`` goes
through :func:`napari_stem.csv_io.write_prediction_csv`, as the widget's export. Both writes are atomic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import StemError, describe_path


def write_h5ad(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """npe2 multi-layer writer: the prediction behind the given layers, as AnnData."""
    from napari_stem.export import write_prediction

    prediction, spots, slide_path = prediction_from_layers(layer_data, path)
    slide = _open_slide_or_none(slide_path, spots.mpp)
    try:
        written = write_prediction(path, prediction, spots, slide)
    finally:
        if slide is not None:
            slide.close()
    return [str(written)]


def write_csv(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """npe2 multi-layer writer: one row per spot, mean and variance of every gene."""
    from napari_stem.csv_io import write_prediction_csv

    prediction, spots, _ = prediction_from_layers(layer_data, path)
    return [str(write_prediction_csv(path, prediction, spots))]


def prediction_from_layers(
    layer_data: list[tuple[Any, dict, str]], path: str | Path = ""
) -> tuple[Any, Any, str | None]:
    """``(Prediction, Spots, slide path)`` for the spots shown in napari-stem prediction layers.

    Spots removed from the first prediction layer, and spots not predicted yet, are left out.
    """
    found = [meta for _, meta, layer_type in layer_data if layer_type == "points" and _is_prediction(meta)]
    if not found:
        raise StemError(
            f"cannot write {describe_path(path)}: none of the selected layers is a napari-stem prediction "
            "(the 'mean'/'variance' layers of the Predict expression widget or of a re-opened prediction). "
            "Select those layers, or save other layers with napari's own writers."
        )
    meta = found[0]
    metadata = meta["metadata"]
    prediction, spots = metadata["prediction"], metadata["spots"]
    keep = np.isfinite(np.asarray(prediction.mean, dtype=np.float64)).any(axis=1) if len(spots) else np.zeros(0, bool)
    features = meta.get("features")
    if features is not None and "barcode" in features:
        keep &= np.isin(np.asarray(spots.barcodes, dtype=str), np.asarray(features["barcode"], dtype=str))
    if not keep.any():
        raise StemError(f"cannot write {describe_path(path)}: the prediction layers hold no predicted spots yet.")
    if not keep.all():
        prediction, spots = prediction.subset(keep), spots.subset(keep)
    return prediction, spots, metadata.get("slide_path")


def _is_prediction(meta: dict) -> bool:
    metadata = meta.get("metadata") or {}
    return metadata.get("napari_stem") == "prediction" and "prediction" in metadata and "spots" in metadata


def _open_slide_or_none(slide_path: str | None, mpp: float | None) -> Any:
    """The slide for the ``.h5ad`` thumbnail, or None when it is gone (the export still works)."""
    if not slide_path or not Path(slide_path).is_file():
        return None
    from napari_stem.slide import open_slide

    try:
        return open_slide(slide_path, mpp=mpp)
    except StemError:
        return None
