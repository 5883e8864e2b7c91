"""Open whole-slide images lazily as multiscale pyramids in physical units.

Two backends, one :class:`Slide`:

* **tifffile** for generic (pyramidal) TIFFs such as HEST-1k's ``wsis/<id>.tif``: each pyramid
  level is a zarr array over the file's own tiles (what napari displays), so only the tiles a view
  touches are decoded. Patch reads of tiled levels decode tiles with tifffile directly and keep
  the most recent ones (:class:`_TiffTiles`): neighbouring spots share most of their tiles.
* **OpenSlide** for vendor formats (SVS, NDPI, MRXS, SCN, BIF, VMS, ...): each level is a dask
  array whose chunks are ``read_region`` calls of the slide's native tile size, with OpenSlide's
  RGBA composited on white.

Coordinates are level-0 pixels ``(x, y)`` like ``obsm['spatial']``; physical sizes are in µm.
Nothing is decoded whole: :meth:`Slide.read_region` decodes the tiles under the box only.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import SlideError, StemError, describe_path
from napari_stem.validate import MPP_RANGE_UM, check_mpp, mpp_in_range

#: Extensions napari-stem offers to open as slides (OpenSlide's formats and generic TIFF).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")

#: Stem's native crop is never smaller than this many full-resolution pixels (reference §2.2).
STEM_NATIVE_MIN_CROP_PX = 224

_OPENSLIDE_FALLBACK_TILE = 512
#: Upper bound of the decoded tiles one tiled TIFF level keeps for patch reads.
TILE_CACHE_MAX_BYTES = 64 << 20


@dataclass
class Slide:
    """A whole-slide image as a lazy pyramid.

    ``levels`` holds one ``(height, width, 3)`` uint8 array per level, largest first (dask arrays,
    chunked by the file's tiles). ``mpp`` is µm per level-0 pixel, ``None`` when the file does not
    say and the caller gave none.
    """

    path: Path
    levels: list[Any]
    downsamples: list[float]
    mpp: float | None
    backend: str
    properties: dict[str, str] = field(default_factory=dict)
    _reader: Any = field(default=None, repr=False)
    #: Why the file's own pixel size was not used ("" when it was, or when there is none).
    mpp_problem: str = ""

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)`` in pixels."""
        return tuple(self.levels[0].shape[:2])  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return len(self.levels)

    def level_mpp(self, level: int) -> float:
        return self.require_mpp() * self.downsamples[level]

    def require_mpp(self) -> float:
        """µm/px at level 0, or a :class:`SlideError` that says how to provide it."""
        if self.mpp is None:
            problem = self.mpp_problem or "has no pixel size (µm/px) in its metadata"
            raise SlideError(
                f"{describe_path(self.path)} {problem}. Give the pixel size: --mpp in stem-train, the "
                "'µm/px' field in the widget, mpp= in Python (e.g. 0.25 for a 40× scan, 0.5 for 20×; HEST "
                "records it as 'pixel_size_um_estimated')."
            )
        return self.mpp

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``target_mpp`` (never upsample)."""
        best = 0
        for level, downsample in enumerate(self.downsamples):
            if self.require_mpp() * downsample <= target_mpp * 1.001:
                best = level
        return best

    # ------------------------------------------------------------------ reading
    def read_region(self, x0: int, y0: int, width: int, height: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """Decode a ``(height, width, 3)`` box of ``level``; ``x0, y0`` in that level's pixels.

        Parts of the box outside the slide are ``fill`` (white = glass by default; the reference
        Stem crop pads with black, ``fill=0``).
        """
        level_h, level_w = self.levels[level].shape[:2]
        out = np.full((height, width, 3), fill, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + width, level_w), min(y0 + height, level_h)
        if xb <= xa or yb <= ya:
            return out
        try:
            block = self._read_box(level, xa, ya, xb - xa, yb - ya)
        except SlideError:
            raise
        except Exception as exc:  # decoders raise many types on corrupt tiles
            raise SlideError(
                f"could not decode pixels of {describe_path(self.path)} (level {level}, box x={xa} y={ya} "
                f"w={xb - xa} h={yb - ya}): {exc}. The file is probably truncated or corrupt; re-copy or "
                "re-export it."
            ) from exc
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = block
        return out

    def _read_box(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self.backend == "openslide":
            downsample = self.downsamples[level]
            location = (int(round(x * downsample)), int(round(y * downsample)))
            rgba = np.asarray(self._reader.read_region(location, level, (width, height)))
            return _composite_on_white(rgba)
        return np.asarray(self._reader[level].read(x, y, width, height))

    def read_patch(
        self,
        center_xy_px: tuple[float, float],
        size_um: float,
        target_mpp: float,
        fill: int = 255,
    ) -> np.ndarray:
        """A square patch of ``size_um`` µm centred on a level-0 point, resampled to ``target_mpp``.

        This is HEST's convention (e.g. 112 µm at 0.5 µm/px → 224 px). The patch is read from the
        coarsest level that is not coarser than ``target_mpp`` and resized once.
        """
        out_px = int(round(size_um / target_mpp))
        level = self.best_level_for_mpp(target_mpp)
        level_mpp = self.level_mpp(level)
        src_px = size_um / level_mpp
        cx = center_xy_px[0] / self.downsamples[level]
        cy = center_xy_px[1] / self.downsamples[level]
        src_int = int(math.ceil(src_px))
        x0 = int(math.floor(cx - src_int / 2))
        y0 = int(math.floor(cy - src_int / 2))
        patch = self.read_region(x0, y0, src_int, src_int, level=level, fill=fill)
        if patch.shape[0] != out_px:
            patch = resize_rgb(patch, out_px)
        return patch

    def read_native_crop(self, center_xy_px: tuple[float, float], spot_diameter_px: float, fill: int = 0) -> np.ndarray:
        """Stem's crop: ``max(224, spot diameter)`` level-0 pixels around the spot, no resampling.

        Mirrors the reference: radius 112 when the diameter is below 224 px, else
        ``int(diameter // 2)``; the box is ``(x - r, y - r, x + r, y + r)`` with integer-truncated
        box rounded as PIL's ``crop`` rounds it, padded with black outside the slide.
        """
        radius = (
            STEM_NATIVE_MIN_CROP_PX // 2 if spot_diameter_px < STEM_NATIVE_MIN_CROP_PX else int(spot_diameter_px // 2)
        )
        x0 = int(round(center_xy_px[0] - radius))
        y0 = int(round(center_xy_px[1] - radius))
        return self.read_region(x0, y0, 2 * radius, 2 * radius, level=0, fill=fill)

    def thumbnail(self, max_size: int = 1000) -> tuple[np.ndarray, float]:
        """An RGB overview whose longest edge is at most ``max_size`` px, and its scale factor.

        The scale factor maps level-0 pixels to thumbnail pixels (HEST's
        ``tissue_downscaled_fullres_scalef``).
        """
        height, width = self.shape
        scale = min(1.0, max_size / max(height, width))
        level = 0
        for candidate, downsample in enumerate(self.downsamples):
            if 1.0 / downsample >= scale * 0.999:
                level = candidate
        level_h, level_w = self.levels[level].shape[:2]
        image = self.read_region(0, 0, level_w, level_h, level=level)
        out_h = max(1, int(round(height * scale)))
        out_w = max(1, int(round(width * scale)))
        if image.shape[:2] != (out_h, out_w):
            image = resize_rgb(image, (out_w, out_h))
        return image, scale

    def close(self) -> None:
        closer = getattr(self._reader, "close", None)
        if self.backend == "openslide" and closer is not None:
            closer()
        handle = self.properties.pop("_tifffile_handle", None)
        if handle is not None:  # pragma: no cover - only when a handle was stored
            handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- opening
def open_slide(path: str | Path, mpp: float | None = None, backend: str | None = None) -> Slide:
    """Open a slide lazily.

    ``mpp`` overrides the file's pixel size (HEST recommends its fitted
    ``pixel_size_um_estimated``). ``backend`` forces ``"tifffile"`` or ``"openslide"``; by default
    generic TIFFs go to tifffile and vendor formats to OpenSlide.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"slide {describe_path(path)} does not exist; check the path.")
    if path.is_dir():
        raise SlideError(f"{describe_path(path)} is a folder, not a slide file.")
    if backend is None:
        backend = _choose_backend(path)
    if backend == "tifffile":
        slide = _open_with_tifffile(path)
    elif backend == "openslide":
        slide = _open_with_openslide(path)
    else:
        raise ValueError(f"unknown slide backend {backend!r}; use 'tifffile' or 'openslide'")
    if mpp is not None:
        try:
            slide.mpp = check_mpp(mpp, f"the pixel size given for {describe_path(path)}")
        except StemError:
            slide.close()
            raise
        slide.mpp_problem = ""
    elif slide.mpp is not None and not mpp_in_range(slide.mpp):
        # e.g. a resolution tag of 1 px/cm (10000 µm/px): spot grids and patches would need terabytes.
        slide.mpp_problem = (
            f"records a pixel size of {slide.mpp:g} µm/px, outside the {MPP_RANGE_UM[0]:g}–"
            f"{MPP_RANGE_UM[1]:g} µm/px of real scans, so it was not used"
        )
        slide.mpp = None
    _check_decodable(slide)
    return slide


