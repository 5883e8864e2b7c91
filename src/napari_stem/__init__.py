"""napari-stem: spatial gene expression with uncertainty from H&E slides (Stem diffusion model).

Importing this package is cheap: it imports neither torch nor Qt nor napari, so napari starts fast
and the CLI can show ``--help`` instantly. Import the submodules you need, e.g.
``from napari_stem.slide import open_slide``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-stem")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

from napari_stem.errors import (
    CheckpointError,
    DatasetError,
    EncoderError,
    SlideError,
    SpotsError,
    StemError,
)

__all__ = [
    "__version__",
    "StemError",
    "SlideError",
    "SpotsError",
    "DatasetError",
    "CheckpointError",
    "EncoderError",
]
