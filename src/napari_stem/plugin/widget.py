"""The "Predict expression (Stem)" dock widget: a thin magicgui view over :mod:`._controller`.

Sub-widgets are attributes (``widget.checkpoint.value = ...; widget.run_button.clicked()``) so
tests and scripts drive it like a user. The view only turns layers into plain inputs, wires
signals and touches layers — always on the main thread (worker events arrive through the
``yielded``/``returned``/``errored``/``aborted`` handlers). The run happens in a napari
``thread_worker`` over :meth:`PredictController.run`; set ``NAPARI_STEM_NOTHREADS=1`` (or
``widget.use_threads = False``) to run the same generator synchronously, for deterministic tests.

Results are two Points layers over the predicted spots, drawn as batches finish: "<gene> mean"
on top, selected, and "<gene> sd" (or variance or interval width: *uncertainty as*) below it, hidden — one click
away; names, colours and colorbar labels follow the gene picker. A new run replaces the layers of
the previous run unless they were renamed (rename to keep). A cancelled run keeps the spots
already sampled as "<gene> mean (partial k/n)" …; a failed run removes its layers and shows a
notification naming the fix.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Layer
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QComboBox

from napari_stem.errors import StemError
from napari_stem.intervals import CHOICES as INTERVAL_CHOICES
from napari_stem.intervals import DEFAULT_CHOICE as DEFAULT_INTERVALS
from napari_stem.intervals import describe as describe_intervals
from napari_stem.intervals import samples_for_levels
from napari_stem.known_models import HUB_PREFIX
from napari_stem.plugin import result_layers
from napari_stem.plugin.controller import PredictController
from napari_stem.plugin.jobs import DEVICES, GRID, WHOLE_SLIDE, PointsInput, PredictSettings, RegionInput, SlideInput
from napari_stem.plugin.layers import SPOT_OPACITY, UNCERTAINTY_KINDS, SlideFrame, has_interval, prediction_layer_data
from napari_stem.plugin.torch_guard import block_triton_if_llvm_loaded
from napari_stem.predict import DEFAULT_SAMPLER, DEFAULT_SETTINGS, SAMPLERS
from napari_stem.validate import MAX_DIFFUSION_STEPS
from napari_stem.values import GridSpec

if TYPE_CHECKING:
    import napari

#: Result layers by role: the mean (shown, on top) and its uncertainty (one click away, hidden).
ROLES = ("uncertainty", "mean")


def threads_enabled() -> bool:
    """False when ``NAPARI_STEM_NOTHREADS`` is set (1/true/yes): run in the GUI thread, for tests."""
    return os.environ.get("NAPARI_STEM_NOTHREADS", "").strip().lower() not in ("1", "true", "yes", "on")


class PredictWidget(Container):
    """Slide + spots (+ region) + checkpoint → mean and variance maps; gene picker; export."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        block_triton_if_llvm_loaded()  # before anything imports torch in this GL process
        self._viewer = viewer
        self.controller = PredictController()
        self.use_threads = threads_enabled()
        self.worker: Any = None
        self._result_layers: dict[str, Any] = {}  # role (ROLES) -> layer of the current result
        self._layers_result: Any = None  # the PredictionResult those layers show
        self._given_names: dict[int, str] = {}  # id(layer) -> the name this widget gave it
        self._fetching: set[str] = set()  # hf-hub: references being downloaded in a worker
        self._run_when_fetched: str | None = None  # Predict was pressed while this one downloads
        defaults = DEFAULT_SETTINGS["cpu"]

        # inputs
        self.slide = ComboBox(
            label="slide",
            choices=self._slide_choices,
            tooltip="An opened slide (napari-stem reader or any image layer with a file)",
        )
        self.spots = ComboBox(
            label="spots",
            choices=self._spots_choices,
            tooltip="A Points layer of spots, or a Visium-like grid over the detected tissue",
        )
        self.pitch_um = FloatSpinBox(
            label="grid pitch (µm)", value=100.0, min=10.0, max=2000.0, step=10.0, tooltip="Visium 100, legacy ST 200"
        )
        self.diameter_um = FloatSpinBox(
            label="spot diameter (µm)", value=55.0, min=5.0, max=2000.0, step=5.0, tooltip="Visium 55, legacy ST 100"
        )
        self.region = ComboBox(
            label="region",
            choices=self._region_choices,
            tooltip="A Shapes layer (polygon, rectangle, ellipse); empty = whole slide",
        )
        self.min_tissue = FloatSpinBox(
            label="min tissue fraction",
            value=0.5,
            min=0.0,
            max=1.0,
            step=0.05,
            tooltip="Grid spots whose disc is less tissue than this are left out",
        )
        self.show_mask = CheckBox(
            label="show tissue mask", value=False, tooltip="The detected tissue the grid is laid on"
        )
        self.preview_info = Label(label="preview", value="")
        self.known_models = ComboBox(
            label="known models",
            choices=self._model_choices,
            tooltip="The demo model and recently used checkpoints; picking one fills 'checkpoint'",
        )
        # Long entries (the demo's build note, deep checkpoint paths) must not widen the dock and
        # squeeze the canvas: the box keeps a modest width and the list shows them in full.
        self.known_models.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.known_models.native.setMinimumContentsLength(18)
        self.checkpoint = FileEdit(
            label="checkpoint",
            mode="d",
            nullable=True,
            tooltip="A napari-stem checkpoint folder, or type hf-hub:owner/name[@revision] for one on the Hugging Face Hub; its config decides genes, encoder and patches",
        )
        self.checkpoint_info = Label(label="model", value="(choose a checkpoint)")
        self.intervals = ComboBox(
            label="intervals",
            choices=list(INTERVAL_CHOICES),
            value=DEFAULT_INTERVALS,
            tooltip="Central prediction intervals written with the prediction (lo90/hi90 ...), from order statistics of the samples",
        )
        self.n_samples = SpinBox(
            label="samples per spot",
            value=samples_for_levels(INTERVAL_CHOICES[DEFAULT_INTERVALS], defaults["n_samples"]),
            min=2,
            max=1000,
            tooltip="More samples: steadier mean and variance; exact 50 % and 90 % intervals need 19, 39, ... (K + 1 a multiple of 20)",
        )
        self.intervals_info = Label(label="", value="")
        self.steps = SpinBox(
            label="denoising steps",
            value=defaults["steps"],
            min=1,
            max=MAX_DIFFUSION_STEPS,
            tooltip=f"Network evaluations per sample: more is closer to the trained chain, slower (GPU default {DEFAULT_SETTINGS['cuda']['steps']})",
        )
        self.sampler = ComboBox(label="sampler", choices=list(SAMPLERS), value=DEFAULT_SAMPLER)
        self.device = ComboBox(
            label="device", choices=list(DEVICES), value="auto", tooltip="auto = CUDA when available"
        )
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.encoder_weights = FileEdit(
            label="encoder weights",
            mode="r",
            nullable=True,
            filter="*.safetensors *.pth *.pt *.bin",
            tooltip="Optional local weights (e.g. UNI); empty = the encoder's default source",
        )
        self.mpp = FloatSpinBox(
            label="µm/px (0 = from slide)",
            value=0.0,
            min=0.0,
            max=100.0,
            step=0.01,
            tooltip="Only for slides that do not record their pixel size",
        )
        # run
        self.run_button = PushButton(text="Predict")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="status", value="")
        # results
        self.gene_filter = LineEdit(label="find gene", tooltip="Type part of a gene name to narrow the list")
        self.gene = ComboBox(label="gene", choices=[], tooltip="Recolours and renames the prediction layers")
        self.uncertainty = ComboBox(
            label="uncertainty as",
            choices=list(UNCERTAINTY_KINDS),
            value="sd",
            tooltip="What the uncertainty layer shows: standard deviation (same unit as the mean), variance, or the width of the widest interval",
        )
        self.opacity = FloatSlider(
            label="spot opacity",
            value=SPOT_OPACITY,
            min=0.1,
            max=1.0,
            step=0.05,
            tooltip="Lower lets the tissue show through the spots",
        )
        self.hover_all_genes = CheckBox(
            label="hover: all genes",
            value=False,
            tooltip="Hovering a spot shows the displayed gene; tick to list every gene's mean too",
        )
        self.export_path = FileEdit(label="export to", mode="w", nullable=True, filter="*.h5ad *.csv")
        self.export_button = PushButton(text="Export")

        self.extend(
            [
                self.slide, self.spots, self.pitch_um, self.diameter_um, self.min_tissue, self.region,
                self.show_mask, self.preview_info,
                self.known_models, self.checkpoint, self.checkpoint_info, self.intervals, self.n_samples, self.intervals_info, self.steps, self.sampler,
                self.device, self.seed, self.encoder_weights, self.mpp,
                self.run_button, self.cancel_button, self.progress, self.status,
                self.gene_filter, self.gene, self.uncertainty, self.opacity, self.hover_all_genes,
                self.export_path, self.export_button,
            ]
        )  # fmt: skip
        for label in (
            self.status,
            self.checkpoint_info,
            self.intervals_info,
            self.preview_info,
        ):  # long messages wrap instead of widening the dock
            label.native.setWordWrap(True)
        self.spots.changed.connect(self._update_grid_fields)
        self.region.changed.connect(self._adopt_slide_units)
        self.intervals.changed.connect(self._on_intervals_changed)
        self.n_samples.changed.connect(self._update_intervals_info)
        self._update_intervals_info()
        self.checkpoint.changed.connect(self._on_checkpoint_changed)
        self.known_models.changed.connect(self._on_known_model)
        self.run_button.clicked.connect(self._on_run)
        self.cancel_button.clicked.connect(self._on_cancel)
        self.gene_filter.changed.connect(self._refresh_genes)
        self.gene.changed.connect(self._apply_gene)
        self.uncertainty.changed.connect(self._apply_uncertainty)
        self.opacity.changed.connect(self._apply_opacity)
        self.hover_all_genes.changed.connect(self._apply_hover)
        self.export_button.clicked.connect(self._on_export)
        self._default_to_opened_spots()
        self._update_grid_fields()
        self._refresh_genes()
        from napari_stem.plugin.preview_view import SpotPreview

        self.preview = SpotPreview(self)  # spots (and tissue) drawn as soon as their settings change
        for control in (
            self.slide,
            self.spots,
            self.pitch_um,
            self.diameter_um,
            self.min_tissue,
            self.region,
            self.show_mask,
            self.mpp,
            self.checkpoint,
            self.n_samples,
            self.steps,
            self.device,
        ):
            control.changed.connect(self.preview.schedule)
        self.preview.schedule()
        self.inspector: Any = None  # the "Spot inspector" dock, made at the first click on a spot
        viewer.mouse_drag_callbacks.append(self._on_canvas_click)

    # ------------------------------------------------------------------ choices
    def _slide_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self._viewer.layers if _is_slide_layer(layer)]

    def _spots_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        points = [
            (layer.name, layer)
            for layer in self._viewer.layers
            if layer._type_string == "points" and layer.metadata.get("napari_stem") not in ("prediction", "preview")
        ]
        return [(GRID, GRID), *points]

    def _region_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        shapes = [(layer.name, layer) for layer in self._viewer.layers if layer._type_string == "shapes"]
        return [(WHOLE_SLIDE, WHOLE_SLIDE), *shapes]

    def reset_choices(self, *_: Any) -> None:
        """Called by napari when layers change: refresh layer pickers and the gene list (the gene
        picker keeps its choice: renaming layers to follow it must not reset it)."""
        for widget in self:
            if widget is not self.gene and hasattr(widget, "reset_choices"):
                widget.reset_choices()
        self._default_to_opened_spots()
        self._refresh_genes()

    def _update_grid_fields(self, *_: Any) -> None:
        is_grid = self.spots.value == GRID
        self.pitch_um.visible = is_grid
        self.diameter_um.visible = is_grid
        self.min_tissue.visible = is_grid

    def _default_to_opened_spots(self) -> None:
        """Spots opened with the slide (a HEST folder, an .h5ad) are what the user means, not a grid:
        a newly opened napari-stem spots layer becomes the choice while the grid is chosen."""
        seen = getattr(self, "_seen_spots", set())
        opened = [
            layer
            for _, layer in self._spots_choices()
            if not isinstance(layer, str) and layer.metadata.get("napari_stem") == "spots"
        ]
        new = [layer for layer in opened if id(layer) not in seen]
        self._seen_spots = {id(layer) for layer in opened}
        if new and self.spots.value == GRID:
            self.spots.value = new[-1]

    def _on_intervals_changed(self, *_: Any) -> None:
        """A new interval choice draws enough samples to make it exact (never fewer than before)."""
        levels = INTERVAL_CHOICES[self.intervals.value]
        if levels:
            self.n_samples.value = samples_for_levels(levels, at_least=int(self.n_samples.value))
        self._update_intervals_info()

    def _update_intervals_info(self, *_: Any) -> None:
        """Say which intervals the current sample count gives, with their actual level."""
        self.intervals_info.value = describe_intervals(
            INTERVAL_CHOICES[self.intervals.value], int(self.n_samples.value)
        )

    def _model_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        from napari_stem import known_models

        return known_models.choices()

    def _on_known_model(self, value: Any = None, *_: Any) -> None:
        """A known model fills 'checkpoint'; the demo model is built first when it is not yet."""
        from napari_stem import datasets, known_models

        if value is None:
            return
        if value != known_models.DEMO:
            if str(value).startswith(HUB_PREFIX):
                self.checkpoint.line_edit.value = str(value)  # as typed, not made a local path
            else:
                self.checkpoint.value = Path(value)
            return
        import time

        from qtpy.QtCore import QTimer

        from napari_stem.preview import format_duration

        message = f"building the demo model once ({datasets.DEMO_BUILD_TIME}); it is kept for next time…"
        self._set_status(message)
        show_info(f"napari-stem: {message}")
        self.run_button.enabled = False
        self.progress.max = 0  # busy, without a known end
        started = time.perf_counter()
        ticker = QTimer(self.native)  # the status counts the seconds: the build is alive
        ticker.setInterval(1000)
        ticker.timeout.connect(
            lambda: self._set_status(
                f"building the demo model once: {format_duration(time.perf_counter() - started)} so far "
                f"({datasets.DEMO_BUILD_TIME}); it is kept for next time…"
            )
        )
        ticker.start()

        def built(checkpoint: Path) -> None:
            ticker.stop()
            self.progress.max = 1000
            self.run_button.enabled = True
            self.known_models.reset_choices()
            self.checkpoint.value = checkpoint
            self._set_status(f"demo model ready after {format_duration(time.perf_counter() - started)}: {checkpoint}")

        def failed(error: BaseException) -> None:
            ticker.stop()
            self.progress.max = 1000
            self.run_button.enabled = True
            self._set_status(f"could not build the demo model: {error}")
            show_error(self.status.tooltip)

        if not self.use_threads:
            try:
                built(build_demo_model())
            except Exception as exc:  # shown to the user
                failed(exc)
            return
        from napari.qt.threading import create_worker

        self._demo_worker = create_worker(
            build_demo_model, _start_thread=False, _connect={"returned": built, "errored": failed}
        )
        self._demo_worker.start()

    def checkpoint_value(self) -> Path | None:
        """The 'checkpoint' field: a folder, or a ``hf-hub:`` reference as typed (magicgui's
        FileEdit turns a value set in code into an absolute path: the reference is taken back)."""
        text = str(self.checkpoint.line_edit.value or "")
        start = text.find(HUB_PREFIX)
        return Path(text[start:]) if start >= 0 else self.checkpoint.value

    def _on_checkpoint_changed(self, *_: Any) -> None:
        value = self.checkpoint_value()
        if value is None:
            self.checkpoint_info.value = "(choose a checkpoint)"
            return
        if self.controller.needs_download(value):  # a hf-hub: reference: the network, in a worker
            self._fetch_checkpoint(str(value))
            return
        try:
            self.checkpoint_info.value = self.controller.checkpoint_summary(value)
        except StemError as exc:
            self.checkpoint_info.value = f"not usable: {exc}"

    def _fetch_checkpoint(self, reference: str) -> None:
        """Download a ``hf-hub:`` checkpoint off the GUI thread; then describe it, refresh the
        preview's estimate, and start the run if Predict was pressed meanwhile."""
        self.checkpoint_info.value = f"fetching {reference} from the Hugging Face Hub…"
        if reference in self._fetching:
            return
        self._fetching.add(reference)

        def fetched(metadata: dict) -> None:
            self._fetching.discard(reference)
            if str(self.checkpoint_value()) != reference:
                return
            from napari_stem.plugin.controller import describe_checkpoint

            self.checkpoint_info.value = describe_checkpoint(metadata)
            self.preview.schedule()
            if self._run_when_fetched == reference:
                self._run_when_fetched = None
                self._on_run()

        def failed(error: BaseException) -> None:
            self._fetching.discard(reference)
            message = str(error) if isinstance(error, StemError) else f"{type(error).__name__}: {error}"
            if str(self.checkpoint_value()) == reference:
                self.checkpoint_info.value = f"not usable: {message}"
            if self._run_when_fetched == reference:
                self._run_when_fetched = None
                self._set_status(message)
                show_error(message)

        if not self.use_threads:
            try:
                metadata = self.controller.fetch_checkpoint(reference)
            except Exception as exc:  # shown to the user
                return failed(exc)
            return fetched(metadata)
        from napari.qt.threading import create_worker

        worker = create_worker(
            self.controller.fetch_checkpoint,
            reference,
            _start_thread=False,
            _connect={"returned": fetched, "errored": failed},
        )
        worker.start()
        return None

    # ------------------------------------------------------------------ inputs as plain data
    def settings(self) -> PredictSettings:
        return PredictSettings(
            checkpoint=self.checkpoint_value(),
            n_samples=int(self.n_samples.value),
            intervals=INTERVAL_CHOICES[self.intervals.value],
            steps=int(self.steps.value),
            sampler=str(self.sampler.value),
            device=str(self.device.value),
            seed=int(self.seed.value),
            encoder_weights=self.encoder_weights.value,
            mpp_override=float(self.mpp.value),
            grid=GridSpec(
                pitch_um=float(self.pitch_um.value),
                spot_diameter_um=float(self.diameter_um.value),
                min_tissue_fraction=float(self.min_tissue.value),
            ),
        )

    def slide_input(self) -> SlideInput | None:
        layer = self.slide.value
        if layer is None:
            return None
        path = layer.metadata.get("path") or getattr(layer.source, "path", None)
        mpp = layer.metadata.get("mpp") if layer.metadata.get("napari_stem") == "slide" else _file_mpp(path)
        units = tuple(str(u) for u in layer.units[-2:])
        frame = SlideFrame(
            scale=tuple(float(s) for s in layer.scale[-2:]),
            translate=tuple(float(t) for t in layer.translate[-2:]),
            units=None if units == ("pixel", "pixel") else units,
        )
        return SlideInput(name=layer.name, path=Path(path) if path else None, mpp=mpp, frame=frame)

    def spots_input(self) -> PointsInput | str | None:
        value = self.spots.value
        if value is None or isinstance(value, str):
            return value
        size = np.asarray(value.size, dtype=np.float64)
        diameter = float(np.median(size)) if size.size else 0.0
        return PointsInput(
            name=value.name,
            world_rc=_to_world(value, value.data),
            diameter_world=diameter * float(np.mean(np.abs(value.scale[-2:]))),
            features=value.features,
        )

    def region_input(self) -> RegionInput | None:
        value = self.region.value
        if value is None or isinstance(value, str):
            return None
        self._adopt_slide_units(value)
        return RegionInput(
            name=value.name,
            shapes=[
                (shape_type, _to_world(value, vertices))
                for shape_type, vertices in zip(value.shape_type, value.data, strict=True)
            ],
        )

    def _adopt_slide_units(self, layer: Any) -> None:
        """A region drawn in a unit-less layer over a µm slide gets the slide's units.

        napari places unit-less layers by their numbers, which over a µm slide are µm already;
        saying so keeps the picture and stops napari's "Inconsistent units across layers" warning
        each time a layer is added.
        """
        slide = self.slide.value
        if layer is None or isinstance(layer, str) or slide is None:
            return
        pixels = all(str(unit) == "pixel" for unit in layer.units)
        slide_units = tuple(str(unit) for unit in slide.units)
        if pixels and "pixel" not in slide_units and np.allclose(layer.scale, 1) and layer.ndim == len(slide_units):
            layer.units = slide_units

    # ------------------------------------------------------------------ run
    def _on_run(self, *_: Any) -> None:
        block_triton_if_llvm_loaded()
        checkpoint = self.checkpoint_value()
        if checkpoint is not None and self.controller.needs_download(checkpoint):
            self._run_when_fetched = str(checkpoint)  # the run starts when the download is done
            self._fetch_checkpoint(str(checkpoint))
            self._set_status(f"fetching {checkpoint} from the Hugging Face Hub; the prediction starts when it is here…")
            return
        try:
            job = self.controller.prepare(self.slide_input(), self.spots_input(), self.region_input(), self.settings())
        except StemError as exc:
            self._set_status(str(exc))
            show_error(str(exc))
            return
        from napari_stem.known_models import remember_checkpoint

        remember_checkpoint(job.checkpoint)
        self.preview.hide()
        self.controller.start(job)
        self._set_running(True)
        self._show_progress()
        handlers = {
            "yielded": partial(self._on_yielded, job.job_id),
            "returned": partial(self._on_returned, job.job_id),
            "errored": partial(self._on_errored, job.job_id),
        }
        if not self.use_threads:
            self._run_synchronously(job, handlers)
            return
        from napari.qt.threading import create_worker

        events = self.controller.run(job)

        def work():  # a generator function, so napari makes a GeneratorWorker
            return (yield from events)

        self.worker = create_worker(
            work,
            _start_thread=False,
            _connect={
                **handlers,
                "aborted": partial(self._on_aborted, job.job_id, events),
                "finished": self._on_worker_finished,
            },
        )
        self.worker.start()

    def _run_synchronously(self, job: Any, handlers: dict[str, Any]) -> None:
        """The worker's loop in the GUI thread: same generator, same handlers, deterministic."""
        events = self.controller.run(job)
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration as stop:
                    outcome = stop.value
                    break
                handlers["yielded"](event)
        except Exception as exc:  # shown to the user, like the worker's errored signal
            handlers["errored"](exc)
            return
        finally:
            events.close()
        handlers["returned"](outcome)

    def _on_cancel(self, *_: Any) -> None:
        """Stop at the next denoising step or embedding batch (the worker checks between them)."""
        self.controller.request_cancel()
        self._set_status(self.controller.message)
        if self.worker is not None:
            self.worker.quit()

    def _on_yielded(self, job_id: int, event: Any) -> None:
        update = self.controller.apply(job_id, event)
        if update is None:
            return
        self._show_progress()
        if update.values_changed:
            self._draw_result()

    def _on_returned(self, job_id: int, outcome: str) -> None:
        status = self.controller.finish(job_id, outcome)
        if status is None:
            return
        self._set_running(False)
        self._show_progress()
        if status == "done":
            self._draw_result()
        elif status == "cancelled":
            self._remove_result_layers()
            if self.controller.result is not None:
                self._draw_result(suffix=f" (partial {self.controller.result.done}/{len(self.controller.job.spots)})")
            show_info(self.controller.message)
        else:
            self._remove_result_layers()
            show_error(self.controller.message)

    def _on_aborted(self, job_id: int, events: Any) -> None:
        """worker.quit() took effect: the worker loop has left, so close the generator here
        (runs its cleanup, e.g. removing a half-written embedding cache) and keep finished spots."""
        events.close()
        self._on_returned(job_id, "cancelled")

    def _on_errored(self, job_id: int, error: BaseException) -> None:
        message = self.controller.fail(job_id, error)
        if message is None:
            return
        self._set_running(False)
        self._remove_result_layers()
        self._set_status(message)
        show_error(message)

    def _on_worker_finished(self, *_: Any) -> None:
        self.worker = None
        if self.controller.running:  # aborted before the generator could report (should not happen)
            self._on_returned(self.controller.job.job_id, "cancelled")

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        self.export_button.enabled = not running

    def _show_progress(self) -> None:
        """The bar runs over the whole job (embedding, then sampling step by step)."""
        self.progress.max = 1000
        self.progress.value = round(1000 * self.controller.fraction)
        self._set_status(self.controller.message)

    def _set_status(self, text: str) -> None:
        self.status.value = text if len(text) <= 160 else text[:157] + "…"
        self.status.tooltip = text

    # ------------------------------------------------------------------ result layers
    def _draw_result(self, suffix: str = "") -> None:
        """Create the result layers at the first batch, then update their values in place.

        The mean is added last (on top) and selected; the uncertainty layer below it, hidden.
        """
        result = self.controller.result
        if result is None:
            return
        layers_ok = self._result_layers and all(layer in self._viewer.layers for layer in self._result_layers.values())
        if self._layers_result is not result or not layers_ok:
            self._replace_previous_layers()
            self._layers_result = result
            gene = self.gene.value if self.gene.value in result.genes else result.genes[0]
            for role in ROLES:
                kind = "mean" if role == "mean" else str(self.uncertainty.value)
                if kind == "interval width" and not has_interval(result.prediction):
                    kind = "sd"
                data, kwargs, layer_type = prediction_layer_data(
                    result.prediction, result.spots, kind, gene,
                    frame=result.job.frame, suffix=suffix, shown=result.shown,
                    slide_path=str(result.job.slide_path), visible=role == "mean",
                    opacity=float(self.opacity.value),
                )  # fmt: skip
                layer = Layer.create(data, kwargs, layer_type)
                layer.metadata["all_genes"] = bool(self.hover_all_genes.value)
                self._viewer.add_layer(layer)
                result_layers.show(layer)
                self._result_layers[role] = layer
                self._given_names[id(layer)] = layer.name
            self._viewer.layers.selection.active = self._result_layers["mean"]
            self._refresh_genes()
            if self.gene.value != gene and gene in self.gene.choices:
                self.gene.value = gene
            return
        for layer in self._result_layers.values():
            layer.shown = result.shown
            self._show(layer)

    def _replace_previous_layers(self) -> None:
        """Remove this widget's earlier result layers unless the user renamed them (to keep them)."""
        for layer in list(self._result_layers.values()):
            if layer in self._viewer.layers and layer.name == self._given_names.get(id(layer)):
                self._viewer.layers.remove(layer)
        self._result_layers = {}

    def _remove_result_layers(self) -> None:
        """Remove the layers of the job that just ended (a failed or cancelled run leaves the
        previous run's layers alone)."""
        if self._layers_result is None or self._layers_result.job is not self.controller.job:
            return
        for layer in list(self._result_layers.values()):
            if layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
        self._result_layers = {}
        self._layers_result = None

    # ------------------------------------------------------------------ spot inspector
    def _on_canvas_click(self, viewer: Any, event: Any) -> Any:
        """A click (press and release without dragging) on a predicted spot opens the inspector."""
        if getattr(event, "button", 1) != 1 or event.type != "mouse_press":
            return
        position = np.asarray(event.position, dtype=float)
        yield
        dragged = False
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged:
            self.inspect_at(position)

    def inspect_at(self, world_position: Any) -> Any:
        """Show the spot under ``world_position`` of the active (else topmost shown) prediction layer."""
        from napari_stem.plugin.inspector import nearest_spot

        layers = [layer for layer in self.prediction_layers() if layer.visible]
        active = self._viewer.layers.selection.active
        if active in layers:
            layers = [active]
        for layer in reversed(layers):
            size = np.asarray(layer.size, dtype=float)
            radius = (float(np.median(size)) if size.size else 0.0) / 2 * float(np.mean(np.abs(layer.scale[-2:])))
            index = nearest_spot(world_position, _to_world(layer, layer.data), radius, shown=layer.shown)
            if index is not None:
                return self.inspect(layer, index)
        return None

    def inspect(self, layer: Any, index: int) -> Any:
        """Fill the inspector dock with spot ``index`` of ``layer`` for its displayed gene."""
        from napari_stem.plugin.inspector import spot_report
        from napari_stem.plugin.inspector_widget import SpotInspector

        meta = layer.metadata
        barcodes = np.asarray(meta["spots"].barcodes, dtype=str)
        if "barcode" in layer.features and index < len(layer.features):  # the row, even if points were deleted
            rows = np.flatnonzero(barcodes == str(layer.features["barcode"].iloc[index]))
            index = int(rows[0]) if rows.size else index
        report = spot_report(meta["prediction"], meta["spots"], index, meta.get("gene") or meta["genes"][0])
        if self.inspector is None:
            self.inspector = SpotInspector()
            self._viewer.window.add_dock_widget(self.inspector, name="Spot inspector", area="right")
        self.inspector.show_report(report)
        return report

    def prediction_layers(self) -> list[Any]:
        """Every napari-stem prediction layer in the viewer (this widget's and re-opened files)."""
        return [layer for layer in self._viewer.layers if layer.metadata.get("napari_stem") == "prediction"]

    # ------------------------------------------------------------------ genes
    def _refresh_genes(self, *_: Any) -> None:
        """Gene choices from every prediction layer, narrowed by the filter. A filter that matches
        nothing leaves the choices (and the chosen gene) alone and says so."""
        genes: dict[str, None] = {}
        for layer in self.prediction_layers():
            genes.update(dict.fromkeys(layer.metadata.get("genes", [])))
        text = str(self.gene_filter.value or "").strip().lower()
        choices = [gene for gene in genes if text in gene.lower()]
        if not choices and genes:
            self.gene_filter.tooltip = f"no gene contains '{text}'"
            self._set_status(f"no gene contains '{text}'; showing {self.gene.value}")
            return
        self.gene_filter.tooltip = "Type part of a gene name to narrow the list"
        if list(self.gene.choices) == choices:
            return
        current = self.gene.value
        with self.gene.changed.blocked():  # magicgui keeps old items first; rebuild to keep gene order
            self.gene.choices = []
            self.gene.choices = choices
            if current in choices:
                self.gene.value = current
        if self.gene.value != current:
            self._apply_gene(self.gene.value)

    def _apply_gene(self, gene: str | None = None, *_: Any) -> None:
        """Show ``gene`` on every prediction layer: features, colours, names, colorbar labels."""
        gene = gene if gene is not None else self.gene.value
        if gene is None:
            return
        for layer in self.prediction_layers():
            if gene in layer.metadata.get("genes", []):
                self._show(layer, gene=gene)

    def _apply_uncertainty(self, kind: str | None = None, *_: Any) -> None:
        """Switch every uncertainty layer between sd, variance and interval width (a prediction
        without intervals or kept samples keeps its sd, and the status says so)."""
        kind = kind or str(self.uncertainty.value)
        without = []
        for layer in self.prediction_layers():
            if layer.metadata.get("kind") in UNCERTAINTY_KINDS:
                usable = kind != "interval width" or has_interval(layer.metadata["prediction"])
                if not usable:
                    without.append(layer.name)
                self._show(layer, kind=kind if usable else "sd")
        if without:
            self._set_status(f"no intervals or kept samples behind {', '.join(without)}: showing the sd there")

    def _apply_opacity(self, value: float | None = None, *_: Any) -> None:
        for layer in self.prediction_layers():
            layer.opacity = float(self.opacity.value if value is None else value)

    def _apply_hover(self, value: bool | None = None, *_: Any) -> None:
        for layer in self.prediction_layers():
            self._show(layer, all_genes=bool(self.hover_all_genes.value if value is None else value))

    def _show(self, layer: Any, **changes: Any) -> None:
        """:func:`result_layers.show`, keeping "rename to keep" working for this widget's layers."""
        was_given = self._given_names.get(id(layer)) == layer.name
        result_layers.show(layer, **changes)
        if was_given:
            self._given_names[id(layer)] = layer.name

    # ------------------------------------------------------------------ export
    def _on_export(self, *_: Any) -> None:
        try:
            layer = self._export_layer()
            path = (
                self.controller.export(self.export_path.value)
                if layer is None
                else _export_layer(layer, self.export_path.value)
            )
        except StemError as exc:
            self._set_status(str(exc))
            show_error(str(exc))
            return
        except OSError as exc:
            message = f"could not write '{self.export_path.value}': {exc}. Choose another folder or file name."
            self._set_status(message)
            show_error(message)
            return
        self._set_status(f"exported {path}")
        show_info(f"napari-stem: exported the prediction to {path}")

    def _export_layer(self) -> Any:
        """The selected prediction layer when it is not this widget's current result (a re-opened
        file, an earlier run kept under another name): Export writes what the user looks at."""
        active = self._viewer.layers.selection.active
        if not result_layers.is_prediction_layer(active):
            return None
        result = self.controller.result
        return None if result is not None and active.metadata["prediction"] is result.prediction else active

    def close(self) -> None:
        """Stop a running job before the widget goes away."""
        self.preview.close()
        if self._on_canvas_click in self._viewer.mouse_drag_callbacks:
            self._viewer.mouse_drag_callbacks.remove(self._on_canvas_click)
        self.controller.request_cancel()
        if self.worker is not None:
            self.worker.quit()
        super().close()


