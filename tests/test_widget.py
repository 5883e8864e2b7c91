"""The prediction widget, opened through the manifest, on the real demo slide with a tiny model.

Each test runs a few spots (a small region of the grid over tissue) with 2 samples × 2 steps; the
embedding cache is shared by the module so only the first run embeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tiny_models import save_tiny_checkpoint

gui = pytest.mark.gui

WIDGET = "Predict expression (Stem)"
GENES = ["GA", "GB", "GC", "GD", "GE"]
#: A 240 × 240 µm square over the demo tissue: 5 grid spots (the grid is checked below).
ROI = np.array([[839.3, 480.0], [839.3, 720.0], [1079.3, 720.0], [1079.3, 480.0]])


def _save_tiny_checkpoint(path: Path, *, encoder: str = "efficientnet_lite0", cond_dim: int = 1280) -> Path:
    return save_tiny_checkpoint(path, GENES, encoder=encoder, cond_dim=cond_dim)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def embedding_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture
def open_widget(make_napari_viewer, demo_slide_file: Path, tiny_checkpoint: Path, embedding_cache: Path):
    """A viewer with the demo slide and an ROI, and the widget docked through the manifest, set up."""

    def make(show: bool = False, threads: bool = False):
        viewer = make_napari_viewer(show=show)
        viewer.open(str(demo_slide_file), plugin="napari-stem")
        viewer.add_shapes([ROI], shape_type="rectangle", name="roi", units=("um", "um"), face_color="transparent")
        _, widget = viewer.window.add_plugin_dock_widget("napari-stem", WIDGET)
        widget.controller.embedding_cache_dir = embedding_cache
        widget.controller.sample_batch_size = 2  # 3 batches for 5 spots: partial results and cancel points
        widget.use_threads = threads
        widget.spots.value = "grid over tissue"
        widget.region.value = viewer.layers["roi"]
        widget.checkpoint.value = tiny_checkpoint
        widget.n_samples.value = 2
        widget.steps.value = 2
        widget.device.value = "cpu"
        return viewer, widget

    return make


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Messages the widget sends to napari.utils.notifications.show_error."""
    shown: list[str] = []
    monkeypatch.setattr("napari_stem.plugin.widget.show_error", shown.append)
    monkeypatch.setattr("napari_stem.plugin.widget.show_info", lambda message: None)
    return shown


def _expected_roi_spots(demo_slide_file: Path) -> np.ndarray:
    from napari_stem.grid import spots_over_tissue
    from napari_stem.slide import open_slide

    with open_slide(demo_slide_file) as slide:
        coords = spots_over_tissue(slide).napari_coords_um
    low, high = ROI.min(axis=0), ROI.max(axis=0)
    return coords[((coords >= low) & (coords <= high)).all(axis=1)]


def _wait_until_idle(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.controller.running and widget.worker is None, timeout=120_000)


def _predicted(open_widget, qtbot):
    """A viewer whose widget has predicted the ROI's 5 grid spots (in the GUI thread)."""
    viewer, widget = open_widget(threads=False)
    widget.run_button.clicked()
    assert widget.controller.status == "done", widget.status.value
    return viewer, widget


@gui
def test_predict_in_a_worker_draws_mean_and_sd_on_the_grid_spots(
    open_widget, qtbot, demo_slide_file: Path, errors
) -> None:
    viewer, widget = open_widget(threads=True)
    assert widget.slide.value is viewer.layers["cmu_small_region"]
    assert widget.checkpoint_info.value == "5 genes · encoder efficientnet_lite0 · hest patches"
    widget.run_button.clicked()
    assert widget.worker is not None and not widget.run_button.enabled and widget.cancel_button.enabled
    _wait_until_idle(qtbot, widget)
    assert errors == [] and widget.controller.status == "done", widget.status.value

    mean, sd = viewer.layers["GA mean"], viewer.layers["GA sd"]
    expected = _expected_roi_spots(demo_slide_file)
    assert len(mean.data) == len(sd.data) == len(expected) == 5
    np.testing.assert_allclose(np.sort(mean.data, axis=0), np.sort(expected, axis=0))  # on the grid spots, in µm
    prediction = widget.controller.result.prediction
    np.testing.assert_allclose(mean.features["GA mean"], prediction.mean[:, 0])
    np.testing.assert_allclose(sd.features["GA sd"], np.sqrt(prediction.variance[:, 0]), rtol=1e-6)
    assert (sd.features["GA sd"] > 0).all() and mean.shown.all()
    assert mean.face_colorbar.visible and sd.face_colorbar.visible
    assert mean.size[0] == pytest.approx(55.0) and tuple(mean.units) == tuple(viewer.layers["cmu_small_region"].units)
    assert widget.progress.value == widget.progress.max