def _choose_backend(path: Path) -> str:
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # pragma: no cover - detect_format is defensive already
        vendor = None
    if vendor in (None, "generic-tiff") and path.suffix.lower() in (".tif", ".tiff", ".btf"):
        return "tifffile"
    if vendor is None:
        if path.suffix.lower() in (".tif", ".tiff"):
            return "tifffile"
        raise SlideError(
            f"{describe_path(path)} is not a slide OpenSlide or tifffile can read (supported: "
            f"{', '.join(SLIDE_EXTENSIONS)}; a plain PNG/JPEG is not a whole-slide image)."
        )
    return "openslide"


def _open_with_tifffile(path: Path) -> Slide:
    import dask.array as da
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        _check_tiff_not_truncated(tif, path)
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(
            f"{describe_path(path)} is not a readable TIFF ({exc}); it may be truncated, corrupt, or "
            "not a slide at all."
        ) from exc
    if series.ndim != 3 or series.shape[-1] not in (3, 4) or series.dtype != np.uint8:
        tif.close()
        raise SlideError(
            f"{describe_path(path)} holds a {series.shape} {series.dtype} image, not an RGB(A) uint8 "
            "slide; export it as an 8-bit RGB pyramidal TIFF."
        )
    group = zarr.open(series.aszarr(), mode="r")
    arrays = [group[str(index)] for index in range(len(series.levels))] if isinstance(group, zarr.Group) else [group]
    levels = [da.from_zarr(array)[..., :3] for array in arrays]
    zarr_levels = [
        _TiffTiles.for_level(level, tif.filehandle) or _RGBView(array)
        for level, array in zip(series.levels, arrays, strict=True)
    ]
    base_w = levels[0].shape[1]
    downsamples = [base_w / level.shape[1] for level in levels]
    slide = Slide(
        path=path,
        levels=levels,
        downsamples=downsamples,
        mpp=_tiff_mpp(tif),
        backend="tifffile",
        properties={"tifffile.series": series.name or "", "tifffile.levels": str(len(levels))},
        _reader=zarr_levels,
    )
    return slide


