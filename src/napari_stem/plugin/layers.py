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

#: What a prediction layer can show per spot: the mean, or its uncertainty as sd, variance or the
#: width of its widest interval (:func:`widest_interval`).
KINDS = ("mean", "sd", "variance", "interval width")
#: The uncertainty kinds, for the display switch.
UNCERTAINTY_KINDS = ("sd", "variance", "interval width")
#: Colormaps of the prediction layers: expression and its uncertainty must not look alike.
PREDICTION_COLORMAPS = {"mean": "viridis", "sd": "magma", "variance": "magma", "interval width": "magma"}
#: Robust colour range: outlier spots should not wash out the map.
CONTRAST_PERCENTILES = (2.0, 98.0)
#: Unit of each target transform (``Prediction.metadata['target_transform']``); log counts are ≥ 0.
TARGET_UNITS = {"log2p1": "log2(1+count)", "log1p": "ln(1+count)", "none": "target units"}
LOG_TARGETS = ("log2p1", "log1p")
#: Spots let the tissue show through (the widget's opacity slider changes it).
SPOT_OPACITY = 0.75


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


def gene_contrast_limits(
    values: Any, percentiles: tuple[float, float] = CONTRAST_PERCENTILES, lower_bound: float | None = None
) -> tuple[float, float]:
    """Robust colour range of one gene (NaN = not predicted yet, ignored).

    napari keeps the previous column's limits when ``face_color`` switches to another feature, so
    every gene switch and every partial update sets these explicitly. ``lower_bound`` (0 for log
    counts) keeps the scale from starting below what the quantity can be.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if lower_bound is not None and high > lower_bound:
        low = max(low, lower_bound)
    if not high > low:  # constant gene: centre a tiny range on it so the colour is mid-map
        pad = max(abs(low) * 1e-3, 1e-6)
        low, high = low - pad, high + pad
    return (low, high)


def target_unit(prediction: Any) -> str:
    """The unit of the prediction's values, e.g. ``log2(1+count)``."""
    transform = (getattr(prediction, "metadata", None) or {}).get("target_transform") or "log2p1"
    return TARGET_UNITS.get(str(transform), str(transform))


def kind_unit(kind: str, unit: str) -> str:
    return f"({unit})²" if kind == "variance" else unit


def kind_lower_bound(prediction: Any, kind: str) -> float | None:
    """0 where values cannot be negative: sd and variance always, the mean of log counts."""
    transform = (getattr(prediction, "metadata", None) or {}).get("target_transform") or "log2p1"
    return 0.0 if kind != "mean" or transform in LOG_TARGETS else None


def prediction_values(prediction: Any, kind: str) -> np.ndarray:
    """(n_spots, G) values of ``kind``: the mean, the sample sd or variance, or the interval width
    (NaN when the prediction has no interval: see :func:`has_interval`)."""
    if kind not in PREDICTION_COLORMAPS:
        raise ValueError(f"kind must be one of {', '.join(PREDICTION_COLORMAPS)}, got {kind!r}")
    if kind == "mean":
        return np.asarray(prediction.mean)
    if kind == "interval width":
        interval = widest_interval(prediction)
        return np.full(np.shape(prediction.mean), np.nan) if interval is None else interval[2] - interval[1]
    variance = np.asarray(prediction.variance)
    return np.sqrt(np.clip(variance, 0, None)) if kind == "sd" else variance


def value_column(gene: str, kind: str) -> str:
    """The feature column a layer of ``kind`` is coloured by, e.g. ``"SG0014 mean"``."""
    return f"{gene} {kind}"


def layer_name(gene: str | None, kind: str, prefix: str = "", suffix: str = "") -> str:
    """``"<prefix>SG0014 mean<suffix>"``: names carry the gene and follow the gene picker."""
    return f"{prefix}{gene + ' ' if gene else ''}{kind}{suffix}"


def colorbar_label(gene: str | None, kind: str, unit: str) -> str:
    return f"{gene + ' ' if gene else ''}{kind} · {kind_unit(kind, unit)}"


def widest_interval(prediction: Any) -> tuple[str, np.ndarray, np.ndarray] | None:
    """``(label, lower, upper)`` (n_spots, G) of the prediction's widest interval, or None.

    Recorded order-statistic intervals first; else [min, max] of kept samples, whose honest level
    for K samples is (K − 1)/(K + 1).
    """
    specs = getattr(prediction, "interval_specs", ()) or ()
    intervals = getattr(prediction, "intervals", None)
    if specs and intervals is not None:
        widest = max(range(len(specs)), key=lambda i: specs[i].level)
        return f"{specs[widest].name}%", np.asarray(intervals[widest, 0]), np.asarray(intervals[widest, 1])
    samples = getattr(prediction, "samples", None)
    if samples is not None and np.asarray(samples).shape[1] >= 2:
        samples = np.asarray(samples)
        k = samples.shape[1]
        return f"{round(100 * (k - 1) / (k + 1)):g}%", np.nanmin(samples, axis=1), np.nanmax(samples, axis=1)
    return None


