"""The widget's live preview: the spots a run would predict (and the tissue mask) drawn as soon as
slide, spots, pitch, diameter, minimum tissue fraction or region change, with count and cost.

Changes are gathered for a moment (a quick series of edits redraws once). Grids come from the
controller's :class:`napari_stem.caches.GridCache`, the same the run uses; the slow part, the slide's tissue mask, is
computed once per slide in a thread worker (the GUI stays responsive on large slides without a
stored thumbnail, whose whole overview level is decoded) and kept.
Layers are touched on the main thread only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_stem.errors import StemError
from napari_stem.values import EmbeddingSpec

if TYPE_CHECKING:
    from napari_stem.plugin.widget import PredictWidget

SPOTS_LAYER = "spot preview"
MASK_LAYER = "tissue mask"
#: Milliseconds of quiet before a redraw (typing 1-0-0 in the pitch field redraws once).
DEBOUNCE_MS = 120
SELECTED_COLOUR = (0.0, 1.0, 1.0, 1.0)  # cyan outlines: these spots will be predicted
OUTSIDE_COLOUR = (0.6, 0.6, 0.6, 0.5)  # grey: candidate spots outside the region


class SpotPreview:
    """Owned by the widget; reads its inputs through the widget, draws two layers in its viewer."""

    def __init__(self, widget: PredictWidget) -> None:
        from qtpy.QtCore import QTimer

        self.widget = widget
        self.viewer = widget._viewer
        self.enabled = True
        self.last_seconds: float | None = None  # how long the last redraw took (after the mask)
        self.preview: Any = None  # napari_stem.preview.Preview last drawn
        self._worker: Any = None
        self._watched_region: Any = None
        self._timer = QTimer(widget.native)  # dies with the dock widget: no redraw after it is gone
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.update)

    # ------------------------------------------------------------------ triggers
    def schedule(self, *_: Any) -> None:
        if self.enabled:
            self._watch_region()
            self._timer.start()

    def _watch_region(self) -> None:
        """Redraw when the chosen region's shapes are drawn or edited, not only when it is picked."""
        region = self.widget.region.value
        region = None if isinstance(region, str) else region
        if region is self._watched_region:
            return
        if self._watched_region is not None:
            self._watched_region.events.data.disconnect(self.schedule)
        if region is not None:
            region.events.data.connect(self.schedule)
        self._watched_region = region

    # ------------------------------------------------------------------ drawing
    def update(self) -> None:
        """Compute and draw the preview now (never raises: problems go into the preview line)."""
        widget = self.widget
        if not self.enabled or widget.controller.running:
            return
        started = time.perf_counter()
        try:
            slide = widget.slide_input()
            if slide is None or slide.path is None:
                return self._clear("open a slide to see where spots go")
            settings = widget.settings()
            mpp = settings.mpp_override if settings.mpp_override > 0 else slide.mpp
            if not mpp:
                return self._clear("enter the slide's µm/px to see the spots")
            needs_tissue = widget.spots.value == _grid() or bool(widget.show_mask.value)
            if needs_tissue and widget.controller.grids.cached_tissue(slide.path, mpp) is None:
                return self._find_tissue(slide.path, mpp)
            preview = self._compute(slide, mpp, settings)
        except StemError as exc:
            return self._clear(str(exc))
        except Exception as exc:  # a preview must never break the widget; Predict will say more
            return self._clear(f"no preview: {type(exc).__name__}: {exc}")
        if widget.spots.value == _grid():
            self._draw(preview, slide)
        else:  # the user's spots layer already shows them: count and cost only
            self._hide_spots()
            self._draw_mask(preview, slide)
            self.preview = preview
        self.last_seconds = time.perf_counter() - started
        widget.preview_info.value = preview.message
        return None

    def _compute(self, slide: Any, mpp: float, settings: Any) -> Any:
        from napari_stem.plugin.jobs import spots_from_points
        from napari_stem.preview import Preview
        from napari_stem.regions import has_area_shapes, select_in_shapes

        widget = self.widget
        choice = widget.spots_input()
        grids = widget.controller.grids
        tissue = grids.cached_tissue(slide.path, mpp)
        if choice == _grid():
            spots = grids.grid(slide.path, mpp, settings.grid)
        elif choice is None or isinstance(choice, str):
            raise StemError("choose spots: a Points layer or the grid over tissue")
        else:
            spots = spots_from_points(choice, slide.frame, mpp)
        selected = np.ones(len(spots), dtype=bool)
        region = widget.region_input()
        if region is not None and region.shapes and has_area_shapes([kind for kind, _ in region.shapes]):
            inside = select_in_shapes(slide.frame.pixels_to_world(spots.centers_px), region.shapes)
            if inside is not None:
                selected = inside
        preview = Preview(spots=spots, selected=selected, tissue=tissue)
        preview.message = self._describe(preview, slide, settings)
        return preview

    def _describe(self, preview: Any, slide: Any, settings: Any) -> str:
        """ "~N spots · ~T on cpu (estimate)", or why there are none."""
        from napari_stem.preview import describe_cost, estimate_seconds

        n = preview.n_selected
        if n == 0:
            return "no spots: " + ("none inside the region" if len(preview.spots) else "no tissue found for this grid")
        if self.widget.controller.needs_download(settings.checkpoint):  # never wait on the Hub here
            return f"~{n} spots (a time estimate once the checkpoint is fetched)"
        try:
            metadata = _checkpoint_metadata(settings.checkpoint)
        except StemError:
            return f"~{n} spots (choose a checkpoint for a time estimate)"
        embedding = EmbeddingSpec.from_dict(metadata.get("embedding"))
        encoder = embedding.encoder or ""
        embedded = self._embedded(slide, preview, embedding, settings)
        seconds = estimate_seconds(n, settings.n_samples, settings.steps, settings.device, encoder, embedded)
        return describe_cost(n, seconds, settings.device) + (" · embeddings cached" if embedded else "")

    def _embedded(self, slide: Any, preview: Any, embedding: EmbeddingSpec, settings: Any) -> bool:
        from napari_stem.caches import embedding_cache_path

        try:
            selected = preview.spots.subset(preview.selected)
            root = self.widget.controller.embedding_cache_dir
            return embedding_cache_path(slide.path, selected, embedding, settings.encoder_weights, root=root).exists()
        except Exception:  # an estimate only
            return False

    def _find_tissue(self, path: Any, mpp: float) -> None:
        """The tissue mask in a worker (seconds on a whole slide); redraw when it is there."""
        slide_tissue = self.widget.controller.grids.tissue
        self.widget.preview_info.value = "finding the tissue…"
        if not self.widget.use_threads:
            slide_tissue(path, mpp)
            return self.update()
        if self._worker is not None:
            return None
        from napari.qt.threading import create_worker

        def done(*_: Any) -> None:
            self._worker = None
            try:
                self.update()  # now, not after the debounce: the settings have not changed
            except RuntimeError:  # the widget was closed meanwhile
                pass

        def failed(error: BaseException) -> None:
            self._worker = None
            self.widget.preview_info.value = f"no preview: {error}"

        self._worker = create_worker(
            slide_tissue, path, mpp, _start_thread=False, _connect={"returned": done, "errored": failed}
        )
        self._worker.start()
        return None

    def _draw(self, preview: Any, slide: Any) -> None:
        spots = preview.spots
        colours = np.where(preview.selected[:, None], SELECTED_COLOUR, OUTSIDE_COLOUR)
        coords = slide.frame.pixels_to_world(spots.centers_px)
        size = slide.frame.length_to_world(spots.diameter_px)
        layer = _find(self.viewer, SPOTS_LAYER)
        if layer is None:
            self.viewer.add_points(
                coords,
                name=SPOTS_LAYER,
                size=size,
                face_color="transparent",
                border_color=colours,
                border_width=0.08,
                border_width_is_relative=True,
                units=slide.frame.units or ("pixel", "pixel"),
                metadata={"napari_stem": "preview"},
            )
        else:
            layer.data = coords
            layer.size = size
            layer.border_color = colours
            layer.visible = True
        self._draw_mask(preview, slide)
        self.preview = preview

    def _draw_mask(self, preview: Any, slide: Any) -> None:
        layer = _find(self.viewer, MASK_LAYER)
        show = bool(self.widget.show_mask.value) and preview.tissue is not None
        if not show:
            if layer is not None:
                layer.visible = False
            return
        mask, scale = preview.tissue
        frame = slide.frame
        pixel = np.asarray(frame.scale) / scale  # world size of one mask pixel
        translate = np.asarray(frame.translate) + np.asarray(frame.scale) * (0.5 / scale - 0.5)
        if layer is None:
            layer = self.viewer.add_image(
                mask.astype(np.uint8),
                name=MASK_LAYER,
                colormap="green",
                contrast_limits=(0, 1),
                opacity=0.35,
                blending="additive",
                scale=tuple(pixel),
                translate=tuple(translate),
                units=frame.units or ("pixel", "pixel"),
                metadata={"napari_stem": "preview"},
            )
            index = self.viewer.layers.index(layer)  # just above the slide, under every spot layer
            slide_layer = self.widget.slide.value
            if slide_layer in self.viewer.layers:
                self.viewer.layers.move(index, self.viewer.layers.index(slide_layer) + 1)
        else:
            layer.data = mask.astype(np.uint8)
            layer.scale, layer.translate = tuple(pixel), tuple(translate)
            layer.visible = True

    def _clear(self, message: str) -> None:
        for name in (SPOTS_LAYER, MASK_LAYER):
            layer = _find(self.viewer, name)
            if layer is not None:
                layer.visible = False
        self.preview = None
        self.widget.preview_info.value = message

    def hide(self) -> None:
        """Results are coming: the preview makes way (it comes back on the next settings change),
        after taking in any change still pending (count, cost and mask say what is predicted)."""
        if self._timer.isActive():
            self._timer.stop()
            self.update()
        self._hide_spots()

    def _hide_spots(self) -> None:
        layer = _find(self.viewer, SPOTS_LAYER)
        if layer is not None:
            layer.visible = False

    def close(self) -> None:
        self.enabled = False
        self._timer.stop()
        if self._watched_region is not None:
            self._watched_region.events.data.disconnect(self.schedule)
            self._watched_region = None
        if self._worker is not None:
            self._worker.quit()


def _find(viewer: Any, name: str) -> Any:
    for layer in viewer.layers:
        if layer.name == name:
            return layer
    return None


def _grid() -> str:
    from napari_stem.plugin.jobs import GRID

    return GRID


def _checkpoint_metadata(path: Any) -> dict:
    from napari_stem.plugin.controller import _checkpoint_metadata as read

    return read(path)
