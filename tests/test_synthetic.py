"""The synthetic HEST-format generator: exact layout, determinism, and learnability."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import anndata
import numpy as np
import openslide
import pytest
from scipy import sparse

from napari_stem.hest import iter_hest_samples
from napari_stem.slide import open_slide
from napari_stem.synthetic import make_demo_dataset


def test_layout_matches_hest(synthetic_hest: Path) -> None:
    adata = anndata.read_h5ad(synthetic_hest / "st" / "SYN000.h5ad")
    assert sparse.issparse(adata.X) and np.issubdtype(adata.X.dtype, np.integer)
    assert adata.X.sum() > 0 and adata.n_vars == 30
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    assert {"in_tissue", "array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs)
    library = adata.uns["spatial"]["ST"]
    assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)
    thumbnail = library["images"]["downscaled_fullres"]
    assert max(thumbnail.shape[:2]) <= 1000 and thumbnail.shape[2] == 3
    scale = library["scalefactors"]["tissue_downscaled_fullres_scalef"]
    assert thumbnail.shape[1] == pytest.approx(2400 * scale, abs=1)
    metadata = json.loads((synthetic_hest / "metadata" / "SYN000.json").read_text())
    for key in ("pixel_size_um_estimated", "spot_diameter", "inter_spot_dist", "st_technology", "species", "patient"):
        assert key in metadata
    assert metadata["spot_diameter"] == 55.0 and metadata["inter_spot_dist"] == 100.0
    # Visium geometry: neighbouring spots 100 µm apart on a hex lattice
    from scipy.spatial import cKDTree

    xy_um = adata.obsm["spatial"] * metadata["pixel_size_um_estimated"]
    distances, _ = cKDTree(xy_um).query(xy_um, k=2)
    assert np.median(distances[:, 1]) == pytest.approx(100.0)
    assert ((adata.obs.array_row + adata.obs.array_col) % 2 == 0).all()


def test_slides_are_multilevel_for_openslide(synthetic_hest: Path) -> None:
    path = synthetic_hest / "wsis" / "SYN001.tif"
    handle = openslide.OpenSlide(str(path))
    assert handle.level_count >= 3
    assert float(handle.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    slide = open_slide(path)
    assert slide.shape == (2400, 2400) and slide.level_count == handle.level_count


def test_same_seed_same_data(tmp_path: Path) -> None:
    first = make_demo_dataset(tmp_path / "a", n_slides=1, n_genes=12, seed=3, slide_size_um=600.0)
    second = make_demo_dataset(tmp_path / "b", n_slides=1, n_genes=12, seed=3, slide_size_um=600.0)
    make_demo_dataset(tmp_path / "c", n_slides=1, n_genes=12, seed=4, slide_size_um=600.0)
    assert first == second
    a = anndata.read_h5ad(tmp_path / "a" / "st" / "SYN000.h5ad")
    b = anndata.read_h5ad(tmp_path / "b" / "st" / "SYN000.h5ad")
    c = anndata.read_h5ad(tmp_path / "c" / "st" / "SYN000.h5ad")
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert (tmp_path / "a" / "wsis" / "SYN000.tif").read_bytes() == (
        tmp_path / "b" / "wsis" / "SYN000.tif"
    ).read_bytes()
    assert a.X.shape != c.X.shape or not np.array_equal(a.X.toarray(), c.X.toarray())


def _patch_features(sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simple image features per spot, read back through the slide reader: colour and stain stats."""
    from skimage.color import rgb2hed

    slide, spots = sample.open_slide(), sample.read_spots()
    rows = []
    for center in spots.centers_px:
        patch = slide.read_patch(tuple(center), size_um=56.0, target_mpp=0.5)
        hed = rgb2hed(patch).reshape(-1, 3)
        rgb = patch.reshape(-1, 3) / 255.0
        rows.append(np.concatenate([rgb.mean(0), rgb.std(0), hed.mean(0), hed.std(0), [(hed[:, 0] > 0.12).mean()]]))
    adata = anndata.read_h5ad(sample.st_path)
    return np.asarray(rows), np.log2(1 + adata.X.toarray()), adata.var["synthetic_image_driven"].to_numpy()


