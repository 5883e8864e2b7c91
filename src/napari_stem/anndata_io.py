"""Predictions ⇄ ``.h5ad`` in scanpy's spatial layout.

A written prediction is an AnnData that ``scanpy.pl.spatial(adata, library_id="ST",
img_key="downscaled_fullres")`` draws over the slide thumbnail as is, HEST-style:

* ``X``: predictive mean per spot and gene (the model's target space, e.g. log2(1 + count));
* ``layers['variance']``: sample variance across the diffusion samples — the uncertainty;
  ``layers['lo90']``/``layers['hi90']`` (…): order-statistic prediction intervals, labelled with
  the level they have (:mod:`napari_stem.intervals`), described in ``uns['napari_stem']['intervals_json']``;
  ``layers['median']`` (``interpolated_q<pct>`` for other levels): interpolated quantiles when asked for;
  older files' ``q05``…``q95`` layers are read as interpolated quantiles, never as intervals;
* ``obsm['spatial']``: spot centres (x, y) in full-resolution slide pixels;
* ``uns['spatial']['ST']``: thumbnail and ``spot_diameter_fullres`` / ``tissue_downscaled_fullres_scalef``;
* ``uns['napari_stem']``: provenance (checkpoint, encoder, sampler, steps, samples, seed, slide, µm/px).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.atomic import replace_atomically
from napari_stem.errors import StemError, describe_path
from napari_stem.intervals import IntervalSpec
from napari_stem.spots import Spots

LIBRARY_ID = "ST"
IMAGE_KEY = "downscaled_fullres"
VARIANCE_LAYER = "variance"


def quantile_layer_name(level: float) -> str:
    """'median', else 'interpolated_q25': never a name that reads as an interval's end."""
    if round(float(level), 10) == 0.5:
        return "median"
    return f"interpolated_q{round(level * 100):02d}"


def _quantile_layers(layers: Any) -> dict[float, str]:
    """{level: layer name} of interpolated quantile layers, including older files' 'q05'."""
    found = {}
    for name in layers:
        if name == "median":
            found[0.5] = name
        for prefix in ("interpolated_q", "q"):
            digits = name[len(prefix) :]
            if name.startswith(prefix) and digits.isdigit():
                found[int(digits) / 100] = name
    return found


def read_interval_specs(adata: Any) -> tuple[IntervalSpec, ...]:
    """The order-statistic intervals a prediction AnnData declares in ``uns['napari_stem']``."""
    text = adata.uns.get("napari_stem", {}).get("intervals_json")
    return tuple(IntervalSpec.from_dict(item) for item in json.loads(str(text))) if text else ()


def prediction_to_anndata(prediction: Any, spots: Spots, slide: Any = None, thumbnail_max_size: int = 1000) -> Any:
    """An AnnData of a :class:`~napari_stem.values.Prediction` for ``spots`` (same order)."""
    import anndata
    import pandas as pd

    if prediction.mean.shape[0] != len(spots):
        raise ValueError(f"prediction has {prediction.mean.shape[0]} spots, spots have {len(spots)}")
    obs = spots.obs.copy()
    obs.index = pd.Index(np.asarray(spots.barcodes, dtype=str), name="barcode")
    obs = obs.loc[:, [c for c in obs.columns if not str(c).startswith("_")]]
    var = pd.DataFrame(index=pd.Index(list(prediction.genes), name="gene"))
    adata = anndata.AnnData(X=np.asarray(prediction.mean, dtype=np.float32), obs=obs, var=var)
    adata.layers[VARIANCE_LAYER] = np.asarray(prediction.variance, dtype=np.float32)
    if prediction.quantiles is not None:
        for level, values in zip(prediction.quantile_levels, prediction.quantiles, strict=True):
            adata.layers[quantile_layer_name(level)] = np.asarray(values, dtype=np.float32)
    specs = tuple(getattr(prediction, "interval_specs", ()) or ())
    if specs:
        for spec, (lower, upper) in zip(specs, prediction.intervals, strict=True):
            adata.layers[spec.lower_layer] = np.asarray(lower, dtype=np.float32)
            adata.layers[spec.upper_layer] = np.asarray(upper, dtype=np.float32)
    if prediction.samples is not None:
        adata.obsm["samples"] = np.asarray(prediction.samples, dtype=np.float32).reshape(len(spots), -1)
    adata.obsm["spatial"] = np.asarray(spots.centers_px, dtype=np.float64)

    library: dict[str, Any] = {
        "scalefactors": {"spot_diameter_fullres": float(spots.diameter_px)},
        "metadata": {},
    }
    provenance = {key: _plain(value) for key, value in dict(prediction.metadata).items()}
    if slide is not None:
        thumbnail, scale = slide.thumbnail(thumbnail_max_size)
        library["images"] = {IMAGE_KEY: thumbnail}
        library["scalefactors"]["tissue_downscaled_fullres_scalef"] = float(scale)
        provenance["slide"] = str(slide.path)
    if spots.mpp:
        provenance["mpp"] = float(spots.mpp)
    adata.uns["spatial"] = {LIBRARY_ID: library}
    adata.uns["napari_stem"] = {"provenance_json": json.dumps(provenance), "variance_layer": VARIANCE_LAYER}
    if specs:
        adata.uns["napari_stem"]["intervals_json"] = json.dumps([spec.to_dict() for spec in specs])
    return adata


