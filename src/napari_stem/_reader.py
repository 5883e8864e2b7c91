"""npe2 reader: slides, HEST/Visium ``.h5ad`` spots, napari-stem predictions, HEST sample folders
and spaceranger ``outs/`` folders.

``get_reader`` only sniffs (extension, folder layout) and returns ``None`` for anything else; it
never raises, so napari can try other readers. The returned function does the real work. A
napari-stem prediction ``.h5ad`` (written by the plugin or ``stem-train predict``) re-opens as its
"mean" and "variance" layers; any other ``.h5ad`` opens as spots.
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

            if is_hest_folder(candidate):
                return read_hest_folder
            return read_spaceranger if _spaceranger_outs(candidate) is not None else None
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
    if _is_prediction_file(path):
        return read_prediction_h5ad(path)
    spots = read_spots_h5ad(path)
    return [spots_layer_data(spots, name=f"{path.stem} spots")]


def read_prediction_h5ad(path: str | list[str]) -> list:
    """A napari-stem prediction as "<name> mean" and "<name> variance" layers in the µm frame."""
    from napari_stem.anndata_io import read_prediction
    from napari_stem.layers import prediction_layer_data

    path = Path(_single(path))
    prediction, spots = read_prediction(path)
    slide_path = prediction.metadata.get("slide")
    return [
        prediction_layer_data(prediction, spots, kind, name=f"{path.stem} {kind}", slide_path=slide_path)
        for kind in ("mean", "variance")
    ]


def read_spaceranger(path: str | list[str]) -> list:
    """Spots of a spaceranger ``outs/`` folder (or its parent), in µm estimated from the lattice.

    spaceranger records no µm/px; Visium spots sit on a hexagonal lattice of 100 µm pitch indexed by
    ``array_row``/``array_col``, so fitting the lattice to the pixel centres gives it (like HEST's
    ``pixel_size_um_estimated``), putting the spots in the same µm frame as the full-resolution
    slide they were aligned to.
    """
    from napari_stem.layers import spots_layer_data
    from napari_stem.spots import read_spots_spaceranger

    folder = Path(_single(path))
    outs = _spaceranger_outs(folder) or folder
    spots = read_spots_spaceranger(outs)
    name = outs.parent.name if outs.name == "outs" else outs.name
    layer = spots_layer_data(spots, name=f"{name} spots")
    if spots.mpp:
        layer[1]["metadata"]["mpp_source"] = "estimated from the 100 µm Visium spot lattice"
    return [layer]


def _is_prediction_file(path: Path) -> bool:
    """Cheap check (HDF5 keys only) for ``uns/napari_stem`` and ``layers/variance``."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return "uns/napari_stem" in handle and "layers/variance" in handle
    except OSError:
        return False


def _spaceranger_outs(folder: Path) -> Path | None:
    """The ``outs/`` folder of a spaceranger run given as itself or as its parent, else None."""
    for candidate in (folder, folder / "outs"):
        spatial = candidate / "spatial"
        if (spatial / "scalefactors_json.json").is_file() and (candidate / "filtered_feature_bc_matrix.h5").is_file():
            return candidate
    return None


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
