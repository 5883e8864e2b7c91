"""Generic (pyramidal) TIFFs through tifffile, such as HEST-1k's ``wsis/<id>.tif``.

Each pyramid level is a zarr array over the file's own tiles (what napari displays), so only the
tiles a view touches are decoded. Patch reads of tiled levels decode tiles with tifffile directly
and keep the most recent ones (:class:`_TiffTiles`): neighbouring spots share most of their tiles.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import SlideError, describe_path

#: Upper bound of the decoded tiles one tiled TIFF level keeps for patch reads.
TILE_CACHE_MAX_BYTES = 64 << 20


class TiffBackend:
    """An open TIFF: its :class:`tifffile.TiffFile`, the zarr store over it, lazy levels and box readers.

    The backend owns the file handle: :meth:`close` closes the store and the file (napari's dask
    levels and the patch readers share that one handle).
    """

    name = "tifffile"

    def __init__(self, path: Path) -> None:
        import dask.array as da
        import tifffile
        import zarr

        self.path = path
        self.closed = False
        self.store: Any = None
        try:
            self.tiff = tifffile.TiffFile(path)
        except Exception as exc:
            raise _not_a_tiff(path, exc) from exc
        try:
            try:
                series = self.tiff.series[0]
                _check_tiff_not_truncated(self.tiff, path)
            except SlideError:
                raise
            except Exception as exc:
                raise _not_a_tiff(path, exc) from exc
            if series.ndim != 3 or series.shape[-1] not in (3, 4) or series.dtype != np.uint8:
                raise SlideError(
                    f"{describe_path(path)} holds a {series.shape} {series.dtype} image, not an RGB(A) uint8 "
                    "slide; export it as an 8-bit RGB pyramidal TIFF."
                )
            self.store = series.aszarr()
            group = zarr.open(self.store, mode="r")
            arrays = (
                [group[str(index)] for index in range(len(series.levels))] if isinstance(group, zarr.Group) else [group]
            )
            #: One ``(height, width, 3)`` dask array per level, largest first, chunked by the file's tiles.
            self.levels: list[Any] = [da.from_zarr(array)[..., :3] for array in arrays]
            #: What :meth:`read_box` reads each level with: its tiles directly, or its zarr array.
            self.level_readers: list[_TiffTiles | _RGBView] = [
                _TiffTiles.for_level(level, self.tiff.filehandle) or _RGBView(array)
                for level, array in zip(series.levels, arrays, strict=True)
            ]
            base_w = self.levels[0].shape[1]
            self.downsamples = [base_w / level.shape[1] for level in self.levels]
            self.mpp = _tiff_mpp(self.tiff)
            self.properties = {"tifffile.series": series.name or "", "tifffile.levels": str(len(self.levels))}
        except BaseException:
            self.close()
            raise

    def read_box(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The ``(height, width, 3)`` box at ``(x, y)`` of ``level``; the box lies inside the level."""
        return np.asarray(self.level_readers[level].read(x, y, width, height))

    def close(self) -> None:
        """Close the zarr store and the TIFF file; closing again does nothing."""
        if self.closed:
            return
        self.closed = True
        if self.store is not None:
            self.store.close()
        for reader in getattr(self, "level_readers", ()):
            reader.forget()
        self.tiff.close()


def _not_a_tiff(path: Path, exc: Exception) -> SlideError:
    return SlideError(
        f"{describe_path(path)} is not a readable TIFF ({exc}); it may be truncated, corrupt, or not a slide at all."
    )


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

    def forget(self) -> None:
        """Drop the kept tiles (the file is closing)."""
        with self._cache_lock:
            self._tiles.clear()

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

    def forget(self) -> None:
        """Nothing is kept here."""


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
