"""Whole-slide images, opened lazily as multiscale pyramids in physical units.

``open_slide(path)`` gives a :class:`Slide` (``base``) that reads through a backend owning the
open file: ``tifffile_backend`` for generic (pyramidal) TIFFs such as HEST-1k's, and
``openslide_backend`` for vendor formats (SVS, NDPI, MRXS, ...). Close it, or use it in a ``with``
block, to close the file.
"""

from napari_stem.slide.base import (
    BACKENDS,
    SLIDE_EXTENSIONS,
    STEM_NATIVE_MIN_CROP_PX,
    Slide,
    SlideBackend,
    open_slide,
    resize_rgb,
)
from napari_stem.slide.openslide_backend import OpenSlideBackend
from napari_stem.slide.tifffile_backend import TILE_CACHE_MAX_BYTES, TiffBackend

__all__ = [
    "BACKENDS",
    "SLIDE_EXTENSIONS",
    "STEM_NATIVE_MIN_CROP_PX",
    "TILE_CACHE_MAX_BYTES",
    "OpenSlideBackend",
    "Slide",
    "SlideBackend",
    "TiffBackend",
    "open_slide",
    "resize_rgb",
]