class _TiffTiles:
    """Boxes of one tiled TIFF level, decoded tile by tile with tifffile; recent tiles are kept.

    Read through zarr, every patch decodes all the tiles it touches again (3.5 per 224 px patch on
    256 px tiles), plus zarr's per-read bookkeeping. Spots 100 µm apart share most of those tiles,
    so spots read in row order decode each tile about once. The cache holds two rows of tiles
    across the level (what such a pass revisits), at most :data:`TILE_CACHE_MAX_BYTES`. File
    reads share the file handle's lock with the zarr store napari reads from.
    """

    def __init__(self, page: Any, filehandle: Any) -> None:
        self.page = page
        self.filehandle = filehandle
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.tiles_across = math.ceil(int(page.imagewidth) / self.tile_w)
        tile_bytes = self.tile_h * self.tile_w * int(page.samplesperpixel)
        self.max_tiles = max(4, min(2 * self.tiles_across + 8, TILE_CACHE_MAX_BYTES // tile_bytes))
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    @classmethod
    def for_level(cls, level: Any, filehandle: Any) -> _TiffTiles | None:
        """A tile reader for a pyramid level of one plain tiled RGB(A) page, else None (use zarr)."""
        import tifffile

        pages = getattr(level, "pages", None)
        page = pages[0] if pages is not None and len(pages) == 1 else None
        if not isinstance(page, tifffile.TiffPage) or not page.is_tiled:
            return None
        if page.planarconfig != tifffile.PLANARCONFIG.CONTIG or page.imagedepth != 1 or page.tiledepth != 1:
            return None
        if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4):
            return None
        return cls(page, filehandle)

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The ``(height, width, 3)`` box at ``(x, y)``; the box lies inside the level."""
        out = np.empty((height, width, 3), dtype=np.uint8)
        th, tw = self.tile_h, self.tile_w
        for row in range(y // th, (y + height - 1) // th + 1):
            y0, y1 = max(y, row * th), min(y + height, (row + 1) * th)
            for col in range(x // tw, (x + width - 1) // tw + 1):
                x0, x1 = max(x, col * tw), min(x + width, (col + 1) * tw)
                tile = self._tile(row, col)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[
                    y0 - row * th : y1 - row * th, x0 - col * tw : x1 - col * tw
                ]
        return out

    def _tile(self, row: int, col: int) -> np.ndarray:
        key = (row, col)
        with self._cache_lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                return tile
        index = row * self.tiles_across + col
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        data = None
        if count:
            with self.filehandle.lock:
                self.filehandle.seek(offset)
                data = self.filehandle.read(count)
        segment, _, _ = self.page.decode(data, index, jpegtables=self.page.jpegtables)
        if segment is None:  # a tile the file leaves out: zeros, as tifffile's zarr store gives
            tile = np.zeros((self.tile_h, self.tile_w, 3), dtype=np.uint8)
        else:
            tile = np.asarray(segment).reshape(self.tile_h, self.tile_w, -1)[..., :3]
        with self._cache_lock:
            self._tiles[key] = tile
            while len(self._tiles) > self.max_tiles:
                self._tiles.popitem(last=False)
        return tile


class _RGBView:
    """Slice a zarr level and drop an alpha channel if the TIFF has one."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        return np.asarray(self.array[y : y + height, x : x + width])[..., :3]


def _check_tiff_not_truncated(tif: Any, path: Path) -> None:
    """Every tile/strip of every page must lie inside the file: catches truncated copies cheaply."""
    size = path.stat().st_size
    for page in tif.pages:
        offsets = getattr(page, "dataoffsets", ())
        counts = getattr(page, "databytecounts", ())
        if offsets and counts and max(o + c for o, c in zip(offsets, counts, strict=False)) > size:
            raise SlideError(
                f"{describe_path(path)} is truncated: its image data ends beyond the file's {size} bytes. "
                "Re-copy or re-download the slide."
            )


def _tiff_mpp(tif: Any) -> float | None:
    """µm/px from an Aperio description (``MPP = 0.499``) or the TIFF resolution tags."""
    page = tif.pages[0]
    description = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        numerator, denominator = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if numerator and denominator:
            pixels_per_unit = numerator / denominator
            if unit == 3:  # centimetre
                return 1e4 / pixels_per_unit
            if unit == 2 and pixels_per_unit > 1000:  # inch; small values are screen DPI, not a scan
                return 25400.0 / pixels_per_unit
    return None


def _open_with_openslide(path: Path) -> Slide:
    import dask.array as da
    import openslide

    try:
        handle = openslide.OpenSlide(str(path))
    except Exception as exc:
        raise SlideError(
            f"OpenSlide cannot open {describe_path(path)} ({exc}); the file may be truncated, corrupt, "
            "or not a supported slide format."
        ) from exc
    props = dict(handle.properties)
    mpp = None
    if props.get("openslide.mpp-x"):
        mpp = float(props["openslide.mpp-x"])
    levels = []
    for level, (width, height) in enumerate(handle.level_dimensions):
        tile_w = int(props.get(f"openslide.level[{level}].tile-width", _OPENSLIDE_FALLBACK_TILE))
        tile_h = int(props.get(f"openslide.level[{level}].tile-height", _OPENSLIDE_FALLBACK_TILE))
        levels.append(_openslide_level_array(da, handle, level, width, height, tile_w, tile_h))
    return Slide(
        path=path,
        levels=levels,
        downsamples=[float(d) for d in handle.level_downsamples],
        mpp=mpp,
        backend="openslide",
        properties=props,
        _reader=handle,
    )


def _openslide_level_array(da: Any, handle: Any, level: int, width: int, height: int, tile_w: int, tile_h: int) -> Any:
    """A dask array over one OpenSlide level whose chunks are ``read_region`` tiles."""
    downsample = handle.level_downsamples[level]
    chunks = (_chunk_sizes(height, tile_h), _chunk_sizes(width, tile_w), (3,))

    def read_block(block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
        rgba = np.asarray(
            handle.read_region((int(round(x0 * downsample)), int(round(y0 * downsample))), level, (x1 - x0, y1 - y0))
        )
        return _composite_on_white(rgba)

    return da.map_blocks(read_block, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))


def _chunk_sizes(total: int, tile: int) -> tuple[int, ...]:
    full, rest = divmod(total, tile)
    return (tile,) * full + ((rest,) if rest else ())


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA (transparent where nothing was scanned) → RGB on white glass."""
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.clip(rgb * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)


def _check_decodable(slide: Slide) -> None:
    """Decode one small box of the smallest level so a corrupt file fails at open, not later."""
    level = slide.level_count - 1
    height, width = slide.levels[level].shape[:2]
    slide.read_region(0, 0, min(width, 64), min(height, 64), level=level)


def resize_rgb(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 image (``size`` = edge or ``(width, height)``) with antialiasing."""
    from PIL import Image

    if isinstance(size, int):
        size = (size, size)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))
