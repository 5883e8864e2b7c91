"""Writers (.h5ad through anndata_io, .csv), prediction layers, and the readers that re-open them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_stem.errors import StemError
from napari_stem.plugin.layers import gene_contrast_limits, prediction_layer_data
from napari_stem.spots import Spots

GENES = ["GA", "GB", "GC"]


@pytest.fixture
def prediction_and_spots():
    from napari_stem.stem.sampling import Prediction

    rng = np.random.default_rng(0)
    n = 6
    spots = Spots(
        centers_px=np.column_stack([np.arange(n) * 200.0 + 100, np.full(n, 300.0)]),
        diameter_px=110.0,
        mpp=0.5,
        barcodes=np.array([f"b{i}" for i in range(n)], dtype=object),
        obs=pd.DataFrame(
            {"array_row": np.zeros(n, int), "array_col": np.arange(n) * 2}, index=[f"b{i}" for i in range(n)]
        ),
    )
    prediction = Prediction(
        mean=rng.normal(size=(n, 3)).astype(np.float32),
        variance=rng.uniform(0.1, 1, size=(n, 3)).astype(np.float32),
        genes=list(GENES),
        metadata={
            "checkpoint": "ckpt",
            "encoder": "efficientnet_lite0",
            "n_samples": 4,
            "steps": 3,
            "sampler": "ddim",
            "seed": 0,
        },
    )
    return prediction, spots


def _layers(prediction, spots):
    return [prediction_layer_data(prediction, spots, kind) for kind in ("mean", "sd")]


def test_prediction_layer_data(prediction_and_spots) -> None:
    prediction, spots = prediction_and_spots
    (coords, kwargs, layer_type), (_, sd_kwargs, _) = _layers(prediction, spots)
    assert layer_type == "points" and kwargs["name"] == "GA mean" and sd_kwargs["name"] == "GA sd"
    np.testing.assert_allclose(coords, spots.napari_coords_um)  # µm frame, (row, col)
    assert kwargs["size"] == pytest.approx(55.0) and kwargs["units"] == ("um", "um")
    # hover reads the displayed gene first: mean, sd, variance, then the barcode
    assert list(kwargs["features"].columns) == ["GA mean", "GA sd", "barcode"]
    np.testing.assert_allclose(kwargs["features"]["GA mean"], prediction.mean[:, 0])
    np.testing.assert_allclose(sd_kwargs["features"]["GA sd"], np.sqrt(prediction.variance[:, 0]), rtol=1e-6)
    assert kwargs["face_color"] == "GA mean" and sd_kwargs["face_color"] == "GA sd" and kwargs["border_width"] == 0
    assert (kwargs["face_colormap"], sd_kwargs["face_colormap"]) == ("viridis", "magma")
    assert kwargs["face_contrast_limits"] == gene_contrast_limits(prediction.mean[:, 0], lower_bound=0.0)
    assert kwargs["metadata"]["genes"] == GENES and kwargs["metadata"]["prediction"] is prediction
    assert 0 < kwargs["opacity"] < 1  # the tissue shows through
    # all genes on request; an interval column when samples are kept ([min, max] of K = 4: 60 %)
    from napari_stem.plugin.layers import prediction_features

    assert "GC mean" in prediction_features(prediction, spots, "GB", all_genes=True)
    prediction.samples = np.random.default_rng(1).normal(size=(len(spots), 4, 3)).astype(np.float32)
    table = prediction_features(prediction, spots, "GB")
    low, high = prediction.samples[0, :, 1].min(), prediction.samples[0, :, 1].max()
    assert table["GB 60% interval"][0] == f"{low:.3g} – {high:.3g}"


def test_gene_contrast_limits_are_robust() -> None:
    values = np.r_[np.linspace(0, 1, 98), 1000.0, np.nan]
    low, high = gene_contrast_limits(values)
    assert 0 <= low < 0.05 and 0.9 < high < 2  # one outlier does not wash out the map
    assert gene_contrast_limits([np.nan, np.nan]) == (0.0, 1.0)
    assert gene_contrast_limits(np.r_[-0.5, np.linspace(0, 2, 50)], lower_bound=0.0)[0] == 0.0  # log counts start at 0
    low, high = gene_contrast_limits([3.0, 3.0])
    assert low < 3.0 < high


def test_h5ad_writer_is_the_cli_layout_and_round_trips(tmp_path: Path, prediction_and_spots) -> None:
    import anndata

    from napari_stem.plugin.writer import write_h5ad

    prediction, spots = prediction_and_spots
    out = tmp_path / "pred.h5ad"
    assert write_h5ad(str(out), _layers(prediction, spots)) == [str(out)]
    assert [p.name for p in tmp_path.iterdir()] == ["pred.h5ad"]  # atomic: no temporary left
    adata = anndata.read_h5ad(out)
    np.testing.assert_allclose(adata.X, prediction.mean)
    np.testing.assert_allclose(adata.layers["variance"], prediction.variance)
    np.testing.assert_allclose(adata.obsm["spatial"], spots.centers_px)
    assert list(adata.var_names) == GENES and list(adata.obs_names) == list(spots.barcodes)
    assert adata.uns["spatial"]["ST"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)
    assert json.loads(adata.uns["napari_stem"]["provenance_json"])["encoder"] == "efficientnet_lite0"


def test_writers_keep_only_shown_and_predicted_spots(tmp_path: Path, prediction_and_spots) -> None:
    import anndata

    from napari_stem.plugin.writer import write_csv, write_h5ad

    prediction, spots = prediction_and_spots
    prediction.mean[4:] = np.nan  # not sampled yet (a running or cancelled job)
    layers = _layers(prediction, spots)
    layers[0][1]["features"] = layers[0][1]["features"].drop(index=[1]).reset_index(drop=True)  # user deleted spot b1
    write_h5ad(str(tmp_path / "p.h5ad"), layers)
    assert list(anndata.read_h5ad(tmp_path / "p.h5ad").obs_names) == ["b0", "b2", "b3"]
    write_csv(str(tmp_path / "p.csv"), layers)
    assert pd.read_csv(tmp_path / "p.csv")["barcode"].tolist() == ["b0", "b2", "b3"]


def test_csv_writer(tmp_path: Path, prediction_and_spots) -> None:
    from napari_stem.plugin.writer import write_csv

    prediction, spots = prediction_and_spots
    out = tmp_path / "pred.csv"
    write_csv(str(out), _layers(prediction, spots)[1:])  # the variance layer alone carries the whole prediction
    table = pd.read_csv(out)
    assert table.columns[:7].tolist() == ["barcode", "array_row", "array_col", "x_px", "y_px", "x_um", "y_um"]
    np.testing.assert_allclose(table[[f"mean_{g}" for g in GENES]].to_numpy(), prediction.mean, rtol=1e-6)
    np.testing.assert_allclose(table[[f"variance_{g}" for g in GENES]].to_numpy(), prediction.variance, rtol=1e-6)
    np.testing.assert_allclose(table["x_um"], spots.centers_px[:, 0] * 0.5)


def test_csv_write_is_atomic(tmp_path: Path, prediction_and_spots, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_stem.csv_io import write_prediction_csv

    prediction, spots = prediction_and_spots
    out = tmp_path / "pred.csv"
    out.write_text("old\n")

    def broken_to_csv(self, path, **kwargs):
        Path(path).write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken_to_csv)
    with pytest.raises(OSError, match="disk full"):
        write_prediction_csv(out, prediction, spots)
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["pred.csv"]


def test_writer_refuses_other_layers(tmp_path: Path) -> None:
    from napari_stem.plugin.writer import write_h5ad

    with pytest.raises(StemError, match="none of the selected layers is a napari-stem prediction"):
        write_h5ad(str(tmp_path / "x.h5ad"), [(np.zeros((2, 2)), {"metadata": {}}, "points")])


def test_prediction_h5ad_reopens_as_mean_and_variance(tmp_path: Path, prediction_and_spots) -> None:
    from napari_stem.plugin.reader import get_reader
    from napari_stem.plugin.writer import write_h5ad

    prediction, spots = prediction_and_spots
    out = tmp_path / "run1.h5ad"
    write_h5ad(str(out), _layers(prediction, spots))
    (var_coords, var_kwargs, _), (mean_coords, mean_kwargs, mean_type) = get_reader(str(out))(
        str(out)
    )  # no slide, no thumbnail
    assert mean_type == "points" and (mean_kwargs["name"], var_kwargs["name"]) == ("run1 GA mean", "run1 GA sd")
    assert mean_kwargs["visible"] and not var_kwargs["visible"]  # the mean on top, shown; the sd one click away
    np.testing.assert_allclose(mean_coords, spots.napari_coords_um)
    np.testing.assert_allclose(var_coords, mean_coords)
    np.testing.assert_allclose(mean_kwargs["features"]["GA mean"], prediction.mean[:, 0])
    np.testing.assert_allclose(var_kwargs["features"]["GA sd"], np.sqrt(prediction.variance[:, 0]), rtol=1e-6)
    assert mean_kwargs["metadata"]["kind"] == "mean" and var_kwargs["metadata"]["kind"] == "sd"
    # and it can be written again as it was read
    again = tmp_path / "again.h5ad"
    write_h5ad(str(again), [(mean_coords, mean_kwargs, "points")])
    import anndata

    np.testing.assert_allclose(anndata.read_h5ad(again).layers["variance"], prediction.variance)


def test_prediction_h5ad_reopens_over_its_thumbnail_when_the_slide_is_gone(
    tmp_path: Path, prediction_and_spots, demo_slide_file: Path
) -> None:
    import shutil

    from napari_stem.export import write_prediction
    from napari_stem.plugin.reader import get_reader
    from napari_stem.slide import open_slide

    prediction, spots = prediction_and_spots
    moved = tmp_path / "moved_away.svs"
    shutil.copy(demo_slide_file, moved)
    with open_slide(moved, mpp=spots.mpp) as slide:
        write_prediction(tmp_path / "p.h5ad", prediction, spots, slide)
        height_um = slide.shape[0] * spots.mpp
    moved.unlink()
    (image, kwargs, layer_type), *_ = get_reader(str(tmp_path / "p.h5ad"))(str(tmp_path / "p.h5ad"))
    assert layer_type == "image" and kwargs["name"] == "p thumbnail" and kwargs["units"] == ("um", "um")
    assert image.shape[0] * kwargs["scale"][0] == pytest.approx(height_um, rel=0.01)  # spans the slide in µm
    prediction.metadata["slide"] = str(demo_slide_file)  # the slide is there: it opens instead
    write_prediction(tmp_path / "q.h5ad", prediction, spots)
    (_, kwargs, _), *_ = get_reader(str(tmp_path / "q.h5ad"))(str(tmp_path / "q.h5ad"))
    assert kwargs["metadata"]["napari_stem"] == "slide" and kwargs["metadata"]["path"] == str(demo_slide_file)


def test_plain_spots_h5ad_still_opens_as_spots(synthetic_hest: Path) -> None:
    from napari_stem.plugin.reader import get_reader

    path = synthetic_hest / "st" / "SYN000.h5ad"
    ((_, kwargs, layer_type),) = get_reader(str(path))(str(path))
    assert layer_type == "points" and kwargs["metadata"]["napari_stem"] == "spots"


def test_spaceranger_outs_open_as_spots_in_microns(spaceranger_outs: Path) -> None:
    from napari_stem.plugin.reader import get_reader
    from napari_stem.spots import read_spots_spaceranger, visium_mpp_from_lattice

    reader = get_reader(str(spaceranger_outs))
    assert reader is not None
    (image, image_kwargs, image_type), (coords, kwargs, layer_type) = reader(str(spaceranger_outs))
    assert layer_type == "points" and kwargs["units"] == ("um", "um")
    assert image_type == "image" and image_kwargs["rgb"] and image_kwargs["units"] == ("um", "um")
    mpp = kwargs["metadata"]["mpp"]
    # spaceranger's spot_diameter_fullres is a 65 µm spot: the lattice fit must agree within 2 %
    assert kwargs["size"] == pytest.approx(65.0, rel=0.02)
    assert kwargs["metadata"]["spot_diameter_px"] * mpp == pytest.approx(kwargs["size"])
    assert len(coords) == len(kwargs["features"]) > 10
    # the core reader estimates the same µm/px (the CLI and the plugin see one frame); a given one wins
    assert read_spots_spaceranger(spaceranger_outs).mpp == pytest.approx(mpp)
    assert read_spots_spaceranger(spaceranger_outs, mpp=0.3).mpp == 0.3
    # a perfect lattice at 0.5 µm/px, rotated by 10°, is recovered exactly
    rows, cols = np.meshgrid(np.arange(6), np.arange(0, 12, 2), indexing="ij")
    cols = cols + rows % 2
    lattice_um = np.column_stack([cols.ravel() * 50.0, rows.ravel() * 50.0 * np.sqrt(3)])
    turn = np.deg2rad(10)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    centers_px = lattice_um @ rotation.T / 0.5 + 1000
    assert visium_mpp_from_lattice(centers_px, rows.ravel(), cols.ravel()) == pytest.approx(0.5)
    assert get_reader(str(spaceranger_outs / "spatial")) is None
