"""The README's demo command, headless and reduced: data → prepare → fit → predict → evaluate → maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest


@pytest.fixture
def demo_cache(tmp_path: Path, demo_slide_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache holding only the demo slide, so the demo model is built from nothing."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(demo_slide_file, cache / demo_slide_file.name)
    monkeypatch.setenv("NAPARI_STEM_CACHE", str(cache))
    return cache


def test_headless_quick_demo_writes_its_outputs(
    demo_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from stem_train.cli import main
    from stem_train.demo import QUICK

    out = tmp_path / "out"
    assert main(["demo", "--headless", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    prediction = out / "predictions" / f"{QUICK.test_id}.h5ad"
    for path in (prediction, out / "mean_variance_maps.png", out / "evaluation" / "report.json"):
        assert path.exists() and path.stat().st_size > 0
        assert str(path) in printed
    adata = anndata.read_h5ad(prediction)
    n_genes = QUICK.n_genes_panel
    assert adata.n_vars == n_genes and adata.n_obs > 30
    assert (adata.layers["variance"] > 0).all()
    assert (adata.layers["lo50"] <= adata.layers["hi50"]).all() and adata.obsm["samples"].shape[
        1
    ] == QUICK.samples * n_genes
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["fixed_panel_pcc"]["n_genes"] == n_genes and np.isfinite(report["fixed_panel_pcc"]["mean"])
    # The test slide is tissue no training slide shows, judged against the baselines on the same spots.
    assert report["leak_check"]["status"] == "same patient"
    assert report["verdict"].startswith("Stem vs best baseline")
    (written,) = report["calibration"]["written_intervals"]
    assert written["layers"] == ["lo50", "hi50"] and written["level"] == 0.5 and written["n_samples"] == 3
    # the demo model is cached: a second run does not rebuild it
    from napari_stem.datasets import demo_model_dir

    checkpoint = demo_model_dir("quick") / "run" / "checkpoint" / "weights.safetensors"
    assert checkpoint.is_relative_to(demo_cache)
    stamp = checkpoint.stat().st_mtime_ns
    assert main(["demo", "--headless", "--quick", "--out", str(tmp_path / "again"), "--device", "cpu"]) == 0
    assert checkpoint.stat().st_mtime_ns == stamp
    assert not list((demo_cache / "demo").glob("*.building"))


def test_mean_variance_maps_png(tmp_path: Path, demo_cache: Path) -> None:
    from PIL import Image

    from stem_train.cli import main
    from stem_train.demo import QUICK, draw_mean_variance_maps, ensure_demo_model

    paths = ensure_demo_model(QUICK, device="cpu")
    assert (
        main(
            [
                "predict",
                str(paths.hest),
                "--checkpoint",
                str(paths.checkpoint),
                "--sample-ids",
                QUICK.test_id,
                "--out",
                str(tmp_path / "p"),
                "--samples",
                "2",
                "--steps",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    png = draw_mean_variance_maps(tmp_path / "p" / f"{QUICK.test_id}.h5ad", tmp_path / "maps.png")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 600 and image.shape[1] > 600
    assert image.std() > 20  # a slide with coloured spots, not a blank canvas


@pytest.mark.gui
def test_interactive_demo_opens_the_ready_plugin(
    demo_cache: Path, make_napari_viewer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's napari session: slide, spot grid, widget docked with the demo checkpoint chosen."""
    import napari

    from stem_train.demo import QUICK, ensure_demo_model, open_in_napari

    paths = ensure_demo_model(QUICK, device="cpu")
    viewer = make_napari_viewer()
    monkeypatch.setattr(napari, "Viewer", lambda **_: viewer)
    _, widget = open_in_napari(paths, run_event_loop=False)
    assert [layer.name for layer in viewer.layers] == ["demo H&E", "spot grid"]
    assert Path(widget.checkpoint.value) == paths.checkpoint
    assert widget.spots.value is viewer.layers["spot grid"]
    assert f"{QUICK.n_genes_panel} genes" in widget.checkpoint_info.value


def test_torch_survives_napari_on_software_opengl(tmp_path: Path) -> None:
    """Opening napari on Mesa (llvmpipe), then the widget, then torch's triton-importing modules.

    Without napari_stem.plugin.torch_guard this crashes the process with a segmentation fault (two LLVMs).
    """
    import os
    import subprocess
    import sys

    if not os.environ.get("DISPLAY"):
        pytest.skip("needs an X server (run the suite under xvfb-run)")
    script = (
        "import napari\n"
        "viewer = napari.Viewer(show=True)\n"
        "from napari_stem.plugin.widget import PredictWidget\n"
        "widget = PredictWidget(viewer)\n"
        "import torchvision.ops, torch._dynamo\n"
        "print('alive', 'triton blocked' if __import__('sys').modules.get('triton', 1) is None else 'triton loaded')\n"
        "viewer.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "alive" in result.stdout


def test_demo_prediction_sample_data(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_stem.datasets as datasets
    from napari_stem.errors import StemError
    from napari_stem.plugin.sample_data import demo_prediction
    from stem_train.demo import QUICK, ensure_demo_model

    monkeypatch.setattr(datasets, "demo_model_dir", lambda size="full": datasets.cache_dir() / "demo" / "quick-as-full")
    with pytest.raises(StemError, match="stem-train demo"):
        demo_prediction()
    ensure_demo_model(QUICK, device="cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (slide, slide_kwargs, _), (_, sd_kwargs, _), (mean, mean_kwargs, mean_type) = demo_prediction()
    assert slide_kwargs["name"] == "demo H&E" and mean_type == "points"
    gene = mean_kwargs["metadata"]["gene"]
    assert mean_kwargs["name"] == f"demo {gene} mean" and sd_kwargs["name"] == f"demo {gene} sd"
    assert mean_kwargs["visible"] and not sd_kwargs["visible"] and len(mean) > 30
    assert len(mean_kwargs["metadata"]["genes"]) == 12
    assert (sd_kwargs["features"][f"{gene} sd"] >= 0).all()
