"""The one prediction path (slide + spots + checkpoint → mean/variance) and its .h5ad export."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from napari_stem.errors import CheckpointError, StemError
from napari_stem.values import PredictOptions
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small Stem model on efficientnet_lite0 embeddings (1280-d), five genes."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", ["GA", "GB", "GC", "GD", "GE"])


@pytest.fixture(scope="module")
def demo_spots(demo_slide_file: Path):
    from napari_stem.grid import spots_over_tissue
    from napari_stem.slide import open_slide

    return spots_over_tissue(open_slide(demo_slide_file)).subset(np.arange(6))


def test_iter_predict_stages_and_shapes(tiny_checkpoint: Path, demo_slide_file: Path, demo_spots) -> None:
    from napari_stem.predict import iter_predict

    events = list(
        iter_predict(
            demo_slide_file,
            demo_spots,
            tiny_checkpoint,
            PredictOptions(
                n_samples=3,
                steps=4,
                seed=1,
                device="cpu",
                embed_batch_size=4,
                sample_batch_size=4,
                quantiles=(0.05, 0.95),
                intervals=(0.5,),
            ),
        )
    )
    stages = [e.stage for e in events]
    assert stages == ["embed", "embed", "sample", "sample", "done"]
    assert [e.done for e in events[:4]] == [4, 6, 4, 6]
    prediction = events[-1].prediction
    assert prediction.mean.shape == prediction.variance.shape == (6, 5)
    assert (prediction.variance > 0).all()
    assert prediction.quantiles.shape == (2, 6, 5)
    assert (prediction.quantiles[0] <= prediction.quantiles[1]).all()
    (spec,) = prediction.interval_specs  # 3 samples: [min, max] is exactly a 50 % interval
    assert spec.exact and spec.rank == 1 and prediction.intervals.shape == (1, 2, 6, 5)
    np.testing.assert_allclose(prediction.intervals[0, :, :4], events[2].batch.intervals[0])
    assert (prediction.intervals[0, 0] <= prediction.mean).all() and (
        prediction.mean <= prediction.intervals[0, 1]
    ).all()
    np.testing.assert_allclose(events[2].batch.mean, prediction.mean[:4])
    assert prediction.metadata["encoder"] == "efficientnet_lite0"
    assert prediction.metadata["n_samples"] == 3 and prediction.metadata["steps"] == 4
    assert all(event.metadata == prediction.metadata for event in events if event.stage != "embed")


def test_the_plugin_path_and_the_bare_sampler_record_the_same_provenance(tiny_checkpoint: Path) -> None:
    """iter_predict's metadata is sample_expression's, plus how the spots were embedded."""
    from napari_stem.predict import predict
    from napari_stem.spots import Spots
    from napari_stem.stem.sampling import sample_expression

    embeddings = np.random.default_rng(0).normal(size=(2, 1280)).astype(np.float32)
    spots = Spots(centers_px=np.array([[10.0, 10.0], [20.0, 20.0]]), diameter_px=5.0, mpp=0.5)
    full = predict(
        "unused.tif", spots, tiny_checkpoint, PredictOptions(n_samples=2, steps=2, device="cpu"), embeddings=embeddings
    )
    bare = sample_expression(tiny_checkpoint, embeddings, n_samples=2, steps=2, device="cpu")
    assert set(full.metadata) == set(bare.metadata) | {"encoder", "patch"}
    assert {key: full.metadata[key] for key in bare.metadata} == bare.metadata
    np.testing.assert_array_equal(full.mean, bare.mean)


def test_default_sample_count_makes_requested_intervals_exact(
    tiny_checkpoint: Path, demo_slide_file: Path, demo_spots
) -> None:
    from napari_stem.predict import predict

    prediction = predict(
        demo_slide_file,
        demo_spots.subset(np.arange(2)),
        tiny_checkpoint,
        PredictOptions(steps=2, device="cpu", intervals=(0.5, 0.9)),
    )
    assert prediction.metadata["n_samples"] == 19  # the CPU default of 4 raised to the first exact count
    assert [(spec.rank, spec.exact) for spec in prediction.interval_specs] == [(5, True), (1, True)]
    eight = predict(
        demo_slide_file,
        demo_spots.subset(np.arange(2)),
        tiny_checkpoint,
        PredictOptions(n_samples=8, steps=2, device="cpu", intervals=(0.9,)),
    )
    (spec,) = eight.interval_specs  # an explicit count is kept, its interval labelled with the level it has
    assert eight.metadata["n_samples"] == 8 and not spec.exact and spec.name == "77.8"


def test_predict_is_deterministic_and_cache_reused(
    tiny_checkpoint: Path, demo_slide_file: Path, demo_spots, tmp_path: Path
) -> None:
    from napari_stem.predict import iter_predict, predict

    options = PredictOptions(n_samples=2, steps=3, seed=5, device="cpu")
    cache = tmp_path / "demo.h5"
    first = predict(demo_slide_file, demo_spots, tiny_checkpoint, options, cache_path=cache)
    assert cache.exists()
    events = list(iter_predict(demo_slide_file, demo_spots, tiny_checkpoint, options, cache_path=cache))
    assert events[0].stage == "embed" and events[0].from_cache
    np.testing.assert_allclose(events[-1].prediction.mean, first.mean, rtol=1e-5)
    other_seed = predict(demo_slide_file, demo_spots, tiny_checkpoint, replace(options, seed=6), cache_path=cache)
    assert not np.allclose(other_seed.mean, first.mean)


def test_encoder_dimension_mismatch_is_named(tmp_path: Path, demo_slide_file: Path, demo_spots) -> None:
    from napari_stem.predict import predict
    from napari_stem.stem.checkpoint import save_checkpoint
    from napari_stem.stem.model import StemConfig, StemModel

    config = StemConfig(n_genes=2, cond_dim=64, hidden_size=16, depth=1, num_heads=2)
    path = save_checkpoint(
        tmp_path / "c64",
        config=config,
        genes=["A", "B"],
        ema=StemModel(config),
        embedding={"encoder": "efficientnet_lite0", "patch": {"mode": "hest"}},
    )
    with pytest.raises(CheckpointError, match=r"1280-d.*c64.*64-d"):
        predict(demo_slide_file, demo_spots, path, PredictOptions(n_samples=2, steps=2, device="cpu"))
    bare = save_checkpoint(tmp_path / "noenc", config=config, genes=["A", "B"], ema=StemModel(config))
    with pytest.raises(CheckpointError, match=r"noenc.*which image encoder"):
        predict(demo_slide_file, demo_spots, bare, PredictOptions(n_samples=2, steps=2, device="cpu"))


def test_export_h5ad_is_scanpy_ready_and_reopens(
    tiny_checkpoint: Path, demo_slide_file: Path, demo_spots, tmp_path: Path
) -> None:
    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    from napari_stem.anndata_io import read_prediction
    from napari_stem.export import write_prediction
    from napari_stem.predict import predict
    from napari_stem.slide import open_slide

    prediction = predict(
        demo_slide_file,
        demo_spots,
        tiny_checkpoint,
        PredictOptions(n_samples=3, steps=3, device="cpu", quantiles=(0.5,), intervals=(0.5,)),
    )
    slide = open_slide(demo_slide_file)
    out = write_prediction(tmp_path / "pred.h5ad", prediction, demo_spots, slide)
    assert [p.name for p in tmp_path.iterdir()] == ["pred.h5ad"]  # no partial file left behind
    adata = anndata.read_h5ad(out)
    np.testing.assert_allclose(adata.X, prediction.mean)
    np.testing.assert_allclose(adata.layers["variance"], prediction.variance)
    assert {"median", "lo50", "hi50"} <= set(adata.layers) and not any(name.startswith("q") for name in adata.layers)
    np.testing.assert_allclose(adata.obsm["spatial"], demo_spots.centers_px)
    assert list(adata.var_names) == ["GA", "GB", "GC", "GD", "GE"]
    axes = sc.pl.spatial(adata, color=["GA"], library_id="ST", img_key="downscaled_fullres", show=False)
    assert len(axes) == 1 and axes[0].get_images()  # drawn over the slide thumbnail
    again, spots = read_prediction(out)
    np.testing.assert_allclose(again.variance, prediction.variance)
    assert again.quantile_levels == (0.5,) and again.interval_specs == prediction.interval_specs
    np.testing.assert_allclose(again.intervals, prediction.intervals)
    assert spots.mpp == pytest.approx(0.499) and again.metadata["slide"] == str(demo_slide_file)
    with pytest.raises(StemError, match="not a napari-stem prediction"):
        read_prediction(_plain_h5ad(tmp_path))


def _plain_h5ad(tmp_path: Path) -> Path:
    import anndata

    path = tmp_path / "plain.h5ad"
    anndata.AnnData(X=np.zeros((2, 2), np.float32)).write_h5ad(path)
    return path


def test_sampling_settings_are_passed_only_as_predict_options() -> None:
    """iter_predict's keywords are its inputs (embeddings, encoder, cache, events), never a sampling option."""
    import inspect

    from napari_stem.predict import iter_predict

    parameters = inspect.signature(iter_predict).parameters
    assert list(parameters)[:4] == ["slide_path", "spots", "checkpoint", "options"]
    assert not {field.name for field in fields(PredictOptions)} & set(parameters)


