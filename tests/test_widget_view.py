"""What the user sees of a prediction: default layers, names, colorbars, hover, progress and cancel.

Real napari under Xvfb, the widget docked through the manifest and driven through its controls,
on the demo slide with the tiny model (fixtures shared with test_widget).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from test_widget import GENES, ROI, embedding_cache, errors, open_widget, tiny_checkpoint  # noqa: F401 - fixtures

gui = pytest.mark.gui


def _hover(viewer, world_rc) -> str:
    """The status line napari shows with the cursor at ``world_rc``."""
    viewer.mouse_over_canvas = True
    viewer.cursor.position = tuple(world_rc)
    viewer.update_status_from_cursor()
    status = viewer.status
    return status if isinstance(status, str) else str(status.get("coordinates", status))


@gui
def test_mean_on_top_uncertainty_one_click_away(open_widget, errors, monkeypatch: pytest.MonkeyPatch) -> None:
    viewer, widget = open_widget(threads=False)
    warnings_shown: list[str] = []
    monkeypatch.setattr("napari._vispy.canvas.show_warning", warnings_shown.append)
    pixel_roi = viewer.add_shapes(
        [ROI], shape_type="rectangle", name="roi px", face_color="transparent"
    )  # no units: pixels
    assert str(pixel_roi.units[0]) == "pixel"
    widget.region.value = pixel_roi
    warnings_shown.clear()
    widget.run_button.clicked()
    assert widget.controller.status == "done", errors
    assert warnings_shown == []  # the region adopted the slide's µm: no "Inconsistent units" pop-ups
    assert tuple(str(u) for u in pixel_roi.units) == ("micrometer", "micrometer") or tuple(pixel_roi.units) == tuple(
        viewer.layers[0].units
    )

    # mean on top, selected, visible; its uncertainty right below, hidden; names carry the gene
    names = [layer.name for layer in viewer.layers]
    assert names[-2:] == ["GA sd", "GA mean"]
    mean, sd = viewer.layers["GA mean"], viewer.layers["GA sd"]
    assert mean.visible and not sd.visible and viewer.layers.selection.active is mean
    assert 0.3 <= mean.opacity < 1.0  # the tissue shows through
    from napari_stem.plugin.result_layers import colorbar_text

    assert colorbar_text(mean) == "GA mean · log2(1+count)" and colorbar_text(sd) == "GA sd · log2(1+count)"
    assert mean.face_colorbar.visible and mean.face_colorbar.size[1] >= 200
    assert mean.face_contrast_limits[0] >= 0.0  # log counts: the scale starts at 0 at the lowest

    # one click: the uncertainty; the switch turns it into a variance, with its unit
    sd.visible = True
    widget.uncertainty.value = "variance"
    assert sd.name == "GA variance" and colorbar_text(sd) == "GA variance · (log2(1+count))²"
    prediction = widget.controller.result.prediction
    np.testing.assert_allclose(sd.features["GA variance"], prediction.variance[:, 0])
    assert str(sd.face_color_mode) == "colormap" and sd.face_colormap.name == "magma"
    widget.uncertainty.value = "interval width"  # of the widest interval K = 2 samples give: [min, max]
    samples = prediction.samples[:, :, 0]
    assert sd.name == "GA interval width" and colorbar_text(sd) == "GA interval width · log2(1+count)"
    np.testing.assert_allclose(sd.features["GA interval width"], samples.max(axis=1) - samples.min(axis=1), rtol=1e-5)
    widget.uncertainty.value = "sd"

    # the opacity control acts on every prediction layer
    widget.opacity.value = 0.4
    assert mean.opacity == pytest.approx(0.4) and sd.opacity == pytest.approx(0.4)

    # gene picker: names, colours and labels follow
    widget.gene.value = "GC"
    assert (mean.name, sd.name) == ("GC mean", "GC sd") and colorbar_text(mean) == "GC mean · log2(1+count)"
    # a renamed layer keeps the user's name
    mean.name = "my favourite"
    widget.gene.value = "GD"
    assert mean.name == "my favourite" and sd.name == "GD sd" and mean.face_color_mode == "colormap"
    mean.name = "GD mean"

    # hover: the displayed gene first, mean then sd, then the barcode; other genes only on request
    index = 0
    spot = mean.data[index]
    status = _hover(viewer, spot)
    values = status.split(";", 1)[1]
    assert values.strip().startswith(f"GD mean: {mean.features['GD mean'][index]:.3g}"[:12])
    assert values.index("GD mean") < values.index("GD sd") < values.index("barcode")
    assert "GA" not in values and "GE" not in values
    widget.hover_all_genes.value = True
    assert "GE mean" in _hover(viewer, spot)
    widget.hover_all_genes.value = False

    # a filter that matches nothing keeps the chosen gene (and says so)
    widget.gene_filter.value = "zzz"
    assert widget.gene.value == "GD" and "zzz" in widget.status.value
    widget.gene_filter.value = ""
    assert widget.gene.value == "GD" and list(widget.gene.choices) == GENES
    assert errors == []


@gui
def test_progress_moves_during_sampling_and_cancel_is_quick(open_widget, qtbot, errors) -> None:
    """Hundreds of denoising steps: the bar must move every ≤ 2 s and Cancel act within 2 s."""
    viewer, widget = open_widget(threads=True)
    widget.steps.value = 999  # the most the default (few-step) sampler takes
    widget.n_samples.value = 16  # 80 rows × 999 steps: several seconds even on a fast machine
    widget.controller.sample_batch_size = 5  # one batch: only step events can move the bar
    moves: list[tuple[float, int, str]] = []
    widget.progress.changed.connect(lambda value: moves.append((time.perf_counter(), int(value), widget.status.value)))

    def sampling_moves() -> list[tuple[float, int, str]]:
        return [move for move in moves if "sampling" in move[2]]

    widget.run_button.clicked()
    qtbot.waitUntil(lambda: len(sampling_moves()) >= 6 or not widget.controller.running, timeout=60_000)
    sampling = sampling_moves()
    assert len(sampling) >= 6, moves
    gaps = np.diff([t for t, _, _ in sampling])
    assert gaps.max() <= 2.0, gaps
    assert all(b[1] >= a[1] for a, b in zip(sampling, sampling[1:], strict=False))  # it only moves forward
    assert "step" in sampling[-1][2] and "of 5" in sampling[-1][2]  # the status names the phase and what's left
    print(f"progress updates while sampling: every {gaps.mean():.2f} s on average, at most {gaps.max():.2f} s")

    assert widget.controller.running
    clicked = time.perf_counter()
    widget.cancel_button.clicked()
    qtbot.waitUntil(lambda: not widget.controller.running and widget.worker is None, timeout=10_000)
    latency = time.perf_counter() - clicked
    print(f"cancel latency: {latency:.2f} s")
    assert latency <= 2.0
    assert widget.controller.status == "cancelled" and errors == []
    assert widget.run_button.enabled


def test_controller_reports_steps_and_time_left() -> None:
    from types import SimpleNamespace

    from napari_stem.plugin.controller import PredictController
    from test_widget import _fake_job

    controller = PredictController()
    job = _fake_job(controller)
    controller.start(job)
    controller.apply(job.job_id, SimpleNamespace(stage="embed", done=5, total=5, from_cache=True, metadata=None))
    assert controller.fraction == pytest.approx(0.5)
    step = SimpleNamespace(start=0, stop=2, total_spots=5, step=10, n_steps=40)
    metadata = {"target_transform": "log2p1", "device": "cpu", "precision": "fp32", "patch": {"mode": "hest"}}
    assert (
        controller.apply(
            job.job_id, SimpleNamespace(stage="step", done=0, total=5, batch=step, metadata=metadata)
        ).stage
        == "step"
    )
    assert controller.fraction == pytest.approx(0.5 + 0.5 * 0.5 / 5)
    assert controller.message.startswith("sampling spots 1–2 of 5: step 10/40")
    controller._stage_started_at -= 10  # pretend the step took 10 s: a time left appears
    controller.apply(job.job_id, SimpleNamespace(stage="step", done=0, total=5, batch=step, metadata=metadata))
    assert "left" in controller.message
    from test_widget import _sample_event

    event = _sample_event(0, 2)
    event.metadata = metadata
    controller.apply(job.job_id, event)
    assert {"target_transform", "device", "precision", "patch", "slide", "mpp"} <= set(
        controller.result.prediction.metadata
    )


@gui
def test_preview_shows_spots_mask_count_and_cost_before_predict(
    make_napari_viewer, qtbot, demo_slide_file: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import shutil

    from napari_stem.grid import spots_over_tissue
    from napari_stem.slide import open_slide
    from napari_stem.values import GridSpec
    from test_widget import WIDGET

    def shown(before=None):
        return lambda: (
            widget.preview.preview is not before
            and "spot preview" in viewer.layers
            and viewer.layers["spot preview"].visible
        )

    viewer = make_napari_viewer()
    viewer.open(str(demo_slide_file), plugin="napari-stem")
    started = time.perf_counter()
    _, widget = viewer.window.add_plugin_dock_widget("napari-stem", WIDGET)
    widget.use_threads = True
    assert widget.spots.value == "grid over tissue"
    qtbot.waitUntil(shown(), timeout=60_000)
    print(f"first preview (widget docked over the open demo slide): {time.perf_counter() - started:.2f} s")
    # choosing a slide never seen (a copy of the demo slide): its tissue is found now, in a worker
    viewer.open(str(shutil.copy(demo_slide_file, tmp_path / "other_slide.svs")), plugin="napari-stem")
    before = widget.preview.preview
    started = time.perf_counter()
    widget.slide.value = viewer.layers["other_slide"]
    qtbot.waitUntil(shown(before), timeout=60_000)
    chosen = time.perf_counter() - started
    print(f"preview after choosing another slide (its tissue mask found in a worker): {chosen:.2f} s")
    assert chosen <= 1.0
    viewer.layers.remove("other_slide")
    qtbot.waitUntil(lambda: widget.slide.value is viewer.layers["cmu_small_region"], timeout=5_000)
    preview = viewer.layers["spot preview"]
    with open_slide(demo_slide_file) as slide:
        expected = widget.controller.grids.grid(demo_slide_file, slide.mpp)  # what a run predicts
        full_resolution = spots_over_tissue(slide)  # the mask on the decoded level, not the stored thumbnail
    assert len(preview.data) == len(expected)
    np.testing.assert_allclose(np.sort(preview.data, axis=0), np.sort(expected.napari_coords_um, axis=0))
    assert abs(len(expected) - len(full_resolution)) <= 0.05 * len(full_resolution)
    assert widget.preview_info.value.startswith(f"~{len(expected)} spots")

    def redraw_after(change) -> float:  # seconds from a control change to the new preview
        before = widget.preview.preview
        started = time.perf_counter()
        change()
        qtbot.waitUntil(lambda: widget.preview.preview is not before, timeout=5_000)
        return time.perf_counter() - started

    seconds = [redraw_after(lambda: setattr(widget.pitch_um, "value", 150.0))]
    assert len(preview.data) < len(expected)
    seconds.append(redraw_after(lambda: setattr(widget.diameter_um, "value", 80.0)))
    seconds.append(redraw_after(lambda: setattr(widget.min_tissue, "value", 0.9)))
    assert len(preview.data) == len(widget.controller.grids.grid(demo_slide_file, 0.499, GridSpec(150.0, 80.0, 0.9)))
    widget.pitch_um.value, widget.diameter_um.value = 100.0, 55.0
    seconds.append(redraw_after(lambda: setattr(widget.min_tissue, "value", 0.5)))
    # a region: spots inside are cyan, the rest grey; the count is the region's
    roi = viewer.add_shapes([ROI], shape_type="rectangle", name="roi", units=("um", "um"), face_color="transparent")
    seconds.append(redraw_after(lambda: setattr(widget.region, "value", roi)))
    cyan = (preview.border_color[:, 2] == 1.0) & (preview.border_color[:, 0] == 0.0)
    assert cyan.sum() == 5 and len(preview.data) == len(expected)
    assert widget.preview_info.value.startswith("~5 spots (choose a checkpoint")
    # drawing in the region layer redraws too
    seconds.append(redraw_after(lambda: roi.add_rectangles(np.array([[0.0, 0.0], [400.0, 400.0]]))))
    assert cyan.sum() <= ((preview.border_color[:, 2] == 1.0) & (preview.border_color[:, 0] == 0.0)).sum()
    roi.selected_data = {1}
    roi.remove_selected()
    # with a checkpoint: the cost, from the spot count and this device
    seconds.append(redraw_after(lambda: setattr(widget.checkpoint, "value", tiny_checkpoint)))
    assert "~5 spots · ~" in widget.preview_info.value and "on cpu" in widget.preview_info.value
    print(f"preview redraws after a change: {', '.join(f'{s:.2f}' for s in seconds)} s")
    assert max(seconds) <= 1.0
    # the tissue mask, toggled, under the spots and over the slide
    seconds = redraw_after(lambda: setattr(widget.show_mask, "value", True))
    assert seconds <= 1.0
    mask = viewer.layers["tissue mask"]
    names = [layer.name for layer in viewer.layers]
    assert mask.visible and names.index("cmu_small_region") < names.index("tissue mask") < names.index("spot preview")
    assert mask.data.any() and not mask.data.all()
    extent = mask.extent.world[1] - mask.extent.world[0]
    slide_extent = viewer.layers["cmu_small_region"].extent.world[1] - viewer.layers["cmu_small_region"].extent.world[0]
    np.testing.assert_allclose(extent, slide_extent, rtol=0.01)  # the mask covers the slide, in µm
    redraw_after(lambda: setattr(widget.show_mask, "value", False))
    assert not mask.visible


@gui
def test_clicking_a_spot_opens_the_inspector_with_its_samples(open_widget, qtbot, errors) -> None:
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    from napari_stem.intervals import plan_intervals

    viewer, widget = open_widget(show=True, threads=False)
    widget.n_samples.value = 3  # K = 3: [min, max] is an exact 50 % interval; no exact 90 % one
    widget.run_button.clicked()
    assert widget.controller.status == "done", errors
    mean = viewer.layers["GA mean"]
    widget.gene.value = "GB"
    index = 3
    spot = mean.data[index] + np.array([5.0, -5.0])  # inside the 55 µm disc, off its centre

    class Event:  # what napari's canvas sends (world position)
        def __init__(self, kind: str, position) -> None:
            self.type, self.position, self.button, self.is_dragging, self.modifiers = (
                kind,
                tuple(position),
                1,
                False,
                [],
            )
            self.handled = False

    def click(position) -> None:
        press = ReadOnlyWrapper(Event("mouse_press", position), exceptions=("handled",))
        mouse_press_callbacks(viewer, press)
        mouse_release_callbacks(viewer, ReadOnlyWrapper(Event("mouse_release", position), exceptions=("handled",)))

    # a drag (pan) is not a click
    press = ReadOnlyWrapper(Event("mouse_press", spot), exceptions=("handled",))
    mouse_press_callbacks(viewer, press)
    moved = Event("mouse_move", spot + 30)
    moved.is_dragging = True
    mouse_move_callbacks(viewer, ReadOnlyWrapper(moved, exceptions=("handled",)))
    mouse_release_callbacks(viewer, ReadOnlyWrapper(Event("mouse_release", spot + 30), exceptions=("handled",)))
    assert widget.inspector is None

    click(spot)
    inspector = widget.inspector
    assert inspector is not None
    qtbot.waitUntil(inspector.isVisible, timeout=2_000)
    report = inspector.report
    prediction = widget.controller.result.prediction
    row = list(prediction.genes).index("GB")
    assert report.barcode == mean.features["barcode"][index] and report.gene == "GB" and report.unit == "log2(1+count)"
    samples = prediction.samples[index, :, row]
    np.testing.assert_allclose(report.samples, samples)
    assert report.mean == pytest.approx(samples.mean(), rel=1e-5) and report.sd == pytest.approx(
        samples.std(ddof=1), rel=1e-4
    )
    (interval,) = report.intervals  # only what 3 samples give, at the level they give
    assert interval.low == pytest.approx(samples.min()) and interval.high == pytest.approx(samples.max())
    assert interval.level == pytest.approx(0.5) and interval.label == plan_intervals((0.5, 0.9), 3)[0].label
    assert "50 % interval from 3 samples" in inspector.summary.text() and "GB" in inspector.summary.text()
    counts, _ = inspector.histogram.counts()
    assert counts.sum() == 3
    qtbot.wait(100)
    shot = inspector.histogram.grab().toImage()
    assert shot.width() > 50 and shot.height() >= 150
    # a click on glass shows nothing new
    click(np.array([10.0, 10.0]))
    assert inspector.report is report


@gui
def test_spaceranger_outs_open_with_their_he_under_the_spots(make_napari_viewer, spaceranger_outs: Path) -> None:
    viewer = make_napari_viewer()
    viewer.open(str(spaceranger_outs), plugin="napari-stem")
    image, spots = viewer.layers
    assert image.rgb and "H&E" in image.name and spots.name.endswith("spots")
    assert tuple(image.units) == tuple(spots.units) and str(spots.units[0]) == "micrometer"
    # aligned: spots (all under tissue in filtered_feature_bc_matrix) sit on stained pixels, not on glass
    pixels = np.round((spots.data * spots.scale - image.translate) / image.scale).astype(int)
    assert (pixels >= 0).all() and (pixels < np.asarray(image.data.shape[:2])).all()
    rgb = np.asarray(image.data, dtype=float)
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    under_spots = saturation[pixels[:, 0], pixels[:, 1]]
    assert np.median(under_spots) > 4 * np.median(saturation)
    on_tissue = (under_spots > 8).mean()
    shifted = saturation[
        np.clip(pixels[:, 0] + 60, 0, rgb.shape[0] - 1), np.clip(pixels[:, 1] + 60, 0, rgb.shape[1] - 1)
    ]
    print(f"spots on stained pixels: {on_tissue:.0%} (frame shifted by 60 px: {(shifted > 8).mean():.0%})")
    assert on_tissue > 0.7 and on_tissue > (shifted > 8).mean() + 0.15


@gui
def test_reopened_prediction_brings_its_slide_and_labelled_colorbars(
    open_widget, qtbot, errors, tmp_path: Path, demo_slide_file: Path
) -> None:
    from napari_stem.plugin.result_layers import colorbar_text

    viewer, widget = open_widget(threads=False)
    widget.run_button.clicked()
    widget.export_path.value = tmp_path / "saved.h5ad"
    widget.export_button.clicked()
    viewer.layers.clear()
    viewer.open(str(tmp_path / "saved.h5ad"), plugin="napari-stem")
    slide, sd, mean = [layer for layer in viewer.layers if layer.metadata.get("napari_stem") != "preview"]
    assert slide.metadata["path"] == str(demo_slide_file) and slide.rgb  # the recorded slide, in the same µm frame
    assert (sd.name, mean.name) == ("saved GA sd", "saved GA mean") and mean.visible and not sd.visible
    assert tuple(slide.units) == tuple(mean.units)
    qtbot.waitUntil(lambda: colorbar_text(mean) is not None, timeout=2_000)
    assert colorbar_text(mean) == "GA mean · log2(1+count)" and mean.face_colorbar.visible
    # the kept samples come back too: the inspector shows them for a re-opened spot
    report = widget.inspect_at(mean.data[1])
    np.testing.assert_allclose(report.samples, widget.controller.result.prediction.samples[1, :, 0])
    # the widget's Export works for re-opened layers too (the active prediction layer)
    widget.reset_choices()
    viewer.layers.selection.active = mean
    widget.export_path.value = tmp_path / "again.csv"
    widget.export_button.clicked()
    assert errors == [] and (tmp_path / "again.csv").exists()


@gui
def test_known_models_list_the_demo_model_and_recent_checkpoints(
    open_widget, qtbot, errors, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_stem import known_models

    monkeypatch.setattr(known_models, "_recent_file", lambda: tmp_path / "recent.json")
    monkeypatch.setattr(known_models, "demo_checkpoint", lambda: None)
    import napari_stem.plugin.widget as widget_module

    def build() -> Path:  # the slow build, stood in
        time.sleep(1.6)
        return tiny_checkpoint

    monkeypatch.setattr(widget_module, "build_demo_model", build)
    viewer, widget = open_widget(threads=True)
    widget.checkpoint.value = None
    widget.known_models.reset_choices()
    labels = [widget.known_models.native.itemText(i) for i in range(widget.known_models.native.count())]
    assert labels[1].startswith("demo model (built on first use, about") and len(labels) == 2
    widget.known_models.value = known_models.DEMO  # builds in a worker, then fills the checkpoint
    assert not widget.run_button.enabled and widget.progress.max == 0  # busy
    qtbot.waitUntil(lambda: "so far" in widget.status.value, timeout=5_000)  # the status counts the seconds
    qtbot.waitUntil(lambda: "demo model ready" in widget.status.value, timeout=30_000)
    assert Path(widget.checkpoint.value) == tiny_checkpoint and widget.run_button.enabled
    widget.use_threads = False
    widget.run_button.clicked()  # a used checkpoint is remembered
    assert widget.controller.status == "done", errors
    monkeypatch.setattr(known_models, "demo_checkpoint", lambda: tmp_path / "demo")
    widget.known_models.reset_choices()
    choices = widget.known_models.choices
    assert set(choices) == {None, str(tmp_path / "demo"), str(tiny_checkpoint.resolve())}, choices
    widget.checkpoint.value = None
    widget.known_models.value = str(tiny_checkpoint.resolve())
    assert Path(widget.checkpoint.value) == tiny_checkpoint.resolve() and "5 genes" in widget.checkpoint_info.value


@gui
def test_a_hest_folder_opened_later_becomes_the_spots(make_napari_viewer, synthetic_hest: Path) -> None:
    from test_widget import WIDGET

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-stem", WIDGET)
    assert widget.spots.value == "grid over tissue"
    viewer.open(str(synthetic_hest), plugin="napari-stem")
    image, spots = viewer.layers[:2]
    assert widget.slide.value is image and widget.spots.value is spots  # the folder's spots, not a grid
