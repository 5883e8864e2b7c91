"""npe2 reader: slides, HEST/Visium ``.h5ad`` spots and HEST sample folders.

``get_reader`` only sniffs (extension, folder layout) and returns ``None`` for anything else; it
never raises, so napari can try other readers. The returned function does the real work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from napari_stem.slide import SLIDE_EXTENSIONS

ReaderFunction = Callable[[str | list[str]], list]


def get_reader(path: str | list[str]) -> ReaderFunction | None:
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    candidate = Path(path)
    try:
        if candidate.is_dir():
            from napari_stem.hest import is_hest_folder

            return read_hest_folder if is_hest_folder(candidate) else None
        suffix = candidate.suffix.lower()
        if suffix in SLIDE_EXTENSIONS:
            return read_slide
        if suffix == ".h5ad":
            return read_h5ad
    except OSError:
        return None
    return None


def read_slide(path: str | list[str]) -> list:
    from napari_stem.layers import slide_layer_data
    from napari_stem.slide import open_slide

    slide = open_slide(_single(path))
    return [slide_layer_data(slide)]


def read_h5ad(path: str | list[str]) -> list:
    from napari_stem.layers import spots_layer_data
    from napari_stem.spots import read_spots_h5ad

    path = Path(_single(path))
    spots = read_spots_h5ad(path)
    return [spots_layer_data(spots, name=f"{path.stem} spots")]


def read_hest_folder(path: str | list[str]) -> list:
    """The first sample of a HEST folder: slide and spots together, in the same µm frame."""
    from napari_stem.hest import hest_sample_ids, hest_sample
    from napari_stem.layers import slide_layer_data, spots_layer_data

    root = Path(_single(path))
    sample = hest_sample(root, hest_sample_ids(root)[0])
    slide = sample.open_slide()
    spots = sample.read_spots()
    return [slide_layer_data(slide, name=sample.sample_id), spots_layer_data(spots, name=f"{sample.sample_id} spots")]


def _single(path: str | list[str]) -> str:
    return path[0] if isinstance(path, list) else path
