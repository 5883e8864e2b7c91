"""napari reader for SpatialData predictions (``.zarr`` written by ``write_prediction(..., format="zarr")``).

Opens like a prediction ``.h5ad``: the H&E stored in the zarr (multiscale, in the spots' µm frame),
then "<name> <gene> sd" (hidden) and "<name> <gene> mean". Other SpatialData folders are left to
napari-spatialdata (the sniffer in :mod:`napari_stem.plugin.reader` only claims napari-stem's own).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_prediction_spatialdata(path: str | list[str]) -> list:
    from napari_stem.plugin.layers import prediction_layer_data
    from napari_stem.plugin.reader import _single
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
