"""The PNG figures of ``stem-train evaluate`` and ``baseline``.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through
pyplot, so plotting neither depends on nor changes the process's GUI backend (napari's Qt). Each
function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def gene_variation_curves(truth: np.ndarray, prediction: np.ndarray, path: str | Path, title: str = "") -> Path:
    """The reference's 2×2 figure: per-gene mean and variance across spots, truth vs prediction.

    Genes are sorted by the truth's mean (top row) or variance (bottom row); the truth is a line,
    the prediction a scatter in the same order. Left: normalised (value / sum over genes), right:
    absolute. A model that over-smooths shows prediction variances far below the truth line.
    """
    from matplotlib.ticker import MaxNLocator

    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    figure = _figure(10, 7.5)
    axes = figure.subplots(2, 2)
    for row, (statistic, label) in enumerate(((np.mean, "mean"), (np.var, "variance"))):
        truth_values = statistic(truth, axis=0)
        predicted_values = statistic(prediction, axis=0)
        order = np.argsort(truth_values)
        x = np.arange(len(order))
        for column, normalised in enumerate((True, False)):
            axis = axes[row, column]
            t, p = truth_values[order], predicted_values[order]
            if normalised:
                t = t / t.sum() if t.sum() else t
                p = p / p.sum() if p.sum() else p
            axis.plot(x, t, color="black", linewidth=1.5, label="truth")
            axis.scatter(x, p, s=9, color="tab:red", alpha=0.8, label="prediction")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_xlabel(f"genes sorted by truth {label}")
            axis.set_ylabel(f"{'normalised ' if normalised else ''}{label} across spots")
            axis.set_title(f"{'normalised' if normalised else 'absolute'} {label}")
            axis.legend(loc="upper left", fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def pcc_bars(
    genes: Sequence[str], pcc: np.ndarray, path: str | Path, title: str = "", panel_mean: float | None = None
) -> Path:
    """Per-gene PCC, sorted; genes with an undefined PCC (constant) are marked, not hidden."""
    pcc = np.asarray(pcc, dtype=np.float64)
    genes = [str(g) for g in genes]
    finite = np.isfinite(pcc)
    order = [i for i in np.argsort(-np.where(finite, pcc, -np.inf)) if finite[i]] + [
        i for i in range(len(pcc)) if not finite[i]
    ]
    width = min(24.0, max(6.0, 0.18 * len(genes) + 2))
    figure = _figure(width, 4.2)
    axis = figure.subplots()
    x = np.arange(len(order))
    values = np.nan_to_num(pcc[order], nan=0.0)
    colours = ["tab:blue" if finite[i] else "lightgrey" for i in order]
    axis.bar(x, values, color=colours, width=0.85)
    nan_x = [position for position, i in enumerate(order) if not finite[i]]
    if nan_x:
        axis.scatter(
            nan_x,
            np.zeros(len(nan_x)),
            marker="x",
            color="tab:red",
            zorder=3,
            label=f"undefined PCC ({len(nan_x)} gene{'' if len(nan_x) == 1 else 's'})",
        )
    if panel_mean is not None and np.isfinite(panel_mean):
        axis.axhline(panel_mean, color="black", linestyle="--", linewidth=1, label=f"fixed-panel mean {panel_mean:.3f}")
    axis.axhline(0, color="grey", linewidth=0.6)
    if len(genes) <= 80:
        axis.set_xticks(x)
        axis.set_xticklabels([genes[i] for i in order], rotation=90, fontsize=7)
    else:
        axis.set_xlabel(f"{len(genes)} genes, sorted by PCC")
    axis.set_ylabel("Pearson r across spots")
    axis.set_ylim(min(-0.2, float(values.min()) - 0.05), 1.2)  # headroom for the legend
    axis.set_title(title or "per-gene PCC")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper right", fontsize=8)
    return _save(figure, path)


def calibration_plot(curves: dict, path: str | Path, title: str = "") -> Path:
    """Stated vs empirical coverage of central intervals; the diagonal is perfect calibration.

    Order-statistic intervals and the file's written intervals are drawn at their exact levels;
    interpolated quantile intervals at the nominal level they would be read as (too narrow for few
    samples, so they show what a reader of q05-q95 would be misled by).
    """
    figure = _figure(4.8, 4.6)
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    nominal = curves.get("nominal", [])
    styles = {
        "empirical_rank": ("tab:blue", "rank (PIT) intervals"),
        "empirical_quantile_interval": ("tab:orange", "interpolated quantiles, at nominal level"),
    }
    for key, (colour, label) in styles.items():
        if curves.get(key) and len(curves[key]) == len(nominal):  # wide and pale: visible under equal curves
            axis.plot(
                nominal, curves[key], marker="o", color=colour, label=label, linewidth=4, markersize=9, alpha=0.45
            )
    exact = curves.get("order_statistic") or {}
    if exact.get("level"):
        axis.plot(exact["level"], exact["coverage"], marker="s", color="tab:green", label="order-statistic intervals")
    written = curves.get("written") or {}
    if written.get("level"):
        axis.scatter(
            written["level"],
            written["coverage"],
            marker="*",
            s=160,
            color="black",
            zorder=5,
            label="written intervals (as labelled)",
        )
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("stated level of the central interval")
    axis.set_ylabel("empirical coverage")
    axis.set_title(title or "calibration")
    axis.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def marker_maps(
    coords_px: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    genes: Sequence[str],
    path: str | Path,
    *,
    std: np.ndarray | None = None,
    thumbnail: np.ndarray | None = None,
    scale: float = 1.0,
    spot_diameter_px: float | None = None,
    value_label: str = "log2(1 + count)",
    title: str = "",
) -> Path:
    """Truth | prediction (| predicted σ) maps of a few genes over the slide thumbnail.

    Truth and prediction of a gene share one colour scale in the target space (the reference's
    notebook coloured the truth by raw counts and the prediction by log values). ``coords_px`` are
    full-resolution (x, y); ``scale`` maps them onto ``thumbnail``; spots are drawn as discs of
    ``spot_diameter_px`` (full resolution) in data units.
    """
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Normalize

    truth = np.asarray(truth, dtype=np.float64).reshape(len(coords_px), -1)
    prediction = np.asarray(prediction, dtype=np.float64).reshape(len(coords_px), -1)
    xy = np.asarray(coords_px, dtype=np.float64)[:, :2] * scale
    if spot_diameter_px is None:
        spot_diameter_px = _nearest_neighbour_distance(xy) / scale * 0.8
    diameter = max(float(spot_diameter_px) * scale, 1e-3)
    n_columns = 3 if std is not None else 2
    figure = _figure(4.2 * n_columns, 3.9 * max(1, len(genes)))
    axes = np.atleast_2d(figure.subplots(max(1, len(genes)), n_columns, squeeze=False))
    for row, gene in enumerate(genes):
        shared = Normalize(
            vmin=float(min(truth[:, row].min(), prediction[:, row].min())),
            vmax=float(max(truth[:, row].max(), prediction[:, row].max())),
        )
        panels = [("truth", truth[:, row], shared, "magma"), ("prediction", prediction[:, row], shared, "magma")]
        if std is not None:
            sigma = np.asarray(std, dtype=np.float64)[:, row]
            panels.append(("predicted σ", sigma, Normalize(vmin=0.0, vmax=float(max(sigma.max(), 1e-9))), "viridis"))
        for column, (label, values, norm, cmap) in enumerate(panels):
            axis = axes[row, column]
            if thumbnail is not None:
                axis.imshow(thumbnail)
            discs = EllipseCollection(
                np.full(len(xy), diameter),
                np.full(len(xy), diameter),
                np.zeros(len(xy)),
                units="xy",
                offsets=xy,
                offset_transform=axis.transData,
                cmap=cmap,
                norm=norm,
            )
            discs.set_array(values)
            axis.add_collection(discs)
            pad = diameter
            axis.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
            axis.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)  # image orientation: y down
            axis.set_aspect("equal")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"{gene}: {label}")
            colourbar = figure.colorbar(discs, ax=axis, fraction=0.046, pad=0.02)
            colourbar.set_label(value_label if label != "predicted σ" else f"σ of {value_label}", fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _nearest_neighbour_distance(xy: np.ndarray) -> float:
    if len(xy) < 2:
        return 10.0
    sample = xy[: min(len(xy), 500)]
    distances = np.sqrt(((sample[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    distances[distances == 0] = np.inf
    return float(np.median(distances.min(axis=1)))
