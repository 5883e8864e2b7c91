"""A whole-slide image as a lazy multiscale pyramid in physical units, over one backend.

:class:`Slide` is what the rest of the package reads: geometry, µm/px, boxes, µm-sized patches,
Stem's native crops and thumbnails. The pixels come from a backend object that owns the open
file (:class:`~napari_stem.slide.tifffile_backend.TiffBackend` for generic TIFFs,
:class:`~napari_stem.slide.openslide_backend.OpenSlideBackend` for vendor formats);
:func:`open_slide` picks it in one place (:func:`_choose_backend`).

Coordinates are level-0 pixels ``(x, y)`` like ``obsm['spatial']``; physical sizes are in µm.
Nothing is decoded whole: :meth:`Slide.read_region` decodes the tiles under the box only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from napari_stem.errors import SlideError, describe_path
from napari_stem.slide.openslide_backend import OpenSlideBackend
from napari_stem.slide.tifffile_backend import TiffBackend
from napari_stem.validate import MPP_RANGE_UM, check_mpp, mpp_in_range

#: Extensions napari-stem offers to open as slides (OpenSlide's formats and generic TIFF).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")

#: Stem's native crop is never smaller than this many full-resolution pixels (reference §2.2).
STEM_NATIVE_MIN_CROP_PX = 224


class SlideBackend(Protocol):
    """What a backend gives a :class:`Slide`: an open file's lazy levels, its metadata and box reads."""

    #: ``"tifffile"`` or ``"openslide"``.
    name: str
    #: One ``(height, width, 3)`` uint8 dask array per level, largest first.
    levels: list[Any]
    downsamples: list[float]
    #: µm per level-0 pixel as the file records it, None when it does not.
    mpp: float | None
    properties: dict[str, str]
    closed: bool

    def read_box(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray: ...

    def close(self) -> None: ...


#: The backends by the name ``open_slide(backend=...)`` takes.
BACKENDS: dict[str, type[TiffBackend] | type[OpenSlideBackend]] = {
    TiffBackend.name: TiffBackend,
    OpenSlideBackend.name: OpenSlideBackend,
}


@dataclass(eq=False)
class Slide:
    """A whole-slide image as a lazy pyramid, read through its backend.

    ``levels`` holds one ``(height, width, 3)`` uint8 array per level, largest first (dask arrays,
    chunked by the file's tiles). ``mpp`` is µm per level-0 pixel, ``None`` when the file does not
    say and the caller gave none. :meth:`close` (or leaving a ``with`` block) closes the file.
    """

    path: Path
    reader: SlideBackend = field(repr=False)
    mpp: float | None
    #: Why the file's own pixel size was not used ("" when it was, or when there is none).
    mpp_problem: str = ""

    def __repr__(self) -> str:
        return f"Slide(path={str(self.path)!r}, backend={self.backend!r}, shape={self.shape}, mpp={self.mpp})"

    @property
    def backend(self) -> str:
        """The backend's name: ``"tifffile"`` or ``"openslide"``."""
        return self.reader.name

    @property
    def levels(self) -> list[Any]:
        return self.reader.levels

    @property
    def downsamples(self) -> list[float]:
        return self.reader.downsamples

    @property
    def properties(self) -> dict[str, str]:
        return self.reader.properties

    @property
    def closed(self) -> bool:
        return self.reader.closed

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
        if self.reader.closed:
            raise SlideError(
                f"cannot read {describe_path(self.path)}: the slide was closed (close() or the end of its "
                "'with' block); open it again with open_slide()."
            )
        level_h, level_w = self.levels[level].shape[:2]
        out = np.full((height, width, 3), fill, dtype=np.uint8)
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + width, level_w), min(y0 + height, level_h)
        if xb <= xa or yb <= ya:
            return out
        try:
            block = self.reader.read_box(level, xa, ya, xb - xa, yb - ya)
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
        """Close the file (its handle, and napari's lazy levels with it); closing again does nothing."""
        self.reader.close()

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
    if backend not in BACKENDS:
        raise ValueError(f"unknown slide backend {backend!r}; use 'tifffile' or 'openslide'")
    reader = BACKENDS[backend](path)
    slide = Slide(path=path, reader=reader, mpp=reader.mpp)
    try:
        if mpp is not None:
            slide.mpp = check_mpp(mpp, f"the pixel size given for {describe_path(path)}")
        elif slide.mpp is not None and not mpp_in_range(slide.mpp):
            # e.g. a resolution tag of 1 px/cm (10000 µm/px): spot grids and patches would need terabytes.
            slide.mpp_problem = (
                f"records a pixel size of {slide.mpp:g} µm/px, outside the {MPP_RANGE_UM[0]:g}–"
                f"{MPP_RANGE_UM[1]:g} µm/px of real scans, so it was not used"
            )
            slide.mpp = None
        _check_decodable(slide)
    except BaseException:
        slide.close()
        raise
    return slide


def _choose_backend(path: Path) -> str:
    """The backend for ``path``: tifffile for generic TIFFs, OpenSlide for what it recognises."""
    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # pragma: no cover - detect_format is defensive already
        vendor = None
    if vendor in (None, "generic-tiff") and path.suffix.lower() in (".tif", ".tiff", ".btf"):
        return TiffBackend.name
    if vendor is None:
        if path.suffix.lower() in (".tif", ".tiff"):
            return TiffBackend.name
        raise SlideError(
            f"{describe_path(path)} is not a slide OpenSlide or tifffile can read (supported: "
            f"{', '.join(SLIDE_EXTENSIONS)}; a plain PNG/JPEG is not a whole-slide image)."
        )
    return OpenSlideBackend.name


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