def test_expression_is_learnable_from_the_image(synthetic_hest: Path) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = [_patch_features(sample) for sample in iter_hest_samples(synthetic_hest)]
    train_x = np.concatenate([d[0] for d in data[:3]])
    train_y = np.concatenate([d[1] for d in data[:3]])
    test_x, test_y, image_driven = data[3]
    ridge = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(train_x, train_y)
    predicted = ridge.predict(test_x)
    mean_baseline = np.broadcast_to(train_y.mean(axis=0), test_y.shape)
    mse_ridge = ((predicted - test_y) ** 2).mean(axis=0)
    mse_mean = ((mean_baseline - test_y) ** 2).mean(axis=0)
    # On held-out slides, the image explains the image-driven genes …
    assert mse_ridge[image_driven].mean() < 0.8 * mse_mean[image_driven].mean()
    pcc = np.array([np.corrcoef(predicted[:, g], test_y[:, g])[0, 1] for g in range(test_y.shape[1])])
    assert np.nanmean(pcc[image_driven]) > 0.4
    # … and nothing explains the noise genes.
    assert np.nanmean(pcc[~image_driven]) < 0.25


def test_real_source_is_split_into_disjoint_tissue(tmp_path: Path, demo_slide_file: Path) -> None:
    from napari_stem.synthetic import BAND_GAP_UM, SOURCE_BANDS, shared_tissue

    samples = make_demo_dataset(tmp_path, n_slides=4, n_genes=10, seed=1, source=demo_slide_file, spot_pitch_um=60.0)
    assert [s.split for s in samples] == ["train", "train", "validation", "test"]
    assert all(s.n_spots > 0 for s in samples)
    metadata = {s.sample_id: json.loads((tmp_path / "metadata" / f"{s.sample_id}.json").read_text()) for s in samples}
    source_height, source_width = metadata["SYN000"]["source_shape_px"]
    assert (source_height, source_width) == (round(2967 * 0.998), round(2220 * 0.998))  # 0.499 µm/px read at 0.5
    # Each slide is its band of the source; the second training slide shows the other training band, rotated by 90°.
    for sample_id, meta in metadata.items():
        top, bottom = meta["source_rows_px"]
        slide = open_slide(tmp_path / "wsis" / f"{sample_id}.tif")
        expected = (bottom - top, source_width)
        assert slide.shape == (expected if meta["source_orientation"] % 2 == 0 else expected[::-1])
    bands = sorted((tuple(m["source_rows_px"]), m["split"]) for m in metadata.values())
    assert [split for _, split in bands] == [split for split, _ in SOURCE_BANDS]
    gap_px = round(BAND_GAP_UM / 0.5)  # the written slides' default µm/px
    assert all(b[0][0] - a[0][1] >= gap_px for a, b in pairwise(bands))
    # No validation or test patch shows a pixel of training tissue.
    assert shared_tissue(tmp_path) == {}


def test_shared_tissue_finds_a_test_slide_cut_from_training_tissue(tmp_path: Path, demo_slide_file: Path) -> None:
    from napari_stem.synthetic import shared_tissue

    make_demo_dataset(tmp_path, n_slides=3, n_genes=10, seed=1, source=demo_slide_file)
    meta_path = tmp_path / "metadata" / "SYN002.json"
    test_meta = json.loads(meta_path.read_text())
    train_meta = json.loads((tmp_path / "metadata" / "SYN000.json").read_text())
    test_meta["source_rows_px"] = train_meta["source_rows_px"]  # as the old demo did: the test slide is training tissue
    test_meta["source_orientation"] = 4
    meta_path.write_text(json.dumps(test_meta))
    shared = shared_tissue(tmp_path)
    assert list(shared) == [("SYN002", "SYN000")] and shared["SYN002", "SYN000"] > 10_000


def test_a_real_source_needs_three_slides(tmp_path: Path, demo_slide_file: Path) -> None:
    with pytest.raises(ValueError, match="n_slides must be >= 3"):
        make_demo_dataset(tmp_path, n_slides=2, n_genes=10, seed=1, source=demo_slide_file)


def test_a_failed_slide_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import tifffile

    from napari_stem.synthetic import write_pyramidal_tiff

    image = np.full((1024, 1024, 3), 200, np.uint8)
    calls = []

    def fail_on_second_level(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    original = tifffile.TiffWriter.write
    monkeypatch.setattr(tifffile.TiffWriter, "write", fail_on_second_level)
    with pytest.raises(OSError, match="disk full"):
        write_pyramidal_tiff(tmp_path / "slide.tif", image, mpp=0.5, tile=256)
    assert list(tmp_path.iterdir()) == []  # neither the slide nor a partial file
    monkeypatch.setattr(tifffile.TiffWriter, "write", original)
    write_pyramidal_tiff(tmp_path / "slide.tif", image, mpp=0.5, tile=256)
    assert [p.name for p in tmp_path.iterdir()] == ["slide.tif"] and len(open_slide(tmp_path / "slide.tif").levels) >= 2
