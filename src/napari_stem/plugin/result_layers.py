"""What prediction layers show, changed in place: the gene, the uncertainty kind, the colorbar label.

A prediction layer (``metadata['napari_stem'] == 'prediction'``, made by :mod:`napari_stem.plugin.layers`)
keeps its :class:`~napari_stem.values.Prediction` and spots, so switching the gene or between sd
and variance only rebuilds its small feature table. Used by the widget for its own and for
re-opened layers, and by the reader's layers as soon as they are in a viewer. No Qt import.
"""

from __future__ import annotations

import warnings
from typing import Any

from napari_stem.plugin.layers import (
    PREDICTION_COLORMAPS,
    colorbar_label,
    gene_contrast_limits,
    kind_lower_bound,
    layer_name,
    prediction_features,
    value_column,
)

#: Colorbar height in screen pixels: tall enough for several tick labels.
COLORBAR_SIZE = (18, 220)
LABEL_KEY = "napari_stem_colorbar_label"


def is_prediction_layer(layer: Any) -> bool:
    metadata = getattr(layer, "metadata", None) or {}
    return metadata.get("napari_stem") == "prediction" and "prediction" in metadata


def expected_name(layer: Any) -> str:
    """The name napari-stem gives ``layer`` for its current gene and kind."""
    meta = layer.metadata
    return layer_name(meta.get("gene"), meta["kind"], meta.get("name_prefix", ""), meta.get("name_suffix", ""))


def show(layer: Any, gene: str | None = None, kind: str | None = None, all_genes: bool | None = None) -> None:
    """Show ``gene`` (and ``kind``: mean, sd or variance) on ``layer``: features, colours, limits,
    name (unless the user renamed it) and colorbar label. Unchanged arguments keep their value."""
    meta = layer.metadata
    prediction, spots = meta["prediction"], meta["spots"]
    renamed = layer.name != expected_name(layer)
    if gene is not None and gene in meta["genes"]:
        meta["gene"] = gene
    if kind is not None:
        meta["kind"] = kind
    if all_genes is not None:
        meta["all_genes"] = bool(all_genes)
    gene, kind = meta.get("gene"), meta["kind"]
    features = prediction_features(prediction, spots, gene, all_genes=meta.get("all_genes", False), kind=kind)
    with warnings.catch_warnings():  # the old colour column goes; the new one is set right below
        warnings.filterwarnings("ignore", "property used for face_color dropped", RuntimeWarning)
        layer.features = features
    if gene is not None:
        column = value_column(gene, kind)
        layer.face_colormap = PREDICTION_COLORMAPS[kind]
        layer.face_color = column
        layer.refresh_colors(update_color_mapping=False)  # napari keeps the old limits on a switch
        layer.face_contrast_limits = gene_contrast_limits(
            features[column], lower_bound=kind_lower_bound(prediction, kind)
        )
    if not renamed:
        layer.name = expected_name(layer)
    label_colorbar(layer)


def label_colorbar(layer: Any) -> None:
    """Colorbar on, tall enough for ticks, labelled "<gene> <kind> · <unit>" beside it."""
    meta = layer.metadata
    layer.face_colorbar.size = COLORBAR_SIZE
    layer.face_colorbar.visible = True
    text = colorbar_label(meta.get("gene"), meta["kind"], meta.get("unit", ""))
    overlays = layer._overlays  # napari has no public way to add a layer overlay (0.9)
    label = overlays.get(LABEL_KEY)
    if label is None:
        label = _label_overlay(text)
        if label is None:
            return
        overlays[LABEL_KEY] = label
        layer.face_colorbar.events.visible.connect(lambda visible: setattr(label, "visible", bool(visible)))
    else:
        label.text = text


def label_colorbars_when_added() -> None:
    """For readers and sample data, which cannot reach the viewer: once napari has added their
    layers (next event-loop turn), give the prediction layers their labelled colorbars."""
    try:
        import napari
        from qtpy.QtCore import QTimer
    except Exception:  # no Qt (the reader used headless)
        return

    def label() -> None:
        viewer = napari.current_viewer()
        for layer in viewer.layers if viewer is not None else ():
            if is_prediction_layer(layer) and colorbar_text(layer) is None:
                label_colorbar(layer)

    QTimer.singleShot(0, label)


def colorbar_text(layer: Any) -> str | None:
    label = layer._overlays.get(LABEL_KEY)
    return None if label is None else label.text


def _label_overlay(text: str) -> Any:
    """A text overlay that follows its layer (shown with it, tiled with its colorbar)."""
    try:
        cls = _label_overlay_class()
    except Exception:  # napari internals moved: no label, the colorbar still shows
        return None
    return cls(text=text, visible=True, position="top_right", font_size=10)


_LABEL_CLASS: Any = None


def _label_overlay_class() -> Any:
    """A LayerNameOverlay that shows its own text; registered with napari's vispy overlay table."""
    global _LABEL_CLASS
    if _LABEL_CLASS is not None:
        return _LABEL_CLASS
    from napari._vispy.overlays.text import VispyLayerNameOverlay
    from napari._vispy.utils.visual import overlay_to_visual
    from napari.components.overlays.text import LayerNameOverlay

    class ColorbarLabelOverlay(LayerNameOverlay):
        """The colorbar's caption: layer, gene and unit."""

        text: str = ""

    class VispyColorbarLabel(VispyLayerNameOverlay):
        def _connect_events(self) -> None:
            self.overlay.events.text.connect(self._on_text_change)

        def _on_text_change(self) -> None:
            self.node.text = self.overlay.text
            self._on_position_change()

    overlay_to_visual[ColorbarLabelOverlay] = VispyColorbarLabel
    _LABEL_CLASS = ColorbarLabelOverlay
    return _LABEL_CLASS