@gui
def test_gene_switch_recolours_both_layers_with_their_own_limits_without_recomputing(
    open_widget, qtbot, errors
) -> None:
    from napari_stem.plugin.layers import gene_contrast_limits

    viewer, widget = _predicted(open_widget, qtbot)
    mean, sd = viewer.layers["GA mean"], viewer.layers["GA sd"]
    prediction = widget.controller.result.prediction
    assert list(widget.gene.choices) == GENES
    before = mean.face_color.copy()
    widget.gene.value = "GC"
    assert (mean.name, sd.name) == ("GC mean", "GC sd")  # the layers follow in name
    for layer, column in ((mean, "GC mean"), (sd, "GC sd")):
        limits = gene_contrast_limits(layer.features[column], lower_bound=0.0)
        assert layer.face_contrast_limits == pytest.approx(limits)
        scaled = np.clip((layer.features[column].to_numpy() - limits[0]) / (limits[1] - limits[0]), 0, 1)
        np.testing.assert_allclose(layer.face_color, layer.face_colormap.map(scaled), atol=1e-5)
    assert not np.allclose(before, mean.face_color)
    assert widget.controller.result.prediction is prediction  # nothing was recomputed
    assert errors == []


@gui
def test_gene_filter_narrows_the_choices_and_recolours_to_the_match(open_widget, qtbot, errors) -> None:
    from napari_stem.plugin.layers import gene_contrast_limits

    viewer, widget = _predicted(open_widget, qtbot)
    mean = viewer.layers["GA mean"]
    widget.gene_filter.value = "gd"
    assert list(widget.gene.choices) == ["GD"] and mean.name == "GD mean"
    assert mean.face_contrast_limits == pytest.approx(gene_contrast_limits(mean.features["GD mean"], lower_bound=0.0))
    widget.gene_filter.value = ""
    assert list(widget.gene.choices) == GENES
    assert errors == []


@gui
def test_export_button_writes_h5ad_as_the_cli_and_csv_with_the_layers_values(
    open_widget, qtbot, tmp_path: Path, errors
) -> None:
    import anndata
    import pandas as pd

    viewer, widget = _predicted(open_widget, qtbot)
    mean = viewer.layers["GA mean"]
    prediction = widget.controller.result.prediction
    widget.export_path.value = tmp_path / "pred.h5ad"
    widget.export_button.clicked()
    adata = anndata.read_h5ad(tmp_path / "pred.h5ad")
    np.testing.assert_allclose(adata.X, prediction.mean)
    np.testing.assert_allclose(adata.layers["variance"], prediction.variance)
    assert list(adata.obs_names) == mean.features["barcode"].tolist() and list(adata.var_names) == GENES
    assert "downscaled_fullres" in adata.uns["spatial"]["ST"]["images"]  # scanpy.pl.spatial-ready
    widget.export_path.value = tmp_path / "pred.csv"
    widget.export_button.clicked()
    table = pd.read_csv(tmp_path / "pred.csv")
    np.testing.assert_allclose(table[[f"variance_{g}" for g in GENES]].to_numpy(), prediction.variance, rtol=1e-5)
    assert errors == []


@gui
def test_save_selected_layers_writes_what_the_export_button_writes(open_widget, qtbot, tmp_path: Path, errors) -> None:
    import anndata

    viewer, widget = _predicted(open_widget, qtbot)
    widget.export_path.value = tmp_path / "pred.h5ad"
    widget.export_button.clicked()
    viewer.layers.selection = {viewer.layers["GA mean"], viewer.layers["GA sd"]}
    viewer.layers.save(str(tmp_path / "saved.h5ad"), selected=True, plugin="napari-stem")  # the npe2 writer
    np.testing.assert_allclose(
        anndata.read_h5ad(tmp_path / "saved.h5ad").X, anndata.read_h5ad(tmp_path / "pred.h5ad").X
    )
    assert errors == []


