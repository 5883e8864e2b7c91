"""npe2 reader and sample data: sniffing, layer data, and what napari shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_stem.plugin.reader import get_reader
from test_widget import tiny_checkpoint  # noqa: F401 - fixture


def test_get_reader_only_sniffs(tmp_path: Path, demo_slide_file: Path, synthetic_hest: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "missing.png")) is None
    assert get_reader(str(tmp_path)) is None  # a folder that is not HEST
    assert get_reader([str(demo_slide_file), str(demo_slide_file)]) is None
    assert get_reader(str(demo_slide_file)) is not None
    assert get_reader(str(synthetic_hest / "st" / "SYN000.h5ad")) is not None
    assert get_reader(str(synthetic_hest)) is not None


def test_slide_layer_data_in_microns(demo_slide_file: Path) -> None:
    reader = get_reader(str(demo_slide_file))
    ((data, kwargs, layer_type),) = reader(str(demo_slide_file))
    assert layer_type == "image"
    assert kwargs["rgb"] and kwargs["contrast_limits"] == (0, 255)
    assert kwargs["scale"] == (0.499, 0.499) and kwargs["units"] == ("um", "um")
    assert kwargs["metadata"]["mpp"] == 0.499
    assert data.shape == (2967, 2220, 3)


def test_hest_folder_opens_slide_and_spots_in_one_frame(synthetic_hest: Path) -> None:
    layers = get_reader(str(synthetic_hest))(str(synthetic_hest))
    (image, image_kwargs, image_type), (points, points_kwargs, points_type) = layers
    assert (image_type, points_type) == ("image", "points")
    assert image_kwargs["multiscale"] and len(image) >= 3
    assert image_kwargs["scale"] == (0.5, 0.5)
    assert points_kwargs["size"] == pytest.approx(55.0)  # µm
    assert points.max() <= 2400 * 0.5  # spot coordinates in µm, inside the slide
    assert list(points_kwargs["features"].columns[:3]) == ["barcode", "in_tissue", "array_row"]


@pytest.mark.gui
def test_napari_shows_slide_and_spots(make_napari_viewer, qtbot, synthetic_hest: Path) -> None:
    viewer = make_napari_viewer(show=True)
    viewer.open(str(synthetic_hest), plugin="napari-stem")
    image, points = viewer.layers
    assert image.multiscale and image.rgb
    assert tuple(points.units) == tuple(image.units)
    viewer.reset_view()
    qtbot.wait(300)
    shot = viewer.screenshot(canvas_only=True)
    rgb = shot[..., :3].astype(int)
    pinkish = (rgb[..., 0] > 150) & (rgb[..., 2] > 120) & (rgb[..., 1] < rgb[..., 0] - 30)
    assert pinkish.mean() > 0.02  # tissue is drawn
    cyan = (rgb[..., 1] > 200) & (rgb[..., 2] > 200) & (rgb[..., 0] < 80)
    assert cyan.sum() > 50  # spot outlines are drawn


@pytest.mark.gui
def test_sample_data_demo_slide(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("napari-stem", "demo_slide")
    names = [layer.name for layer in viewer.layers]
    assert names == ["demo H&E", "demo spots"]
    spots = viewer.layers["demo spots"]
    assert 30 < len(spots.data) < 170
    assert np.allclose(spots.size, 55.0)


@pytest.mark.gui
def test_sample_data_demo_prediction_does_not_block_napari(
    make_napari_viewer, qtbot, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File > Open Sample > Demo prediction: the slide at once, the prediction from a worker while
    napari keeps running (the real first use builds the model and embeds ~70 spots: 30 s and more)."""
    import threading
    import time

    from qtpy.QtCore import QTimer

    import napari_stem.plugin.sample_data as sample_data
    from napari_stem import known_models

    monkeypatch.setattr(known_models, "demo_checkpoint", lambda: tiny_checkpoint)  # the tiny model, 5 spots
    grid = sample_data._demo_spots
    monkeypatch.setattr(sample_data, "_demo_spots", lambda slide: grid(slide).subset(np.arange(5)))
    monkeypatch.setattr(sample_data, "_embedding_cache", lambda *_: tmp_path / "demo.h5")
    shown = threading.Event()
    events = sample_data._demo_prediction_events

    def slow_events(*args):  # the worker is still busy well after the slide shows
        shown.wait(60)
        time.sleep(1.5)
        return (yield from events(*args))

    monkeypatch.setattr(sample_data, "_demo_prediction_events", slow_events)
    first_progress: list[float] = []
    finished: list[bool] = []
    start = sample_data.start_demo_prediction

    def started(*args):
        worker = start(*args)
        worker.yielded.connect(lambda _: first_progress.append(time.perf_counter()))
        worker.finished.connect(lambda: finished.append(True))
        return worker

    monkeypatch.setattr(sample_data, "start_demo_prediction", started)
    viewer = make_napari_viewer()
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(50)
    viewer.open_sample("napari-stem", "demo_prediction")
    returned = time.perf_counter()
    shown.set()
    assert [layer.name for layer in viewer.layers] == ["demo H&E"] and not finished  # the prediction follows
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=120_000)
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    timer.stop()
    sd, mean = viewer.layers[1:]
    gene = mean.metadata["gene"]
    assert (mean.name, sd.name) == (f"demo {gene} mean", f"demo {gene} sd") and mean.visible and not sd.visible
    assert len(mean.data) == 5 and mean.face_colorbar.visible and viewer.layers.selection.active is mean
    busy = [t for t in ticks if returned <= t <= first_progress[0]]  # the worker working, the GUI free
    gaps = np.diff([returned, *busy])
    print(
        f"demo prediction sample: while the worker ran {first_progress[0] - returned:.1f} s, the GUI timer ticked "
        f"{len(busy)} times, longest gap {gaps.max():.2f} s"
    )
    assert (
        len(busy) > 10 and gaps.max() < 2.0
    )  # ~1 s at most: loading torch in the worker holds the GIL (once per process)


@pytest.mark.gui
def test_napari_command_line_opens_a_hest_folder_with_the_plugin(make_napari_viewer, synthetic_hest: Path) -> None:
    """``napari --plugin napari-stem hest_folder/`` (what napari's __main__ calls). Without
    ``--plugin`` napari's reader dialog offers napari-stem, but preselects its own folder reader,
    which cannot read HEST folders (napari 0.9: "No files found ... after removing subdirectories")."""
    from napari.plugins import _npe2

    viewer = make_napari_viewer()
    assert "napari-stem" in _npe2.get_readers(str(synthetic_hest))
    viewer.window._qt_viewer._qt_open([str(synthetic_hest)], stack=False, plugin="napari-stem")
    image, points = viewer.layers
    assert image.metadata["napari_stem"] == "slide" and points.metadata["napari_stem"] == "spots"
