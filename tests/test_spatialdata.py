"""Predictions written as SpatialData: ``spatialdata.read_zarr`` opens them, the table joins the
circles, the circles sit on the right pixels of the image; spots come back from SpatialData objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("spatialdata")

MPP = 0.5
HEIGHT, WIDTH = 1600, 2100
RED = (220, 20, 30)


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory):
    """A slide with a red 60-px square under each of 14 spots, and a prediction for those spots."""
    from napari_stem import intervals
    from napari_stem.spots import Spots
    from napari_stem.stem.sampling import Prediction
    from napari_stem.synthetic import write_pyramidal_tiff

    rng = np.random.default_rng(4)
    centers = np.column_stack([rng.uniform(100, WIDTH - 100, 14), rng.uniform(100, HEIGHT - 100, 14)]).round(1)
    image = np.full((HEIGHT, WIDTH, 3), 245, np.uint8)
    for x, y in centers:
        image[int(y) - 30 : int(y) + 30, int(x) - 30 : int(x) + 30] = RED
    slide_path = tmp_path_factory.mktemp("slide") / "marked.tif"
    write_pyramidal_tiff(slide_path, image, MPP, compression="zlib")
    barcodes = np.array([f"AAAC{i:03d}-1" for i in range(len(centers))], dtype=object)
    spots = Spots(
        centers_px=centers,
        diameter_px=55 / MPP,
        mpp=MPP,
        barcodes=barcodes,
        obs=pd.DataFrame({"array_row": np.arange(len(centers))}, index=barcodes.astype(str)),
    )
    samples = rng.normal(size=(len(centers), 19, 3)).astype(np.float32)
    specs = intervals.plan_intervals((0.5, 0.9), 19)
    prediction = Prediction(
        mean=samples.mean(axis=1),
        variance=samples.var(axis=1, ddof=1),
        genes=["EPCAM", "KRT8", "VIM"],
        interval_specs=specs,
        intervals=np.stack([np.stack(spec.bounds(samples)) for spec in specs]),
        metadata={"checkpoint": "ckpt", "encoder": "efficientnet_lite0", "n_samples": 19, "steps": 3},
    )
    return slide_path, spots, prediction


@pytest.fixture(scope="module")
def written(marked, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_stem.slide import open_slide
    from napari_stem.spatialdata_io import write_prediction_zarr

    slide_path, spots, prediction = marked
    out = tmp_path_factory.mktemp("sd") / "marked.zarr"
    with open_slide(slide_path, mpp=MPP) as slide:  # downscaled 3x: 700 px wide, levels 700 / 350
        assert write_prediction_zarr(out, prediction, spots, slide, image_max_size=700) == out
    return out


def test_spatialdata_prediction_opens_and_table_joins_shapes(written: Path, marked) -> None:
    import spatialdata as sd
    from spatialdata import join_spatialelement_table

    _, spots, prediction = marked
    sdata = sd.read_zarr(written)
    assert (
        set(sdata.images) == {"marked_hne"} and set(sdata.shapes) == {"marked_spots"} and set(sdata.tables) == {"table"}
    )
    assert set(sdata.coordinate_systems) == {"marked"}
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("marked_spots", "region", "spot_id")
    np.testing.assert_allclose(table.X, prediction.mean)
    np.testing.assert_allclose(table.layers["variance"], prediction.variance)
    for spec, (lower, upper) in zip(prediction.interval_specs, prediction.intervals, strict=True):
        np.testing.assert_allclose(table.layers[spec.lower_layer], lower)
        np.testing.assert_allclose(table.layers[spec.upper_layer], upper)
    assert {"lo50", "hi50", "lo90", "hi90"} <= set(table.layers)

    shapes, joined = join_spatialelement_table(
        sdata, spatial_element_names="marked_spots", table_name="table", how="inner"
    )
    joined_shapes = shapes["marked_spots"]
    assert len(joined_shapes) == len(spots) == joined.n_obs
    np.testing.assert_allclose(joined_shapes["radius"], 55 / MPP / 2)
    order = joined.obs["spot_id"].to_numpy()
    np.testing.assert_allclose(
        np.column_stack([joined_shapes.loc[order].geometry.x, joined_shapes.loc[order].geometry.y]),
        spots.centers_px[order],
    )
    assert list(joined.obs_names) == [str(b) for b in spots.barcodes[order]]


def test_circles_sit_on_the_right_image_pixels(written: Path, marked) -> None:
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    _, spots, _ = marked
    sdata = sd.read_zarr(written)
    image = sdata.images["marked_hne"]
    levels = list(image.keys())
    assert len(levels) == 2 and image[levels[0]]["image"].shape == (3, 533, 700)  # multiscale, downscaled copy
    for level in levels:
        data = image[level]["image"]
        to_system = get_transformation(data, to_coordinate_system="marked")
        affine = np.asarray(to_system.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
        pixels = np.asarray(data.values)  # (c, y, x)
        # whole image covers the whole slide in full-res pixels
        np.testing.assert_allclose(affine[:2, :2] @ [pixels.shape[2], pixels.shape[1]], [WIDTH, HEIGHT], rtol=1e-9)
        circles = sdata.shapes["marked_spots"]
        xy = np.column_stack([circles.geometry.x, circles.geometry.y])
        image_xy = (xy - affine[:2, 2]) @ np.linalg.inv(affine[:2, :2]).T
        cols, rows = np.floor(image_xy).astype(int).T
        under = pixels[:, rows, cols].T
        assert np.abs(under.astype(int) - RED).max() < 40, (level, under)  # every centre lands on its red square
        # and just outside the square (40 full-res px right of the centre) it is background
        outside = np.floor((xy + [40, 0] - affine[:2, 2]) @ np.linalg.inv(affine[:2, :2]).T).astype(int)
        inside_slide = outside[:, 0] < pixels.shape[2]
        assert (pixels[0, outside[inside_slide, 1], outside[inside_slide, 0]] > 200).mean() > 0.8


def test_round_trip_reader_and_spots_from_spatialdata(written: Path, marked, tmp_path: Path) -> None:
    from napari_stem.plugin.reader import get_reader
    from napari_stem.spatialdata_io import read_prediction_zarr, spots_from_spatialdata

    slide_path, spots, prediction = marked
    back, back_spots, _ = read_prediction_zarr(written)
    np.testing.assert_allclose(back.mean, prediction.mean)
    assert [s.lower_layer for s in back.interval_specs] == ["lo50", "lo90"]
    np.testing.assert_allclose(back_spots.centers_px, spots.centers_px)
    assert list(back_spots.barcodes) == list(spots.barcodes) and back_spots.diameter_px == pytest.approx(110)
    assert back.metadata["slide"] == str(slide_path) and back_spots.mpp == MPP

    plain = spots_from_spatialdata(written, mpp=MPP)  # any SpatialData with circles (path or object)
    np.testing.assert_allclose(plain.centers_um, spots.centers_um)

    reader = get_reader(str(written))
    assert reader is not None
    layers = reader(str(written))
    kinds = [(layer[2], layer[1]["name"]) for layer in layers]
    assert kinds[0][0] == "image" and [k for k, _ in kinds[1:]] == ["points", "points"]
    assert any(name.endswith("EPCAM mean") for _, name in kinds)


def test_spots_in_another_coordinate_system(tmp_path: Path) -> None:
    """Circles under a Scale (e.g. Visium HD bins or a lowres frame) map into the chosen system."""
    import geopandas
    import spatialdata as sd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity, Scale

    from napari_stem.spatialdata_io import spots_from_spatialdata

    circles = geopandas.GeoDataFrame({"radius": [5.0, 5.0]}, geometry=[Point(10, 20), Point(30, 40)])
    shapes = ShapesModel.parse(
        circles,
        transformations={"fullres": Scale([4.0, 4.0], axes=("x", "y")), "lowres": Scale([0.5, 0.5], axes=("x", "y"))},
    )
    sdata = sd.SpatialData(shapes={"bins": shapes})
    spots = spots_from_spatialdata(sdata, coordinate_system="fullres")
    np.testing.assert_allclose(spots.centers_px, [[40, 80], [120, 160]])
    assert spots.diameter_px == pytest.approx(40)
    from napari_stem.errors import SpotsError

    with pytest.raises(SpotsError, match="choose one"):  # two frames, neither an identity
        spots_from_spatialdata(sdata)

    from shapely.geometry import box

    squares = geopandas.GeoDataFrame(geometry=[box(0, 0, 16, 16), box(16, 0, 32, 16), box(0, 16, 16, 32)])
    bins = sd.SpatialData(
        shapes={"hd_square_016um": ShapesModel.parse(squares, transformations={"hd": Identity()}), "bins": shapes}
    )
    binned = spots_from_spatialdata(bins, "hd_square_016um")  # Visium HD-like square bins
    np.testing.assert_allclose(binned.centers_px, [[8, 8], [24, 8], [8, 24]])
    assert binned.diameter_px == pytest.approx(16)


def test_spots_from_spatialdata_io_visium(spaceranger_outs: Path, tmp_path: Path) -> None:
    """A real (mini) spaceranger run read by spatialdata-io: the same spots as napari-stem's own reader."""
    spatialdata_io = pytest.importorskip("spatialdata_io")
    import spatialdata as sd

    from napari_stem.spatialdata_io import spots_from_spatialdata
    from napari_stem.spots import read_spots_spaceranger

    sdata = spatialdata_io.visium(spaceranger_outs, dataset_id="V1")  # circles in V1 (full res) + 2 scaled frames
    sdata.write(tmp_path / "visium.zarr")
    spots = spots_from_spatialdata(sd.read_zarr(tmp_path / "visium.zarr"))
    ours = read_spots_spaceranger(spaceranger_outs)
    order = {barcode: i for i, barcode in enumerate(ours.barcodes)}
    assert set(spots.barcodes) <= set(order) and len(spots) == len(ours)
    rows = [order[b] for b in spots.barcodes]
    np.testing.assert_allclose(spots.centers_px, ours.centers_px[rows])
    assert spots.diameter_px == pytest.approx(ours.diameter_px)
    lowres = spots_from_spatialdata(sdata, coordinate_system="V1_downscaled_lowres")  # another frame on request
    np.testing.assert_allclose(lowres.centers_px, spots.centers_px * 0.0450045, rtol=1e-5)


