"""Slide I/O: lazy pyramids from OpenSlide and tifffile, physical-size patches, bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import openslide
import pytest

from napari_stem.errors import SlideError, StemError
from napari_stem.slide import open_slide
from napari_stem.synthetic import write_pyramidal_tiff


@pytest.fixture
def gradient_tiff(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A lossless 1100 × 900 px pyramidal TIFF at 0.5 µm/px whose pixels encode their position."""
    yy, xx = np.mgrid[0:1100, 0:900]
    image = np.stack([xx % 256, yy % 256, (xx // 256) * 40 + (yy // 256)], axis=-1).astype(np.uint8)
    path = tmp_path / "gradient.tif"
    write_pyramidal_tiff(path, image, mpp=0.5, compression="zlib", tile=256)
    return path, image


def test_real_svs_opens_lazily_with_its_pixel_size(demo_slide_file: Path) -> None:
    slide = open_slide(demo_slide_file)
    assert slide.backend == "openslide"
    assert slide.shape == (2967, 2220)
    assert slide.mpp == pytest.approx(0.499)
    assert isinstance(slide.levels[0], da.Array)
    assert slide.levels[0].chunks[0][0] == 240  # Aperio's native tile height
    assert slide.levels[0].shape == (2967, 2220, 3)


def test_real_svs_region_matches_openslide(demo_slide_file: Path) -> None:
    slide = open_slide(demo_slide_file)
    ours = slide.read_region(1000, 1200, 300, 200)
    reference = np.asarray(openslide.OpenSlide(str(demo_slide_file)).read_region((1000, 1200), 0, (300, 200)))[..., :3]
    np.testing.assert_array_equal(ours, reference)
    lazy = np.asarray(slide.levels[0][1200:1400, 1000:1300])
    np.testing.assert_array_equal(lazy, reference)


def test_real_svs_patches_in_microns(demo_slide_file: Path) -> None:
    slide = open_slide(demo_slide_file)
    patch = slide.read_patch((1100.0, 1500.0), size_um=112.0, target_mpp=0.5)
    assert patch.shape == (224, 224, 3) and patch.dtype == np.uint8
    assert patch.std() > 10  # real tissue, not blank
    native = slide.read_native_crop((1100.4, 1500.6), spot_diameter_px=110.2)
    assert native.shape == (224, 224, 3)
    np.testing.assert_array_equal(native, slide.read_region(988, 1389, 224, 224))
    big = slide.read_native_crop((1100, 1500), spot_diameter_px=301.0)
    assert big.shape == (300, 300, 3)


def test_generated_tiff_pyramid_in_both_backends(gradient_tiff: tuple[Path, np.ndarray]) -> None:
    path, image = gradient_tiff
    by_tifffile = open_slide(path)
    by_openslide = open_slide(path, backend="openslide")
    assert by_tifffile.backend == "tifffile"
    for slide in (by_tifffile, by_openslide):
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_count == 3
        assert slide.shape == (1100, 900)
        assert slide.downsamples[1] == pytest.approx(2.0)
        np.testing.assert_array_equal(slide.read_region(130, 270, 300, 250), image[270:520, 130:430])
    assert by_tifffile.levels[0].chunksize[:2] == (256, 256)
    assert openslide.OpenSlide(str(path)).level_count == 3  # every level is a top-level page


@pytest.mark.parametrize("compression,tile,alpha", [("jpeg", 256, False), ("lzw", 128, True), ("zlib", 256, False)])
def test_tile_reader_reads_what_zarr_reads(tmp_path: Path, compression: str, tile: int, alpha: bool) -> None:
    """Patch reads decode tiles directly (and keep recent ones); every pixel equals the zarr view."""
    import tifffile

    from napari_stem.slide.tifffile_backend import _RGBView, _TiffTiles

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (1000, 1300, 4 if alpha else 3), dtype=np.uint8)
    path = tmp_path / f"tiles_{compression}.tif"
    with tifffile.TiffWriter(path) as writer:  # edges not multiples of the tile; a reduced level too
        for level_image in (image, image[::3, ::3]):
            writer.write(
                np.ascontiguousarray(level_image),
                tile=(tile, tile),
                photometric="rgb",
                extrasamples=[2] if alpha else None,
                compression=compression,
                subfiletype=0 if level_image is image else 1,
            )
    slide = open_slide(path, mpp=0.5)
    assert [type(reader) for reader in slide.reader.level_readers] == [_TiffTiles, _TiffTiles]
    for level in range(slide.level_count):
        height, width = slide.levels[level].shape[:2]
        for _ in range(40):
            x, y = int(rng.integers(-50, width)), int(rng.integers(-50, height))
            w, h = (int(v) for v in rng.integers(1, 400, 2))
            expected = np.full((h, w, 3), 9, np.uint8)
            xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
            if xb > xa and yb > ya:
                expected[ya - y : yb - y, xa - x : xb - x] = np.asarray(slide.levels[level][ya:yb, xa:xb])
            np.testing.assert_array_equal(slide.read_region(x, y, w, h, level=level, fill=9), expected)
    if compression != "jpeg":
        np.testing.assert_array_equal(slide.read_region(0, 0, 1300, 1000), image[..., :3])
    reader = slide.reader.level_readers[0]
    assert 0 < len(reader._tiles) <= reader.max_tiles == 2 * reader.tiles_across + 8

    # a box read again comes from the kept tiles: the file is not read
    reads = []

    class CountingHandle:
        def __init__(self, handle) -> None:
            self.handle, self.lock, self.seek = handle, handle.lock, handle.seek

        def read(self, size: int) -> bytes:
            reads.append(size)
            return self.handle.read(size)

    reader.filehandle = CountingHandle(reader.filehandle)
    reader._tiles.clear()
    box = slide.read_region(10, 900, 100, 90)
    assert len(reads) > 0
    reads.clear()
    np.testing.assert_array_equal(slide.read_region(10, 900, 100, 90), box)
    assert reads == []

    # a stripped (untiled) TIFF still reads through zarr
    stripped = tmp_path / "stripped.tif"
    tifffile.imwrite(stripped, image[..., :3], photometric="rgb", compression="zlib", rowsperstrip=64)
    plain = open_slide(stripped, mpp=0.5)
    assert isinstance(plain.reader.level_readers[0], _RGBView)
    np.testing.assert_array_equal(plain.read_region(100, 50, 300, 200), image[50:250, 100:400, :3])


def test_region_outside_slide_is_filled(gradient_tiff: tuple[Path, np.ndarray]) -> None:
    path, image = gradient_tiff
    slide = open_slide(path)
    region = slide.read_region(-10, -5, 30, 20)
    assert (region[:5] == 255).all() and (region[:, :10] == 255).all()
    np.testing.assert_array_equal(region[5:, 10:], image[0:15, 0:20])
    assert (slide.read_region(5000, 5000, 4, 4, fill=0) == 0).all()


def test_patch_reads_from_coarser_level_when_target_is_coarser(gradient_tiff: tuple[Path, np.ndarray]) -> None:
    path, _ = gradient_tiff
    slide = open_slide(path)
    assert slide.best_level_for_mpp(0.5) == 0
    assert slide.best_level_for_mpp(1.0) == 1
    assert slide.best_level_for_mpp(1.5) == 1
    patch = slide.read_patch((450.0, 550.0), size_um=112.0, target_mpp=1.0)
    assert patch.shape == (112, 112, 3)
    expected = slide.read_region(225 - 56, 275 - 56, 112, 112, level=1)
    np.testing.assert_array_equal(patch, expected)


def test_mpp_override_and_missing_mpp(tmp_path: Path, gradient_tiff: tuple[Path, np.ndarray]) -> None:
    import tifffile

    path, image = gradient_tiff
    assert open_slide(path, mpp=0.25).mpp == 0.25
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, image, tile=(256, 256), photometric="rgb")
    slide = open_slide(bare)
    assert slide.mpp is None
    with pytest.raises(SlideError, match=r"bare\.tif.*no pixel size.*mpp="):
        slide.read_patch((100, 100), 112, 0.5)


def test_truncated_tiff_is_refused_naming_the_file(tmp_path: Path, gradient_tiff: tuple[Path, np.ndarray]) -> None:
    path, _ = gradient_tiff
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SlideError, match=r"truncated\.tif.*(truncated|corrupt)"):
        open_slide(truncated)