@gui
def test_exported_prediction_reopens_as_mean_and_sd_layers_the_gene_picker_drives(
    open_widget, qtbot, tmp_path: Path, errors
) -> None:
    viewer, widget = _predicted(open_widget, qtbot)
    sd = viewer.layers["GA sd"]
    widget.export_path.value = tmp_path / "pred.h5ad"
    widget.export_button.clicked()
    viewer.open(str(tmp_path / "pred.h5ad"), plugin="napari-stem")
    np.testing.assert_allclose(
        viewer.layers["pred GA sd"].features["GA sd"], sd.metadata["prediction"].variance[:, 0] ** 0.5, rtol=1e-5
    )
    widget.gene.value = "GB"
    assert viewer.layers["pred GB mean"].visible and not viewer.layers["pred GB sd"].visible
    assert errors == []


@gui
def test_rerun_with_other_sampling_reuses_the_embeddings_and_replaces_the_result_layers(
    open_widget, qtbot, errors
) -> None:
    viewer, widget = _predicted(open_widget, qtbot)
    mean = viewer.layers["GA mean"]
    widget.n_samples.value = 3
    widget.run_button.clicked()
    assert widget.controller.status == "done" and "embeddings from the cache" in widget.status.value
    names = [layer.name for layer in viewer.layers]
    assert names.count("GA mean") == 1 and names.count("GA sd") == 1 and mean not in viewer.layers
    assert viewer.layers[-1].metadata["prediction"].metadata["n_samples"] == 3
    assert errors == []


@gui
def test_cancel_keeps_only_finished_spots(open_widget, qtbot, errors, tmp_path: Path) -> None:
    import anndata

    viewer, widget = open_widget(threads=False)
    seen = []
    original = widget._on_yielded

    def on_yielded(job_id, event):  # cancel once the first batch is drawn
        original(job_id, event)
        seen.append((event.stage, event.done))
        if event.stage == "sample" and event.done == 2:
            assert len(viewer.layers["GA mean"].data) == 5 and viewer.layers["GA mean"].shown.sum() == 2  # partial draw
            widget.cancel_button.clicked()

    widget._on_yielded = on_yielded
    widget.run_button.clicked()
    assert seen[-1] == ("sample", 2)  # stopped at the next batch
    assert widget.controller.status == "cancelled" and errors == []
    names = [layer.name for layer in viewer.layers]
    assert "GA mean" not in names and "GA sd" not in names
    partial = viewer.layers["GA mean (partial 2/5)"], viewer.layers["GA sd (partial 2/5)"]
    for layer in partial:
        assert (
            len(layer.data) == 2
            and layer.shown.all()
            and np.isfinite(layer.features[["GA mean", "GA sd"]].to_numpy()).all()
        )
    provenance = partial[0].metadata["prediction"].metadata  # a partial result says how it was made, like a full one
    assert {"target_transform", "patch", "device", "precision", "encoder", "slide"} <= set(provenance)
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    widget.export_path.value = tmp_path / "partial.h5ad"
    widget.export_button.clicked()
    assert anndata.read_h5ad(tmp_path / "partial.h5ad").n_obs == 2

    # the same in a worker (cancel = worker.quit() at the next batch): whatever finished, consistently
    widget.use_threads = True
    widget._on_yielded = original
    widget.run_button.clicked()
    qtbot.waitUntil(lambda: widget.controller.result is not None or not widget.controller.running, timeout=60_000)
    widget.cancel_button.clicked()
    _wait_until_idle(qtbot, widget)
    result = widget.controller.result
    kept = [
        layer
        for layer in viewer.layers
        if layer.metadata.get("napari_stem") == "prediction" and layer.metadata["prediction"] is result.prediction
    ]
    assert len(kept) == 2 and all(len(layer.data) == result.done for layer in kept)
    for layer in kept:
        assert np.isfinite(layer.features[["GA mean", "GA sd"]].to_numpy()).all()
        assert layer.name in (
            f"GA mean (partial {result.done}/5)",
            f"GA sd (partial {result.done}/5)",
            "GA mean",
            "GA sd",
        )


