"""npe2 reader: slides, HEST/Visium ``.h5ad`` spots, napari-stem predictions (``.h5ad`` and
SpatialData ``.zarr``), HEST sample folders and spaceranger ``outs/`` folders.

``get_reader`` only sniffs (extension, folder layout) and returns ``None`` for anything else; it
never raises, so napari can try other readers. The returned function does the real work. A
napari-stem prediction ``.h5ad`` (written by the plugin or ``stem-train predict``) re-opens as its
"mean" and "variance" layers; any other ``.h5ad`` opens as spots.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

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
            if candidate.suffix.lower() == ".zarr":  # napari-stem's SpatialData predictions; others: napari-spatialdata
                from napari_stem.validate import is_spatialdata_prediction

                if is_spatialdata_prediction(candidate):
                    return read_prediction_spatialdata
                return None
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
    from napari_stem.plugin.layers import slide_layer_data
    from napari_stem.slide import open_slide

    slide = open_slide(_single(path))
    if slide.mpp is None:
        warnings.warn(unknown_pixel_size_notice(slide), stacklevel=2)  # napari shows it as a notification
    return [slide_layer_data(slide)]


def unknown_pixel_size_notice(slide) -> str:
    """What the user sees when a slide opens in pixels, not µm."""
    problem = slide.mpp_problem or "records no pixel size"
    return (
        f"{slide.path.name} {problem}: it is shown in pixels, not µm. Enter its µm/px in the napari-stem widget "
        "before predicting (e.g. 0.25 for a 40× scan, 0.5 for 20×)."
    )


def read_h5ad(path: str | list[str]) -> list:
    from napari_stem.plugin.layers import spots_layer_data
    from napari_stem.spots import read_spots_h5ad

    path = Path(_single(path))
    if _is_prediction_file(path):
        return read_prediction_h5ad(path)
    spots = read_spots_h5ad(path)
    return [spots_layer_data(spots, name=f"{path.stem} spots")]


def read_prediction_h5ad(path: str | list[str]) -> list:
    """A napari-stem prediction: its slide (the recorded file when it still exists, else the
    thumbnail stored in the file, in the same µm frame), then "<name> <gene> sd" (hidden) and
    "<name> <gene> mean" on top, with labelled colorbars."""
    from napari_stem.anndata_io import read_prediction
    from napari_stem.plugin.layers import prediction_layer_data

    path = Path(_single(path))
    prediction, spots = read_prediction(path)
    slide_path = prediction.metadata.get("slide")
    layers = [_prediction_slide_layer(path, slide_path, spots)]
    layers += [
        prediction_layer_data(
            prediction, spots, kind, prefix=f"{path.stem} ", slide_path=slide_path, visible=kind == "mean"
        )
        for kind in ("sd", "mean")
    ]
    from napari_stem.plugin.result_layers import label_colorbars_when_added

    label_colorbars_when_added()
    return [layer for layer in layers if layer is not None]


def _prediction_slide_layer(path: Path, slide_path: str | None, spots) -> tuple | None:
    """The slide under a re-opened prediction: its file, else the file's own thumbnail, else None."""
    from napari_stem.plugin.layers import slide_layer_data
    from napari_stem.slide import open_slide

    if slide_path and Path(slide_path).is_file():
        try:
            return slide_layer_data(open_slide(slide_path, mpp=spots.mpp))
        except Exception:  # an unreadable slide only loses the background
            pass
    import anndata

    try:
        adata = anndata.read_h5ad(path, backed="r")
        library = next(iter(adata.uns["spatial"].values()))
        image = np.asarray(library["images"]["downscaled_fullres"])
        scale = float(library["scalefactors"]["tissue_downscaled_fullres_scalef"])
    except Exception:  # no thumbnail recorded
        return None
    return _image_layer_in_spot_frame(image, scale, spots, f"{path.stem} thumbnail")


def _image_layer_in_spot_frame(image: np.ndarray, image_per_fullres: float, spots, name: str) -> tuple:
    """An RGB image whose pixel (i, j) is full-resolution pixel (i, j) / ``image_per_fullres``,
    placed in the spots' frame (µm when their µm/px is known, else full-resolution pixels)."""
    fullres_per_pixel = 1.0 / image_per_fullres
    unit = spots.mpp or 1.0
    image = image[..., :3] if image.ndim == 3 else image
    if image.dtype != np.uint8:  # spaceranger PNGs read as float 0..1 by some readers
        image = np.clip(np.asarray(image, dtype=np.float64) * (255 if image.max() <= 1.0 else 1), 0, 255).astype(
            np.uint8
        )
    kwargs = {
        "name": name,
        "rgb": image.ndim == 3,
        "scale": (fullres_per_pixel * unit, fullres_per_pixel * unit),
        "contrast_limits": (0, 255),
        "metadata": {"napari_stem": "slide_image", "mpp": spots.mpp},
    }
    if spots.mpp:
        kwargs["units"] = ("um", "um")
    return image, kwargs, "image"