def test_truncated_svs_is_refused(tmp_path: Path, demo_slide_file: Path) -> None:
    truncated = tmp_path / "cut.svs"
    truncated.write_bytes(demo_slide_file.read_bytes()[:300_000])
    with pytest.raises(SlideError, match=r"cut\.svs"):
        open_slide(truncated)


def test_non_slide_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.tif"
    text.write_text("this is not an image")
    with pytest.raises(SlideError, match=r"notes\.tif"):
        open_slide(text)
    png = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(png)
    with pytest.raises(SlideError, match=r"photo\.png.*not a slide"):
        open_slide(png)
    with pytest.raises(SlideError, match=r"missing\.svs.*does not exist"):
        open_slide(tmp_path / "missing.svs")
    gray = tmp_path / "gray.tif"
    import tifffile

    tifffile.imwrite(gray, np.zeros((64, 64), np.uint16))
    with pytest.raises(SlideError, match=r"gray\.tif.*not an RGB"):
        open_slide(gray)


def test_thumbnail_scale(demo_slide_file: Path, tmp_path: Path) -> None:
    slide = open_slide(demo_slide_file)
    thumb, scale = slide.thumbnail(500)
    assert max(thumb.shape[:2]) == 500
    assert scale == pytest.approx(500 / 2967)
    copy = tmp_path / "copy.svs"
    shutil.copy(demo_slide_file, copy)
    with open_slide(copy) as slide:
        assert slide.shape == (2967, 2220)