# ---------------------------------------------------------------------- helpers
def _export_layer(layer: Any, path: Any) -> Path:
    """A prediction layer through the npe2 writers (the same files as File > Save Selected Layers)."""
    from napari_stem.plugin.writer import write_csv, write_h5ad

    if path is None or str(path) in ("", "."):
        raise StemError("choose a file to export to ('export to'), ending in .h5ad or .csv.")
    suffix = Path(path).suffix.lower()
    if suffix not in (".h5ad", ".csv"):
        raise StemError(f"cannot export to {path}: use a file name ending in .h5ad or .csv.")
    writer = write_csv if suffix == ".csv" else write_h5ad
    (written,) = writer(str(path), [(layer.data, {"metadata": layer.metadata, "features": layer.features}, "points")])
    return Path(written)


def _is_slide_layer(layer: Any) -> bool:
    if layer._type_string != "image":
        return False
    return layer.metadata.get("napari_stem") == "slide" or bool(getattr(layer.source, "path", None))


def _file_mpp(path: str | None) -> float | None:
    """µm/px recorded in a slide file opened by another reader (None when unreadable or absent)."""
    if not path:
        return None
    from napari_stem.slide import open_slide

    try:
        with open_slide(path) as slide:
            return slide.mpp
    except StemError:
        return None


def _to_world(layer: Any, coords: Any) -> np.ndarray:
    """Layer data coordinates → world ``(row, col)``; vectorised for scale + translate layers."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.size == 0:
        return np.zeros((0, 2))
    ndim = layer.ndim
    plain = (
        np.allclose(layer.rotate, np.eye(ndim))
        and np.allclose(layer.shear, 0)
        and np.allclose(layer.affine.affine_matrix, np.eye(ndim + 1))
    )
    if plain:
        world = coords * np.asarray(layer.scale) + np.asarray(layer.translate)
    else:
        world = np.array([layer.data_to_world(point) for point in coords])
    return world[:, -2:]


def build_demo_model() -> Path:
    """Train the demo model once (slow: see :data:`napari_stem.datasets.DEMO_BUILD_TIME`).

    The plugin asks the training toolkit, shipped beside it, to build it; the core never imports it.
    """
    from stem_train.demo import FULL, ensure_demo_model

    return ensure_demo_model(FULL).checkpoint