@gui
def test_bad_inputs_give_notifications_naming_the_fix(
    open_widget, errors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tifffile

    viewer, widget = open_widget(threads=False)

    def run_and_get_error() -> str:
        count = len(errors)
        widget.run_button.clicked()
        assert len(errors) == count + 1, widget.status.value
        assert not any(
            layer.metadata.get("napari_stem") == "prediction" for layer in viewer.layers
        )  # nothing half-drawn
        return errors[-1]

    widget.checkpoint.value = None
    assert "no checkpoint chosen" in run_and_get_error()
    (tmp_path / "not_a_checkpoint").mkdir()
    widget.checkpoint.value = tmp_path / "not_a_checkpoint"
    assert "not_a_checkpoint" in widget.checkpoint_info.value
    message = run_and_get_error()
    assert "not_a_checkpoint" in message and "config.json" in message

    widget.checkpoint.value = _save_tiny_checkpoint(tmp_path / "ckpt")
    widget.encoder_weights.value = tmp_path / "missing_uni.safetensors"
    message = run_and_get_error()
    assert "missing_uni.safetensors" in message and "clear the field" in message
    widget.encoder_weights.value = None
    if not __import__("torch").cuda.is_available():
        widget.device.value = "cuda"
        assert "no CUDA GPU" in run_and_get_error()
        widget.device.value = "cpu"

    far_away = viewer.add_shapes(
        [np.array([[0.0, 0.0], [0.0, 50.0], [50.0, 50.0], [50.0, 0.0]])],
        shape_type="ellipse",
        name="glass",
        units=("um", "um"),
    )
    widget.region.value = far_away
    message = run_and_get_error()
    assert "no spots lie inside the region 'glass'" in message and "whole slide" in message
    widget.region.value = viewer.layers["roi"]

    # a checkpoint whose encoder needs weights that are not here: fails in the run, before anything is drawn
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    widget.checkpoint.value = _save_tiny_checkpoint(tmp_path / "uni_ckpt", encoder="uni", cond_dim=1024)
    message = run_and_get_error()
    assert "uni" in message and "weights" in message.lower()
    assert widget.controller.status == "failed" and widget.run_button.enabled

    # a checkpoint trained on other embeddings: fails after embedding (from the cache), nothing drawn
    widget.checkpoint.value = _save_tiny_checkpoint(tmp_path / "c64", cond_dim=64)
    message = run_and_get_error()
    assert "1280" in message and "c64" in message

    # a slide that does not record its µm/px
    flat = tmp_path / "no_mpp.tif"
    tifffile.imwrite(flat, np.full((256, 256, 3), 230, np.uint8), photometric="rgb")
    viewer.open(str(flat), plugin="napari-stem")
    widget.slide.value = viewer.layers["no_mpp"]
    message = run_and_get_error()
    assert "no_mpp.tif" in message and "µm/px" in message


@gui
def test_screenshot_shows_coloured_spots_over_tissue(open_widget, qtbot, errors) -> None:
    viewer, widget = open_widget(show=True)
    viewer.layers["roi"].visible = False
    widget.run_button.clicked()
    assert widget.controller.status == "done", errors
    mean, variance = viewer.layers["GA mean"], viewer.layers["GA sd"]
    for layer in (mean, variance):
        layer.face_colorbar.visible = False
        layer.opacity = 1.0

    viewer.window.resize(1100, 900)
    qtbot.wait(200)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari 0.9 moved it
    camera.center = ROI.mean(axis=0)  # the region fills the canvas; every shot uses this view
    camera.zoom = min(viewer.canvas.size) / (ROI.max(axis=0) - ROI.min(axis=0) + 300).max()

    def shot() -> np.ndarray:
        qtbot.wait(300)
        return viewer.screenshot(canvas_only=True)[..., :3].astype(int)

    from napari.utils.colormaps import ensure_colormap

    viridis = ensure_colormap("viridis").map(np.linspace(0, 1, 256))[:, :3] * 255

    def greenish(rgb: np.ndarray) -> np.ndarray:  # a viridis colour (the mean's map), not H&E pink/purple/white
        distance = np.abs(rgb.reshape(-1, 1, 3) - viridis[None]).sum(axis=-1).min(axis=1)
        return (distance < 30).reshape(rgb.shape[:-1])

    mean.visible = variance.visible = False
    bare = shot()
    pink = (bare[..., 0] > 150) & (bare[..., 2] > 120) & (bare[..., 1] < bare[..., 0] - 30)
    assert pink.mean() > 0.02  # the tissue is drawn
    mean.visible = True
    with_mean = shot()
    changed = np.abs(with_mean - bare).sum(axis=-1) > 30
    assert changed.sum() > 200  # five 55 µm spots cover a visible area
    assert greenish(with_mean[changed]).mean() > 0.5  # ... in viridis colours
    assert greenish(with_mean).sum() > greenish(bare).sum() + 150
    mean.visible, variance.visible = False, True
    with_variance = shot()
    assert np.abs(with_variance - with_mean)[changed].sum(axis=-1).mean() > 30  # magma, not viridis


# ---------------------------------------------------------------------- the controller alone (no viewer)
def _fake_job(controller, n_spots: int = 5):
    from napari_stem.plugin.jobs import PredictJob, PredictSettings
    from napari_stem.plugin.layers import SlideFrame
    from napari_stem.spots import Spots

    controller._job_counter += 1
    spots = Spots(
        centers_px=np.column_stack([np.arange(n_spots) * 100.0, np.zeros(n_spots)]), diameter_px=110.0, mpp=0.5
    )
    return PredictJob(
        job_id=controller._job_counter, slide_path=Path("slide.svs"), slide_name="slide", mpp=0.5,
        frame=SlideFrame.microns(0.5), spots=spots, checkpoint=Path("ckpt"), genes=GENES[:2], encoder="efficientnet_lite0",
        settings=PredictSettings(), cache_path=Path("cache.h5"),
    )  # fmt: skip


def _sample_event(start: int, stop: int, n_spots: int = 5):
    from types import SimpleNamespace

    values = np.full((stop - start, 2), float(stop))
    return SimpleNamespace(
        stage="sample",
        done=stop,
        total=n_spots,
        batch=SimpleNamespace(start=start, stop=stop, mean=values, variance=values / 10),
    )


def test_controller_folds_batches_and_cancels_consistently() -> None:
    from types import SimpleNamespace

    from napari_stem.plugin.controller import PredictController

    controller = PredictController()
    job = _fake_job(controller)
    controller.start(job)
    assert (
        controller.apply(job.job_id, SimpleNamespace(stage="embed", done=5, total=5, from_cache=True)).stage == "embed"
    )
    assert controller.result is None and "cache" in controller.message  # nothing to draw while embedding
    assert controller.apply(job.job_id, _sample_event(0, 2)).values_changed
    assert controller.apply(job.job_id - 1, _sample_event(2, 4)) is None  # an older job's event is ignored
    result = controller.result
    assert result.done == 2 and result.shown.tolist() == [True, True, False, False, False]
    assert np.isnan(result.prediction.mean[2:]).all()
    controller.request_cancel()
    assert controller.finish(job.job_id, "cancelled") == "cancelled"
    kept, spots = controller.result.prediction, controller.result.spots
    assert len(spots) == 2 and kept.mean.shape == (2, 2) and np.isfinite(kept.mean).all()
    assert controller.finish(job.job_id, "done") is None  # a late signal of the same job changes nothing

    job = _fake_job(controller)
    controller.start(job)
    controller.request_cancel()
    assert (
        controller.finish(job.job_id, "cancelled") == "cancelled" and controller.result is None
    )  # nothing sampled: nothing kept

    job = _fake_job(controller)
    controller.start(job)
    controller.apply(job.job_id, _sample_event(0, 2))
    assert "nope" in controller.fail(job.job_id, RuntimeError("nope")) and controller.result is None


def test_controller_validates_inputs(demo_slide_file: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from napari_stem.errors import StemError
    from napari_stem.plugin.controller import PredictController
    from napari_stem.plugin.jobs import GRID, PointsInput, PredictSettings, RegionInput, SlideInput
    from napari_stem.plugin.layers import SlideFrame

    controller = PredictController(embedding_cache_dir=tmp_path)
    frame = SlideFrame.microns(0.499)
    slide = SlideInput("demo", demo_slide_file, 0.499, frame)
    settings = PredictSettings(checkpoint=tiny_checkpoint, n_samples=2, steps=2, device="cpu")
    with pytest.raises(StemError, match="no slide chosen"):
        controller.prepare(None, GRID, None, settings)
    with pytest.raises(StemError, match="µm/px' field"):
        controller.prepare(SlideInput("demo", demo_slide_file, None, SlideFrame()), GRID, None, settings)
    with pytest.raises(StemError, match="at least 2"):
        controller.prepare(slide, GRID, None, PredictSettings(checkpoint=tiny_checkpoint, n_samples=1))
    with pytest.raises(StemError, match="only lines or paths"):
        controller.prepare(slide, GRID, RegionInput("lines", [("line", np.array([[0.0, 0.0], [9.0, 9.0]]))]), settings)
    # a points layer in world µm → spots in level-0 pixels, with its features as annotations
    import pandas as pd

    points = PointsInput(
        "mine",
        np.array([[600.0, 959.3], [700.0, 959.3]]),
        55.0,
        pd.DataFrame({"barcode": ["a", "b"], "kind": ["x", "y"]}),
    )
    job = controller.prepare(slide, points, None, settings)
    np.testing.assert_allclose(job.spots.centers_px, [[959.3 / 0.499, 600 / 0.499], [959.3 / 0.499, 700 / 0.499]])
    assert job.spots.diameter_px == pytest.approx(55 / 0.499) and list(job.spots.barcodes) == ["a", "b"]
    assert job.spots.obs["kind"].tolist() == ["x", "y"] and job.genes == GENES
    assert job.cache_path.parent == tmp_path
    # same slide and spots → same embedding cache, whatever the sampling settings
    other = controller.prepare(
        slide, points, None, PredictSettings(checkpoint=tiny_checkpoint, n_samples=7, steps=9, device="cpu")
    )
    assert other.cache_path == job.cache_path and other.job_id == job.job_id + 1


def test_nothreads_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_stem.plugin.widget import threads_enabled

    monkeypatch.setenv("NAPARI_STEM_NOTHREADS", "1")
    assert not threads_enabled()
    monkeypatch.delenv("NAPARI_STEM_NOTHREADS")
    assert threads_enabled()


@gui
def test_interval_choice_draws_enough_samples_or_labels_what_it_gives(open_widget, errors, tmp_path: Path) -> None:
    import json

    import anndata

    from napari_stem.plugin.widget import PredictWidget

    viewer, widget = open_widget(threads=False)
    fresh = PredictWidget(viewer)  # the defaults deliver what they advertise: exact 50 % and 90 % from 19 samples
    fresh.use_threads = False  # its preview finds the tissue now, not in a worker still running at teardown
    assert fresh.intervals.value == "50 % and 90 %" and fresh.n_samples.value == 19
    assert fresh.intervals_info.value == "exact: 50 % interval from 19 samples; 90 % interval from 19 samples"
    # the fixture lowered the samples to 2: the hint says which interval that gives, at its own level
    assert widget.intervals_info.value.startswith("33.3 % interval from 2 samples (90 % asked; exact needs 19 samples)")
    widget.intervals.value = "50 %"  # a new choice draws enough samples for it
    assert widget.n_samples.value == 3 and widget.intervals_info.value == "exact: 50 % interval from 3 samples"
    assert widget.settings().intervals == (0.5,) and widget.settings().n_samples == 3
    widget.run_button.clicked()
    assert widget.controller.status == "done" and errors == []
    prediction = widget.controller.result.prediction
    (spec,) = prediction.interval_specs
    assert spec.exact and spec.n_samples == 3 and np.isfinite(prediction.intervals).all()
    widget.export_path.value = tmp_path / "pred.h5ad"
    widget.export_button.clicked()
    adata = anndata.read_h5ad(tmp_path / "pred.h5ad")
    np.testing.assert_allclose(adata.layers["lo50"], prediction.intervals[0, 0])
    assert json.loads(adata.uns["napari_stem"]["intervals_json"])[0]["label"] == "50 % interval from 3 samples"


def test_preview_tissue_from_the_stored_thumbnail_matches_the_decoded_level(demo_slide_file: Path) -> None:
    """The preview's mask comes from the SVS's stored thumbnail (milliseconds, not a decoded level):
    grids over it keep nearly the same spots, with nearly the same tissue fractions."""
    from napari_stem.caches import GridCache
    from napari_stem.grid import spots_over_tissue
    from napari_stem.slide import open_slide
    from napari_stem.tissue import mask_overview, tissue_mask_from_rgb
    from napari_stem.values import GridSpec

    with open_slide(demo_slide_file) as slide:
        overview, scale = mask_overview(slide)
        assert overview.shape == (768, 574, 3) and scale == pytest.approx(574 / 2220)  # the thumbnail, not level 0
        level, level_scale = slide.thumbnail(2048)  # decoded from the pyramid, not the stored thumbnail
        full = tissue_mask_from_rgb(level), level_scale
        grids = GridCache()
        for pitch, diameter, fraction in (
            (100.0, 55.0, 0.5),
            (150.0, 80.0, 0.9),
            (100.0, 55.0, 0.1),
            (50.0, 30.0, 0.5),
        ):
            exact = spots_over_tissue(slide, GridSpec(pitch, diameter, fraction), tissue=full)
            quick = grids.grid(demo_slide_file, slide.mpp, GridSpec(pitch, diameter, fraction))
            assert abs(len(quick) - len(exact)) <= max(1, 0.05 * len(exact)), (pitch, diameter, fraction)
            both = exact.obs.index.intersection(quick.obs.index)
            assert len(both) >= 0.95 * len(exact)
            difference = (exact.obs.loc[both, "tissue_fraction"] - quick.obs.loc[both, "tissue_fraction"]).abs()
            assert difference.mean() < 0.03, (pitch, diameter, fraction, difference.mean())


@gui
def test_hub_checkpoint_is_fetched_off_the_gui_thread(
    open_widget, qtbot, errors, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Typing a hf-hub: reference returns at once: the download runs in a worker, and Predict
    pressed meanwhile starts when it is done."""
    import threading
    import time

    import napari_stem.hub as hub
    from napari_stem import known_models

    monkeypatch.setattr(known_models, "_recent_file", lambda: tmp_path / "recent.json")
    downloads: list[int] = []

    def slow_hub(value):  # the Hub, slow the first time, then cached like hub._resolved
        if not hub.is_hub_reference(value):
            return Path(value)
        if not downloads:
            downloads.append(threading.get_ident())
            time.sleep(1.5)
        return tiny_checkpoint

    monkeypatch.setattr(hub, "resolve_checkpoint", slow_hub)
    viewer, widget = open_widget(threads=True)
    started = time.perf_counter()
    widget.checkpoint.value = "hf-hub:lab/stem-tiny@v1"
    widget.run_button.clicked()  # pressed before the download is done: runs once it is
    assert time.perf_counter() - started < 0.5
    assert (
        widget.checkpoint_info.value.startswith("fetching hf-hub:lab/stem-tiny@v1")
        and "fetching" in widget.status.value
    )
    qtbot.waitUntil(lambda: widget.checkpoint_info.value.startswith("5 genes"), timeout=30_000)
    assert downloads and downloads[0] != threading.get_ident()  # not on the GUI thread
    qtbot.waitUntil(lambda: widget.controller.status == "done" and widget.worker is None, timeout=120_000)
    assert errors == [] and len(viewer.layers["GA mean"].data) == 5
    assert str(known_models.recent_checkpoints()[0]) == "hf-hub:lab/stem-tiny@v1"  # remembered as typed
    assert ("hf-hub:lab/stem-tiny@v1", "hf-hub:lab/stem-tiny@v1") in known_models.choices()


def test_preview_cost_estimate_does_not_import_torch() -> None:
    """The preview's estimate runs on the GUI thread at every change: importing torch there (the
    first time a checkpoint is chosen) froze napari for seconds."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom napari_stem.preview import describe_cost, estimate_seconds\n"
        "print(describe_cost(70, estimate_seconds(70, 19, 25, 'auto', 'efficientnet_lite0'), 'auto'))\n"
        "assert 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("~70 spots · ~")
