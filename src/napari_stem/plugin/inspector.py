"""One spot's prediction made tangible: its samples for a gene, their mean and sd, its intervals.

The intervals are the order-statistic ones of :mod:`napari_stem.intervals`: those recorded with
the prediction when there are any, else the 50 % and 90 % intervals its kept samples give, each
labelled with the level it actually has for K samples (e.g. [min, max] of 4 samples is a 60 %
interval, not 90 %). No napari or Qt import: the dock (``inspector_widget``) only draws this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Levels shown when the prediction recorded none but kept its samples.
SHOWN_LEVELS = (0.5, 0.9)


@dataclass(frozen=True)
class SpotInterval:
    level: float  # the coverage it has, for a calibrated model
    low: float
    high: float
    label: str  # e.g. "90 % interval from 19 samples"


@dataclass(frozen=True)
class SpotReport:
    """What the inspector shows for one spot and one gene, in the prediction's unit."""

    barcode: str
    gene: str
    unit: str
    mean: float
    sd: float
    samples: np.ndarray | None  # (K,) or None when the samples were not kept
    intervals: list[SpotInterval] = field(default_factory=list)

    @property
    def summary(self) -> str:
        lines = [f"spot {self.barcode} · {self.gene}", f"mean {self.mean:.3g} ± {self.sd:.3g} (sd) {self.unit}"]
        lines += [f"{interval.label}: {interval.low:.3g} – {interval.high:.3g}" for interval in self.intervals]
        if self.samples is None:
            lines.append("samples not kept for this prediction")
        else:
            lines.append(
                f"{len(self.samples)} samples: {', '.join(f'{v:.2f}' for v in np.sort(self.samples)[:40])}"
                + (" …" if len(self.samples) > 40 else "")
            )
        return "\n".join(lines)


def spot_report(prediction: Any, spots: Any, index: int, gene: str) -> SpotReport:
    """The :class:`SpotReport` of spot ``index`` (a row of ``prediction``) for ``gene``."""
    from napari_stem.intervals import plan_intervals
    from napari_stem.plugin.layers import target_unit

    column = [str(g) for g in prediction.genes].index(str(gene))
    samples = None
    if getattr(prediction, "samples", None) is not None:
        samples = np.asarray(prediction.samples[index, :, column], dtype=np.float64)
        samples = samples if np.isfinite(samples).all() else None
    intervals: list[SpotInterval] = []
    specs = getattr(prediction, "interval_specs", ()) or ()
    recorded = getattr(prediction, "intervals", None)
    if specs and recorded is not None:
        for i, spec in enumerate(specs):
            intervals.append(
                SpotInterval(
                    spec.level, float(recorded[i, 0, index, column]), float(recorded[i, 1, index, column]), spec.label
                )
            )
    elif samples is not None and len(samples) >= 2:
        for spec in plan_intervals(SHOWN_LEVELS, len(samples)):
            low, high = spec.bounds(samples[None, :], axis=1)
            intervals.append(SpotInterval(spec.level, float(low[0]), float(high[0]), spec.label))
    intervals.sort(key=lambda interval: interval.level)
    variance = float(prediction.variance[index, column])
    return SpotReport(
        barcode=str(np.asarray(spots.barcodes)[index]),
        gene=str(gene),
        unit=target_unit(prediction),
        mean=float(prediction.mean[index, column]),
        sd=float(np.sqrt(max(variance, 0.0))) if np.isfinite(variance) else float("nan"),
        samples=samples,
        intervals=intervals,
    )


def nearest_spot(
    world_rc: Any, centers_world: np.ndarray, radius: float, shown: np.ndarray | None = None
) -> int | None:
    """Index of the spot whose disc holds ``world_rc`` (the nearest if several), else None."""
    centers = np.asarray(centers_world, dtype=np.float64).reshape(-1, 2)
    if len(centers) == 0:
        return None
    distance = np.linalg.norm(centers - np.asarray(world_rc, dtype=np.float64)[-2:], axis=1)
    if shown is not None:
        distance = np.where(np.asarray(shown, dtype=bool), distance, np.inf)
    index = int(np.argmin(distance))
    return index if distance[index] <= radius else None