def read_spaceranger(path: str | list[str]) -> list:
    """Spots of a spaceranger ``outs/`` folder (or its parent), in µm estimated from the lattice.

    spaceranger records no µm/px; Visium spots sit on a hexagonal lattice of 100 µm pitch indexed by
    ``array_row``/``array_col``, so fitting the lattice to the pixel centres gives it (like HEST's
    ``pixel_size_um_estimated``), putting the spots in the same µm frame as the full-resolution
    slide they were aligned to.
    """
    from napari_stem.plugin.layers import spots_layer_data
    from napari_stem.spots import read_spots_spaceranger

    folder = Path(_single(path))
    outs = _spaceranger_outs(folder) or folder
    spots = read_spots_spaceranger(outs)
    name = outs.parent.name if outs.name == "outs" else outs.name
    layer = spots_layer_data(spots, name=f"{name} spots")
    if spots.mpp:
        layer[1]["metadata"]["mpp_source"] = "estimated from the 100 µm Visium spot lattice"
    image = _spaceranger_image(outs, spots, name)
    return [layer] if image is None else [image, layer]


def _spaceranger_image(outs: Path, spots, name: str) -> tuple | None:
    """The best H&E spaceranger kept (hires, else lowres), scaled by its scale factor onto the spots."""
    import json

    from PIL import Image

    spatial = outs / "spatial"
    try:
        factors = json.loads((spatial / "scalefactors_json.json").read_text())
    except (OSError, ValueError):
        return None
    for kind in ("hires", "lowres"):
        png = spatial / f"tissue_{kind}_image.png"
        factor = factors.get(f"tissue_{kind}_scalef")
        if png.is_file() and factor:
            with Image.open(png) as opened:
                image = np.asarray(opened.convert("RGB"))
            if np.ptp(image) == 0:  # a blank placeholder (stripped test data): try the next one
                continue
            return _image_layer_in_spot_frame(image, float(factor), spots, f"{name} H&E ({kind})")
    return None


def _is_prediction_file(path: Path) -> bool:
    from napari_stem.validate import is_napari_stem_h5ad

    return is_napari_stem_h5ad(path, "layers/variance")


def _spaceranger_outs(folder: Path) -> Path | None:
    """The ``outs/`` folder of a spaceranger run given as itself or as its parent, else None."""
    for candidate in (folder, folder / "outs"):
        spatial = candidate / "spatial"
        if (spatial / "scalefactors_json.json").is_file() and (candidate / "filtered_feature_bc_matrix.h5").is_file():
            return candidate
    return None


def read_hest_folder(path: str | list[str]) -> list:
    """The first sample of a HEST folder: slide and spots together, in the same µm frame."""
    from napari_stem.hest import hest_sample, hest_sample_ids
    from napari_stem.plugin.layers import slide_layer_data, spots_layer_data

    root = Path(_single(path))
    sample = hest_sample(root, hest_sample_ids(root)[0])
    slide = sample.open_slide()
    spots = sample.read_spots()
    return [slide_layer_data(slide, name=sample.sample_id), spots_layer_data(spots, name=f"{sample.sample_id} spots")]


def _single(path: str | list[str]) -> str:
    return path[0] if isinstance(path, list) else path


def read_prediction_spatialdata(path: str | list[str]) -> list:
    from napari_stem.plugin.layers import prediction_layer_data
    from napari_stem.plugin.result_layers import label_colorbars_when_added
    from napari_stem.spatialdata_io import read_prediction_zarr

    path = Path(_single(path))
    prediction, spots, sdata = read_prediction_zarr(path)
    name = path.name[: -len(".zarr")] if path.name.endswith(".zarr") else path.name
    layers = [_image_layer(sdata, spots, f"{name} H&E")]
    slide_path = prediction.metadata.get("slide")
    layers += [
        prediction_layer_data(prediction, spots, kind, prefix=f"{name} ", slide_path=slide_path, visible=kind == "mean")
        for kind in ("sd", "mean")
    ]
    label_colorbars_when_added()
    return [layer for layer in layers if layer is not None]


def _image_layer(sdata, spots, name: str) -> tuple | None:
    """The zarr's H&E as a multiscale RGB layer scaled onto the spots (µm when known, else full-res px)."""
    from spatialdata.transformations import get_transformation

    if not sdata.images:
        return None
    element = next(iter(sdata.images.values()))
    arrays = [element[key]["image"] for key in element] if hasattr(element, "keys") else [element]
    system = next(iter(get_transformation(arrays[0], get_all=True)))
    affine = np.asarray(
        get_transformation(arrays[0], to_coordinate_system=system).to_affine_matrix(
            input_axes=("y", "x"), output_axes=("y", "x")
        )
    )
    unit = spots.mpp or 1.0
    data = [array.data.transpose(1, 2, 0) for array in arrays]  # (c, y, x) -> (y, x, c), lazy
    kwargs = {
        "name": name,
        "rgb": True,
        "multiscale": len(data) > 1,
        "contrast_limits": (0, 255),
        "scale": (affine[0, 0] * unit, affine[1, 1] * unit),
        "translate": (affine[0, 2] * unit, affine[1, 2] * unit),
        "metadata": {"napari_stem": "slide_image", "mpp": spots.mpp},
    }
    if spots.mpp:
        kwargs["units"] = ("um", "um")
    return (data if len(data) > 1 else data[0]), kwargs, "image"
