"""Vendor slide formats (SVS, NDPI, MRXS, SCN, BIF, VMS, ...) through OpenSlide.

Each level is a dask array whose chunks are ``read_region`` calls of the slide's native tile size;
OpenSlide's RGBA (transparent where nothing was scanned) is composited on white glass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.errors import SlideError, describe_path

#: Chunk edge of a level whose tile size the file does not record.
_OPENSLIDE_FALLBACK_TILE = 512


class OpenSlideBackend:
    """An open :class:`openslide.OpenSlide`, its lazy levels and box reads; :meth:`close` closes it."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        import dask.array as da
        import openslide

        self.path = path
        self.closed = False
        try:
            self.handle = openslide.OpenSlide(str(path))
        except Exception as exc:
            raise SlideError(
                f"OpenSlide cannot open {describe_path(path)} ({exc}); the file may be truncated, corrupt, "
                "or not a supported slide format."
            ) from exc
        try:
            props = dict(self.handle.properties)
            self.properties: dict[str, str] = props
            self.mpp = float(props["openslide.mpp-x"]) if props.get("openslide.mpp-x") else None
            #: One ``(height, width, 3)`` dask array per level, largest first, chunked by the file's tiles.
            self.levels: list[Any] = []
            for level, (width, height) in enumerate(self.handle.level_dimensions):
                tile_w = int(props.get(f"openslide.level[{level}].tile-width", _OPENSLIDE_FALLBACK_TILE))
                tile_h = int(props.get(f"openslide.level[{level}].tile-height", _OPENSLIDE_FALLBACK_TILE))
                self.levels.append(_level_array(da, self.handle, level, width, height, tile_w, tile_h))
            self.downsamples = [float(d) for d in self.handle.level_downsamples]
        except BaseException:
            self.close()
            raise

    def read_box(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The ``(height, width, 3)`` box at ``(x, y)`` of ``level`` (that level's pixels)."""
        downsample = self.downsamples[level]
        location = (int(round(x * downsample)), int(round(y * downsample)))
        return _composite_on_white(np.asarray(self.handle.read_region(location, level, (width, height))))

    def close(self) -> None:
        """Close the OpenSlide handle; closing again does nothing."""
        if self.closed:
            return
        self.closed = True
        self.handle.close()


def _level_array(da: Any, handle: Any, level: int, width: int, height: int, tile_w: int, tile_h: int) -> Any:
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
