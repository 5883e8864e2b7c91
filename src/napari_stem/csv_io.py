"""A prediction as a CSV table: one row per spot, for spreadsheets and tools without AnnData.

The widget's export and the napari CSV writer both write through :func:`write_prediction_csv`, so
the same prediction gives the same file whichever way it is saved. The write is atomic: a
temporary file next to the target, renamed over it when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_stem.atomic import replace_atomically
from napari_stem.spots import Spots


def prediction_table(prediction: Any, spots: Spots) -> pd.DataFrame:
    """``barcode``, spot annotations, centres in px (and µm), ``mean_<gene>``, ``variance_<gene>``,
    then ``lo90_<gene>``/``hi90_<gene>`` for each interval (named by the level it has, as in the ``.h5ad``)."""
    table = spots.obs.reset_index(drop=True).copy()
    table = table.loc[:, [c for c in table.columns if not str(c).startswith("_") and c != "barcode"]]
    table.insert(0, "barcode", np.asarray(spots.barcodes, dtype=str))
    table["x_px"] = spots.centers_px[:, 0]
    table["y_px"] = spots.centers_px[:, 1]
    if spots.mpp:
        table["x_um"] = spots.centers_um[:, 0]
        table["y_um"] = spots.centers_um[:, 1]
    genes = [str(g) for g in prediction.genes]
    mean = pd.DataFrame(np.asarray(prediction.mean), columns=[f"mean_{g}" for g in genes])
    variance = pd.DataFrame(np.asarray(prediction.variance), columns=[f"variance_{g}" for g in genes])
    intervals = () if prediction.intervals is None else prediction.intervals
    ends = []
    for spec, bounds in zip(prediction.interval_specs or (), intervals, strict=False):
        for layer, values in zip((spec.lower_layer, spec.upper_layer), bounds, strict=True):
            ends.append(pd.DataFrame(np.asarray(values), columns=[f"{layer}_{g}" for g in genes]))
    return pd.concat([table, mean, variance, *ends], axis=1)


def write_prediction_csv(path: str | Path, prediction: Any, spots: Spots) -> Path:
    """Write :func:`prediction_table` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prediction_table(prediction, spots)
    return replace_atomically(path, lambda partial: table.to_csv(partial, index=False))