def has_interval(prediction: Any) -> bool:
    return widest_interval(prediction) is not None


def prediction_features(
    prediction: Any, spots: Spots, gene: str | None = None, all_genes: bool = False, kind: str = "mean"
) -> Any:
    """What napari shows on hover, displayed gene first: ``<gene> mean``, ``<gene> sd`` (and the
    ``kind`` shown when it is another), its interval, ``barcode`` — then every gene's mean with
    ``all_genes``.

    Both the mean and the uncertainty layer carry the same table, so hovering either reads
    mean ± sd; each is coloured by its own column.
    """
    import pandas as pd

    genes = [str(g) for g in prediction.genes]
    gene = gene if gene in genes else (genes[0] if genes else None)
    table = pd.DataFrame(index=pd.RangeIndex(len(spots)))
    if gene is not None:
        column = genes.index(gene)
        for shown in dict.fromkeys(("mean", "sd", kind)):
            table[value_column(gene, shown)] = prediction_values(prediction, shown)[:, column]
        interval = widest_interval(prediction)
        if interval is not None:
            label, lower, upper = interval
            low, high = lower[:, column], upper[:, column]
            table[f"{gene} {label} interval"] = [
                "" if not (np.isfinite(a) and np.isfinite(b)) else f"{a:.3g} – {b:.3g}"
                for a, b in zip(low, high, strict=True)
            ]
    table["barcode"] = np.asarray(spots.barcodes, dtype=str)
    if all_genes:
        means = pd.DataFrame(np.asarray(prediction.mean), columns=[f"{g} mean" for g in genes])
        table = pd.concat([table, means.loc[:, [c for c in means.columns if c not in table]]], axis=1)
    return table


def prediction_layer_data(
    prediction: Any,
    spots: Spots,
    kind: str = "mean",
    gene: str | None = None,
    *,
    frame: SlideFrame | None = None,
    prefix: str = "",
    suffix: str = "",
    shown: np.ndarray | None = None,
    slide_path: str | None = None,
    visible: bool = True,
    opacity: float = SPOT_OPACITY,
) -> LayerData:
    """A Points layer of predicted ``kind`` ("mean", "sd" or "variance") per spot for ``gene``.

    Named ``"<prefix><gene> <kind><suffix>"``. Features hold the displayed gene's values (see
    :func:`prediction_features`); switching genes rebuilds them from the
    :class:`~napari_stem.values.Prediction` and :class:`Spots` kept in the metadata (no
    recomputation), which is also what the writer exports, exactly as ``stem-train predict``.
    ``frame`` defaults to the slide's µm frame; ``shown`` hides spots not predicted yet (NaN).
    """
    genes = [str(g) for g in prediction.genes]
    gene = gene if gene in genes else (genes[0] if genes else None)
    frame = frame or SlideFrame.microns(spots.mpp)
    features = prediction_features(prediction, spots, gene, kind=kind)
    unit = target_unit(prediction)
    kwargs: dict[str, Any] = {
        "name": layer_name(gene, kind, prefix, suffix),
        "size": frame.length_to_world(spots.diameter_px),
        "features": features,
        "face_colormap": PREDICTION_COLORMAPS[kind],
        "border_width": 0,
        "opacity": opacity,
        "visible": visible,
        "metadata": {
            "napari_stem": "prediction",
            "kind": kind,
            "gene": gene,
            "unit": unit,
            "name_prefix": prefix,
            "name_suffix": suffix,
            "genes": genes,
            "prediction": prediction,
            "spots": spots,
            "slide_path": slide_path if slide_path is not None else prediction.metadata.get("slide"),
        },
    }
    if gene is not None:
        column = value_column(gene, kind)
        kwargs["face_color"] = column
        kwargs["face_contrast_limits"] = gene_contrast_limits(
            features[column], lower_bound=kind_lower_bound(prediction, kind)
        )
    if shown is not None:
        kwargs["shown"] = np.asarray(shown, dtype=bool)
    if frame.units:
        kwargs["units"] = frame.units
    return frame.pixels_to_world(spots.centers_px), kwargs, "points"