def test_a_cancelled_prediction_carries_the_provenance_of_a_finished_one(
    tiny_checkpoint: Path, demo_slide_file: Path, demo_spots, tmp_path: Path
) -> None:
    """The widget's controller (Qt-free) keeps a cancelled run's sampled spots with the same metadata keys."""
    from napari_stem.plugin.controller import PredictController, PredictJob, PredictSettings
    from napari_stem.plugin.layers import SlideFrame
    from napari_stem.stem.checkpoint import load_checkpoint

    def run(cancel_after_first_batch: bool):
        controller = PredictController()
        controller.sample_batch_size = 3
        settings = PredictSettings(checkpoint=tiny_checkpoint, n_samples=2, steps=2, device="cpu", intervals=(0.5,))
        job = PredictJob(
            job_id=1, slide_path=demo_slide_file, slide_name="demo", mpp=demo_spots.mpp, frame=SlideFrame.microns(0.5),
            spots=demo_spots, checkpoint=tiny_checkpoint, genes=load_checkpoint(tiny_checkpoint).genes,
            encoder="efficientnet_lite0", settings=settings, cache_path=tmp_path / "cache.h5",
        )  # fmt: skip
        controller.start(job)
        events = controller.run(job)
        while True:
            try:
                event = next(events)
            except StopIteration as stopped:
                outcome = stopped.value
                break
            controller.apply(job.job_id, event)
            if cancel_after_first_batch and event.stage == "sample":
                controller.request_cancel()
        assert controller.finish(job.job_id, outcome) == ("cancelled" if cancel_after_first_batch else "done")
        return controller.result

    partial, full = run(cancel_after_first_batch=True), run(cancel_after_first_batch=False)
    assert partial.done == 3 and full.done == 6
    assert set(partial.prediction.metadata) == set(full.prediction.metadata) | {"status"}
    for key in ("checkpoint", "encoder", "patch", "sampler", "steps", "seed", "device", "precision", "slide"):
        assert partial.prediction.metadata[key] == full.prediction.metadata[key]
    assert partial.prediction.metadata["status"] == "cancelled after 3/6 spots"
    np.testing.assert_array_equal(partial.prediction.mean, full.prediction.mean[:3])
