"""What runs keep between runs: grids over tissue (one tissue mask per slide) and the naming of
embedding files, the one policy the widget's controller and ``stem-train predict`` follow."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from napari_stem.caches import GridCache, embedding_cache_path
from napari_stem.values import GridSpec

GENES = ["GA", "GB"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", GENES)


@pytest.fixture
def tissue_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Slides whose tissue overview was read (the slow part of a grid)."""
    import napari_stem.grid as grid

    reads: list[str] = []
    original = grid.tissue_mask

    def counted(slide):
        reads.append(str(slide.path))
        return original(slide)

    monkeypatch.setattr(grid, "tissue_mask", counted)
    return reads


def test_grid_cache_keeps_one_tissue_mask_per_slide_and_one_grid_per_spec(
    demo_slide_file: Path, tissue_reads: list[str]
) -> None:
    grids = GridCache()
    assert grids.cached_tissue(demo_slide_file, 0.499) is None
    visium = grids.grid(demo_slide_file, 0.499, GridSpec())
    assert len(tissue_reads) == 1 and grids.cached_tissue(demo_slide_file, 0.499) is not None
    assert grids.grid(demo_slide_file, 0.499, GridSpec(100.0, 55.0, 0.5)) is visium  # equal spec: the same grid
    coarse = grids.grid(
        demo_slide_file, 0.499, GridSpec(pitch_um=150.0, spot_diameter_um=80.0, min_tissue_fraction=0.9)
    )
    assert coarse is not visium and len(coarse) < len(visium)
    assert len(tissue_reads) == 1  # another grid over the same tissue mask
    assert GridCache().cached_tissue(demo_slide_file, 0.499) is None  # no cache shared behind the objects' backs


def test_the_cli_and_the_widget_lay_the_same_grid(demo_slide_file: Path) -> None:
    """``stem-train predict slide`` (spots_over_tissue on the open slide) and the widget's cached grid
    find tissue the same way, so the spots a preview shows are the spots the CLI predicts."""
    from napari_stem.grid import spots_over_tissue
    from napari_stem.slide import open_slide

    for spec in (GridSpec(), GridSpec(pitch_um=150.0, spot_diameter_um=80.0, min_tissue_fraction=0.9)):
        with open_slide(demo_slide_file) as slide:
            cli = spots_over_tissue(slide, spec)
            widget = GridCache().grid(demo_slide_file, slide.mpp, spec)
        assert len(cli) > 10 and list(cli.obs.index) == list(widget.obs.index)
        np.testing.assert_array_equal(cli.centers_px, widget.centers_px)


def test_grid_cache_forgets_the_oldest_beyond_its_size(demo_slide_file: Path, tissue_reads: list[str]) -> None:
    grids = GridCache(size=2)
    first = grids.grid(demo_slide_file, 0.499, GridSpec(100.0, 55.0, 0.5))
    grids.grid(demo_slide_file, 0.499, GridSpec(100.0, 55.0, 0.6))
    grids.grid(demo_slide_file, 0.499, GridSpec(100.0, 55.0, 0.7))
    again = grids.grid(demo_slide_file, 0.499, GridSpec(100.0, 55.0, 0.5))
    assert again is not first and np.array_equal(again.centers_px, first.centers_px)
    assert len(tissue_reads) == 1


def test_controller_and_cli_name_embedding_files_by_one_policy(
    demo_slide_file: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_stem.predict as predict
    from napari_stem.plugin.controller import PredictController
    from napari_stem.plugin.jobs import GRID, PredictSettings, SlideInput
    from napari_stem.plugin.layers import SlideFrame
    from napari_stem.stem.checkpoint import load_checkpoint, read_metadata
    from stem_train.predict import PredictJob as SlideJob
    from stem_train.predict import predict_job

    embedding = read_metadata(tiny_checkpoint)["embedding"]
    cache_dir = tmp_path / "cache"

    # the widget: one file per slide, spots and encoder, under its cache folder
    controller = PredictController(embedding_cache_dir=cache_dir)
    slide = SlideInput("demo", demo_slide_file, 0.499, SlideFrame.microns(0.499))
    job = controller.prepare(slide, GRID, None, PredictSettings(checkpoint=tiny_checkpoint, device="cpu"))
    assert job.cache_path == embedding_cache_path(demo_slide_file, job.spots, embedding, root=cache_dir)
    assert (
        re.fullmatch(r"cmu_small_region-[0-9a-f]{20}\.h5", job.cache_path.name) and job.cache_path.parent == cache_dir
    )
    fewer = job.spots.subset(np.arange(3))
    assert embedding_cache_path(demo_slide_file, fewer, embedding, root=cache_dir) != job.cache_path
    weights = tmp_path / "w.safetensors"
    assert embedding_cache_path(demo_slide_file, job.spots, embedding, weights, root=cache_dir) != job.cache_path
    assert controller.embedding_cache_dir == cache_dir

    # stem-train predict --cache-dir: the same function, named by the sample (HEST-Bench layout)
    calls: list[tuple] = []

    class Stop(Exception):
        pass

    def recording_iter_predict(slide_path, spots, checkpoint, options=None, **kwargs):
        calls.append((Path(slide_path), spots, kwargs["cache_path"]))
        raise Stop

    monkeypatch.setattr(predict, "iter_predict", recording_iter_predict)
    checkpoint = load_checkpoint(tiny_checkpoint)
    cli_job = SlideJob("cmu_small_region", demo_slide_file, tmp_path / "out.h5ad")
    with pytest.raises(Stop):
        predict_job(cli_job, checkpoint, cache_dir=cache_dir)
    ((slide_path, spots, cache_path),) = calls
    assert cache_path == embedding_cache_path(
        slide_path, spots, checkpoint.embedding, None, root=cache_dir, name=cli_job.name
    )
    assert cache_path == cache_dir / "cmu_small_region.h5"
    calls.clear()
    with pytest.raises(Stop):
        predict_job(cli_job, checkpoint)  # no --cache-dir: no file kept
    assert calls[0][2] is None


def test_the_demo_sample_embeds_into_the_widgets_file(
    demo_slide_file: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File > Open Sample > Demo prediction and a widget run over the same grid share one embedding file."""
    from napari_stem.plugin import sample_data
    from napari_stem.plugin.controller import PredictController
    from napari_stem.plugin.jobs import GRID, PredictSettings, SlideInput
    from napari_stem.plugin.layers import SlideFrame
    from napari_stem.slide import open_slide

    monkeypatch.setenv("NAPARI_STEM_CACHE", str(tmp_path / "cache"))
    job = PredictController().prepare(
        SlideInput("demo", demo_slide_file, 0.499, SlideFrame.microns(0.499)),
        GRID,
        None,
        PredictSettings(checkpoint=tiny_checkpoint, device="cpu"),
    )
    with open_slide(demo_slide_file, mpp=0.499) as slide:
        spots = sample_data._demo_spots(slide)
    assert list(spots.obs.index) == list(job.spots.obs.index)
    assert sample_data._embedding_cache(demo_slide_file, spots, tiny_checkpoint) == job.cache_path
    assert job.cache_path.parent == tmp_path / "cache" / "embeddings"