def test_zarr_output_never_replaces_foreign_folders(written: Path, marked, tmp_path: Path) -> None:
    from napari_stem.errors import StemError
    from napari_stem.spatialdata_io import write_prediction_zarr
    from napari_stem.validate import check_spatialdata_output

    _, spots, prediction = marked
    foreign = tmp_path / "data.zarr"
    foreign.mkdir()
    (foreign / "important.txt").write_text("x")
    with pytest.raises(StemError, match="not a SpatialData prediction napari-stem wrote"):
        write_prediction_zarr(foreign, prediction, spots)
    assert (foreign / "important.txt").exists()
    with pytest.raises(StemError, match="folder named \\*.zarr"):
        check_spatialdata_output(tmp_path / "out.h5ad", [])
    with pytest.raises(StemError, match="input"):
        check_spatialdata_output(written, [written])
    check_spatialdata_output(written, [])  # our own prediction may be replaced
    from napari_stem.export import write_prediction

    again = write_prediction(tmp_path / "again.zarr", prediction, spots, format="zarr")  # no slide: no image
    write_prediction(again, prediction, spots, format="zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.zarr", "data.zarr"]  # no staging left


def test_cli_predicts_spatialdata_with_spots_from_spatialdata_and_a_hub_checkpoint(
    written: Path, marked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stem-train predict SLIDE --spots X.zarr --checkpoint hf-hub:... --format spatialdata --out OUT.zarr."""
    import shutil

    import spatialdata as sd

    import napari_stem.hub as hub_module
    from hub_standin import HubStandin, point_hub_at
    from stem_train.cli import main
    from tiny_models import save_tiny_checkpoint

    slide_path, spots, _ = marked
    repo = save_tiny_checkpoint(tmp_path / "tiny", ["EPCAM", "KRT8"])
    monkeypatch.setattr(hub_module, "_resolved", {})
    out = tmp_path / "pred.zarr"
    with HubStandin() as hub:
        hub.add_repo("lab/tiny", repo)
        point_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf_cache")
        args = [
            "predict",
            str(slide_path),
            "--spots",
            str(written),
            "--checkpoint",
            "hf-hub:lab/tiny",
            "--format",
            "spatialdata",
            "--out",
            str(out),
            "--samples",
            "4",
            "--intervals",
            "",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--mpp",
            str(MPP),
        ]
        assert main(args) == 0
        sdata = sd.read_zarr(out)
        table = sdata.tables["table"]
        assert table.n_obs == len(spots) and list(table.var_names) == ["EPCAM", "KRT8"]
        assert list(table.obs_names) == [str(b) for b in spots.barcodes]  # barcodes carried over from the input zarr
        assert set(sdata.images) == {"pred_hne"} and set(sdata.shapes) == {"pred_spots"}
        assert main(args) == 0  # its own earlier output is replaced
        foreign = tmp_path / "foreign.zarr"
        foreign.mkdir()
        assert (
            main([str(foreign) if a == str(out) else a for a in args]) == 2
        )  # never a folder napari-stem did not write
        assert foreign.exists() and not any(foreign.iterdir())
        assert (
            main(
                [
                    "predict",
                    str(slide_path),
                    "--spots",
                    str(written),
                    "--checkpoint",
                    "hf-hub:lab/tiny",
                    "--format",
                    "spatialdata",
                    "--out",
                    str(written),
                ]
            )
            == 2
        )  # the output is an input
    shutil.rmtree(out)


@pytest.mark.gui
def test_napari_opens_it_with_our_reader_and_napari_spatialdata(
    make_napari_viewer, qtbot, written: Path, marked
) -> None:
    """napari's own reader dispatch picks napari-stem's reader; napari-spatialdata reads the same folder as is."""
    napari_spatialdata = pytest.importorskip("napari_spatialdata")
    import spatialdata as sd

    _, spots, _ = marked
    viewer = make_napari_viewer()
    layers = viewer.open(str(written), plugin="napari-stem")
    assert [layer.name for layer in layers][-1].endswith("EPCAM mean")
    np.testing.assert_allclose(layers[-1].data, spots.napari_coords_um)

    from napari_spatialdata import Interactive
    from napari_spatialdata._reader import get_reader

    assert get_reader(str(written)) is not None and napari_spatialdata is not None
    interactive = Interactive(sd.read_zarr(written), headless=True)  # what its reader does, kept to inspect
    for element in ("marked_hne", "marked_spots"):  # napari-spatialdata adds layers from a worker, one at a time
        before = len(viewer.layers)
        interactive.add_element(element, "marked")
        qtbot.waitUntil(lambda before=before: len(viewer.layers) > before, timeout=30000)
    circles = interactive.get_layer("marked_spots")
    assert circles is not None and len(circles.data) == len(spots)
    adata = circles.metadata["adata"]
    assert adata.n_obs == len(spots) and list(adata.var_names) == ["EPCAM", "KRT8", "VIM"]
    assert circles.metadata["region_key"] == "region" and circles.metadata["instance_key"] == "spot_id"
    assert interactive.get_layer("marked_hne") is not None