def write_h5ad_atomic(adata: Any, path: str | Path) -> Path:
    """Write an AnnData so that ``path`` is either untouched or complete, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return replace_atomically(path, lambda partial: adata.write_h5ad(partial, compression="gzip"))


def is_prediction(adata: Any) -> bool:
    return "napari_stem" in adata.uns and VARIANCE_LAYER in adata.layers


def read_prediction(path: str | Path) -> tuple[Any, Spots]:
    """A napari-stem prediction ``.h5ad`` back as ``(Prediction, Spots)``."""
    import anndata

    from napari_stem.spots import spots_from_anndata

    path = Path(path)
    adata = anndata.read_h5ad(path)
    if not is_prediction(adata):
        raise StemError(
            f"{describe_path(path)} is not a napari-stem prediction (no uns['napari_stem'] and "
            f"layers['{VARIANCE_LAYER}']); open it as spots instead."
        )
    prediction = prediction_from_anndata(adata)
    spots = spots_from_anndata(adata, source=path, mpp=prediction.metadata.get("mpp"))
    return prediction, spots


def prediction_from_anndata(adata: Any) -> Any:
    """The :class:`~napari_stem.values.Prediction` a prediction table holds (mean, variance,
    quantile and interval layers, provenance); shared by the ``.h5ad`` and SpatialData readers."""
    from napari_stem.values import Prediction

    provenance = json.loads(adata.uns["napari_stem"]["provenance_json"])
    quantile_layers = _quantile_layers(adata.layers)
    levels = sorted(quantile_layers)
    specs = read_interval_specs(adata)
    prediction = Prediction(
        mean=np.asarray(adata.X, dtype=np.float32),
        variance=np.asarray(adata.layers[VARIANCE_LAYER], dtype=np.float32),
        genes=list(adata.var_names),
        quantile_levels=tuple(levels) or None,
        quantiles=np.stack([adata.layers[quantile_layers[q]] for q in levels]) if levels else None,
        interval_specs=specs,
        intervals=np.stack([[adata.layers[s.lower_layer], adata.layers[s.upper_layer]] for s in specs]).astype(
            np.float32
        )
        if specs
        else None,
        samples=_kept_samples(adata),
        metadata=provenance,
    )
    return prediction


def _kept_samples(adata: Any) -> np.ndarray | None:
    """``obsm['samples']`` (written with ``--keep-samples``) back as (n_spots, K, G), for the spot inspector."""
    if "samples" not in adata.obsm:
        return None
    flat = np.asarray(adata.obsm["samples"], dtype=np.float32)
    n_spots, n_genes = adata.n_obs, adata.n_vars
    if n_genes == 0 or flat.shape[1] % n_genes:
        return None
    return flat.reshape(n_spots, flat.shape[1] // n_genes, n_genes)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
