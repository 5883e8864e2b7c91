"""The "Spot inspector" dock: a clicked spot's samples as a histogram, its mean and its intervals.

A thin Qt view of :class:`napari_stem.plugin.inspector.SpotReport`; the prediction widget fills it when
a spot of a prediction layer is clicked. It holds no reference to the viewer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

from napari_stem.plugin.inspector import SpotReport

#: Interval bars, widest (lightest) first, drawn under the histogram.
INTERVAL_COLOURS = ("#7fb3d5", "#1f618d")
MEAN_COLOUR = "#f39c12"


class SampleHistogram(QWidget):
    """Samples as a histogram over the spot's own range, its intervals as bars, its mean as a line."""

    def __init__(self) -> None:
        super().__init__()
        self.report: SpotReport | None = None
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def value_range(self) -> tuple[float, float]:
        report = self.report
        values = [report.mean] + [v for i in report.intervals for v in (i.low, i.high)]
        if report.samples is not None:
            values += list(report.samples)
        values = np.asarray([v for v in values if np.isfinite(v)] or [0.0, 1.0])
        low, high = float(values.min()), float(values.max())
        pad = max((high - low) * 0.08, 1e-3)
        return low - pad, high + pad

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Histogram counts and bin edges of the samples (empty without samples)."""
        if self.report is None or self.report.samples is None:
            return np.zeros(0, int), np.zeros(0)
        samples = self.report.samples
        bins = int(np.clip(np.sqrt(len(samples)) * 2, 4, 30))
        return np.histogram(samples, bins=bins, range=self.value_range())

    def paintEvent(self, _event: Any) -> None:  # Qt's name
        if self.report is None:
            return
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        width, height = self.width(), self.height()
        left, right, top, axis_y = 8.0, width - 8.0, 8.0, height - 26.0
        low, high = self.value_range()

        def x_of(value: float) -> float:
            return left + (value - low) / (high - low) * (right - left)

        text_colour = self.palette().color(self.foregroundRole())
        counts, edges = self.counts()
        bars_bottom = axis_y - 4 - 8 * len(self.report.intervals)
        if counts.size and counts.max() > 0:
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor(160, 160, 160))
            scale = (bars_bottom - top) / counts.max()
            for count, start, stop in zip(counts, edges[:-1], edges[1:], strict=True):
                if count:
                    painter.drawRect(
                        QRectF(
                            x_of(start) + 0.5, bars_bottom - count * scale, x_of(stop) - x_of(start) - 1, count * scale
                        )
                    )
        for i, interval in enumerate(sorted(self.report.intervals, key=lambda item: -item.level)):
            y = axis_y - 6 - 8 * i
            painter.setPen(QPen(QColor(INTERVAL_COLOURS[min(i, len(INTERVAL_COLOURS) - 1)]), 5))
            painter.drawLine(int(x_of(interval.low)), int(y), int(x_of(interval.high)), int(y))
        painter.setPen(QPen(QColor(MEAN_COLOUR), 2))
        painter.drawLine(int(x_of(self.report.mean)), int(top), int(x_of(self.report.mean)), int(axis_y))
        painter.setPen(QPen(text_colour, 1))
        painter.drawLine(int(left), int(axis_y), int(right), int(axis_y))
        painter.drawText(QRectF(left, axis_y + 4, 80, 18), Qt.AlignmentFlag.AlignLeft, f"{low:.2f}")
        painter.drawText(QRectF(right - 80, axis_y + 4, 80, 18), Qt.AlignmentFlag.AlignRight, f"{high:.2f}")
        painter.drawText(QRectF(left, axis_y + 4, right - left, 18), Qt.AlignmentFlag.AlignHCenter, self.report.unit)
        painter.end()


class SpotInspector(QWidget):
    """The dock: a summary (spot, gene, mean ± sd, intervals with their levels) over the histogram."""

    def __init__(self) -> None:
        super().__init__()
        self.report: SpotReport | None = None
        self.summary = QLabel("Click a spot of a prediction layer to see its samples.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.histogram = SampleHistogram()
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.histogram)
        layout.addStretch(1)

    def show_report(self, report: SpotReport) -> None:
        self.report = report
        self.summary.setText(report.summary)
        self.histogram.report = report
        self.histogram.update()