def test_close_closes_the_tiff_file_and_reads_after_it_say_so(gradient_tiff: tuple[Path, np.ndarray]) -> None:
    path, image = gradient_tiff
    slide = open_slide(path)
    tiff = slide.reader.tiff
    assert not tiff.filehandle.closed and not slide.closed
    slide.close()
    assert tiff.filehandle.closed and slide.closed
    slide.close()  # closing twice is fine
    with pytest.raises(SlideError, match=r"gradient\.tif.*closed"):
        slide.read_region(0, 0, 10, 10)
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_patch((100.0, 100.0), 50.0, 0.5), image[50:150, 50:150])
    assert slide.reader.tiff.filehandle.closed
    with pytest.raises(SlideError, match=r"gradient\.tif.*closed"):
        slide.read_native_crop((100.0, 100.0), 55.0)


def test_close_closes_the_openslide_handle(demo_slide_file: Path) -> None:
    with open_slide(demo_slide_file) as slide:
        handle = slide.reader.handle
        assert slide.read_region(0, 0, 8, 8).shape == (8, 8, 3)
    with pytest.raises(Exception, match="closed"):
        handle.read_region((0, 0), 0, (8, 8))
    slide.close()
    with pytest.raises(SlideError, match=r"cmu_small_region\.svs.*closed"):
        slide.thumbnail(100)


def test_a_file_refused_at_open_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slide that opens but fails a later check (here: its pixel size) leaves no handle open."""
    import tifffile

    opened = []
    real_tifffile = tifffile.TiffFile

    def recording_tifffile(*args: object, **kwargs: object) -> tifffile.TiffFile:
        opened.append(real_tifffile(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(tifffile, "TiffFile", recording_tifffile)
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, np.zeros((64, 64), np.uint16))
    with pytest.raises(SlideError, match=r"gray\.tif.*not an RGB"):
        open_slide(gray)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(StemError, match=r"rgb\.tif"):
        open_slide(rgb, mpp=-1.0)
    assert len(opened) == 2 and all(tif.filehandle.closed for tif in opened)
