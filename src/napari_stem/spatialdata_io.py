"""Predictions ⇄ SpatialData (scverse's spatial omics format), and spots from SpatialData objects.

A prediction written as SpatialData (``write_prediction(..., format="zarr")``, ``stem-train predict
--format spatialdata``) is a ``.zarr`` folder that ``spatialdata.read_zarr`` and napari-spatialdata
open as is, laid out as ``spatialdata-io`` lays out a Visium sample:

* one coordinate system named after the slide (``<slide stem>``), in **full-resolution slide pixels**;
* ``images['<name>_hne']``: the H&E as a multiscale image (levels 1×, 2×, 4× ...), a **downscaled
  copy** of the slide (longest edge ≤ ``image_max_size``, 4096 px by default: ~2 µm/px for a typical
  HEST Visium image of 17,000 px at 0.46 µm/px, where a 55 µm spot covers ~28 px), placed by a
  ``Scale`` transform. A copy, not a reference: SpatialData stores elements in the zarr and has no
  element that points at an external slide, and a full-resolution copy would be several GB per
  slide. The original slide's path is recorded in the table's provenance;
* ``shapes['<name>_spots']``: one circle per spot (centre in full-res pixels, ``radius`` =
  spot diameter / 2), identity transform;
* ``tables['table']``: the mean in ``X``, ``layers['variance']`` and the interval layers
  (``lo50``/``hi50``, ``lo90``/``hi90`` ...), annotating the shapes (``region`` = the shapes'
  name, ``region_key='region'``, ``instance_key='spot_id'``), barcodes as ``obs_names``, provenance
  in ``uns['napari_stem']`` as in the ``.h5ad``.

:func:`spots_from_spatialdata` takes spots from any SpatialData object with circle shapes (e.g. a
Visium sample read by ``spatialdata_io.visium``), in the coordinate system of your choice.

``spatialdata`` is an optional dependency (``pip install "napari-stem[spatialdata]"``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from napari_stem.anndata_io import prediction_from_anndata, prediction_to_anndata
from napari_stem.errors import SpotsError, StemError, describe_path
from napari_stem.validate import (
    SPATIALDATA_TABLE,
    ZARR_SUFFIX,
    check_replaceable_zarr,
    is_spatialdata_prediction,
)

TABLE_NAME = SPATIALDATA_TABLE
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
DEFAULT_IMAGE_MAX_SIZE = 4096


def _spatialdata():
    try:
        import spatialdata
    except ImportError as exc:
        raise StemError(
            'SpatialData output needs the spatialdata package: pip install "napari-stem[spatialdata]".'
        ) from exc
    return spatialdata


def element_names(name: str) -> dict[str, str]:
    """Names of the coordinate system and elements for a prediction called ``name``."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "slide"
    return {"coordinate_system": safe, "image": f"{safe}_hne", "shapes": f"{safe}_spots", "table": TABLE_NAME}


def prediction_to_spatialdata(
    prediction: Any,
    spots: Any,
    slide: Any = None,
    *,
    name: str | None = None,
    image_max_size: int = DEFAULT_IMAGE_MAX_SIZE,
) -> Any:
    """A ``SpatialData`` of a prediction for ``spots`` (see the module docstring)."""
    import geopandas
    import pandas as pd
    from shapely.geometry import Point

    sd = _spatialdata()
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if name is None:
        name = Path(str(getattr(slide, "path", "") or prediction.metadata.get("slide") or "prediction")).stem
    names = element_names(name)
    system = names["coordinate_system"]

    table = prediction_to_anndata(prediction, spots, slide=None)
    table.uns.pop("spatial", None)  # the image lives in the SpatialData object, not in uns
    provenance = json.loads(table.uns["napari_stem"]["provenance_json"])
    if slide is not None:
        provenance["slide"] = str(slide.path)
    provenance["spatialdata"] = {"coordinate_system": system, "units": "full-resolution slide pixels", **names}
    table.uns["napari_stem"]["provenance_json"] = json.dumps(provenance)
    table.uns["napari_stem"]["format"] = "spatialdata"
    table.obs[INSTANCE_KEY] = np.arange(len(spots), dtype=np.int64)
    table.obs[REGION_KEY] = pd.Categorical([names["shapes"]] * len(spots))
    table = TableModel.parse(table, region=names["shapes"], region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    centers = np.asarray(spots.centers_px, dtype=np.float64)
    circles = geopandas.GeoDataFrame(
        {"radius": np.full(len(spots), float(spots.diameter_px) / 2.0)},
        geometry=[Point(x, y) for x, y in centers],
        index=pd.Index(np.arange(len(spots), dtype=np.int64), name=INSTANCE_KEY),
    )
    shapes = ShapesModel.parse(circles, transformations={system: Identity()})

    images = {}
    if slide is not None:
        thumbnail, _ = slide.thumbnail(image_max_size)
        height, width = slide.shape
        rgb = np.moveaxis(np.asarray(thumbnail)[..., :3], -1, 0)  # (c, y, x)
        # per-axis factors: the thumbnail's edges are rounded to whole pixels
        to_fullres = Scale([height / rgb.shape[1], width / rgb.shape[2]], axes=("y", "x"))
        levels = []
        size = max(rgb.shape[1:])
        while size >= 2 * 256 and len(levels) < 4:
            levels.append(2)
            size //= 2
        images[names["image"]] = Image2DModel.parse(
            rgb,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={system: to_fullres},
            scale_factors=levels or None,
            chunks=(3, 1024, 1024),
        )
    return sd.SpatialData(images=images, shapes={names["shapes"]: shapes}, tables={names["table"]: table})


def write_prediction_zarr(
    path: str | Path, prediction: Any, spots: Any, slide: Any = None, *, image_max_size: int = DEFAULT_IMAGE_MAX_SIZE
) -> Path:
    """Write a prediction as a SpatialData ``.zarr`` folder, atomically (a finished folder or none).

    An existing folder is replaced only when it is a SpatialData prediction napari-stem wrote.
    """
    path = Path(path)
    if path.exists():
        check_replaceable_zarr(path)
    name = path.name[: -len(ZARR_SUFFIX)] if path.name.endswith(ZARR_SUFFIX) else path.name
    sdata = prediction_to_spatialdata(prediction, spots, slide, name=name, image_max_size=image_max_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        target = staging / path.name
        sdata.write(target)
        if path.exists():
            retired = staging / "old"
            path.rename(retired)
        target.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_prediction_zarr(path: str | Path) -> tuple[Any, Any, Any]:
    """A SpatialData prediction back as ``(Prediction, Spots, SpatialData)``."""
    sd = _spatialdata()
    path = Path(path)
    if not is_spatialdata_prediction(path):
        raise StemError(f"{describe_path(path)} is not a SpatialData prediction written by napari-stem.")
    sdata = sd.read_zarr(path)
    table = sdata.tables[TABLE_NAME]
    spots = spots_from_spatialdata(sdata, table_name=TABLE_NAME)
    prediction = prediction_from_anndata(table)  # the table is the .h5ad layout minus the thumbnail
    spots.mpp = prediction.metadata.get("mpp")
    spots.obs = table.obs.drop(columns=[REGION_KEY, INSTANCE_KEY]).copy()
    return prediction, spots, sdata


def _all_polygons(shapes: Any) -> bool:
    return len(shapes) > 0 and bool((shapes.geometry.geom_type == "Polygon").all())


def spots_from_spatialdata(
    sdata: Any,
    shapes_name: str | None = None,
    *,
    coordinate_system: str | None = None,
    table_name: str | None = None,
    mpp: float | None = None,
) -> Any:
    """:class:`~napari_stem.spots.Spots` from the circle shapes of a SpatialData object (or zarr path);
    polygon shapes (e.g. Visium HD square bins, ``shapes_name="<id>_square_016um"`` for 16 µm) become
    spots at their centroids, as wide as the square's side.

    ``shapes_name`` defaults to the shapes a table annotates (else the only circle shapes);
    centres are mapped into ``coordinate_system`` (default: the shapes' only one, else the only one
    they map to by identity, which is the full-res pixel frame ``spatialdata_io.visium`` names after
    the dataset). Barcodes come from the annotating
    table's ``obs_names`` when there is one. ``mpp`` is the µm per unit of that coordinate system.
    """
    from spatialdata.transformations import get_transformation

    from napari_stem.spots import Spots

    sd = _spatialdata()
    if isinstance(sdata, (str, Path)):
        sdata = sd.read_zarr(sdata)
    circles = {
        name: shapes for name, shapes in sdata.shapes.items() if "radius" in shapes.columns or _all_polygons(shapes)
    }
    table = sdata.tables.get(table_name) if table_name else None
    if shapes_name is None:
        annotated = []
        for candidate_table in [table] if table is not None else list(sdata.tables.values()):
            regions = candidate_table.uns.get("spatialdata_attrs", {}).get("region")
            annotated += [r for r in np.atleast_1d(regions).tolist() if r in circles] if regions is not None else []
        choices = annotated or list(circles)
        if len(choices) != 1:
            raise SpotsError(
                f"choose the spots among the circle shapes {sorted(circles) or '(none)'} (shapes_name=...)."
            )
        shapes_name = choices[0]
    if shapes_name not in circles:
        raise SpotsError(
            f"no circle shapes '{shapes_name}' in this SpatialData object (circles: {sorted(circles) or 'none'})."
        )
    shapes = circles[shapes_name]
    transformations = get_transformation(shapes, get_all=True)
    if coordinate_system is None:
        # spatialdata-io puts circles in the full-res frame with an identity, and adds scaled image frames
        identity = [
            name
            for name, t in transformations.items()
            if np.allclose(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), np.eye(3))
        ]
        choices = list(transformations) if len(transformations) == 1 else identity
        if len(choices) != 1:
            raise SpotsError(
                f"shapes '{shapes_name}' live in {sorted(transformations)}; choose one (coordinate_system=...)."
            )
        coordinate_system = choices[0]
    if coordinate_system not in transformations:
        raise SpotsError(
            f"shapes '{shapes_name}' are not in coordinate system '{coordinate_system}' (they are in {sorted(transformations)})."
        )
    affine = np.asarray(
        transformations[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    )
    if "radius" in shapes.columns:
        xy = np.stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()], axis=1)
        sizes = 2.0 * shapes["radius"].to_numpy(dtype=np.float64)
    else:  # square bins (Visium HD): centre and side length
        xy = np.stack([shapes.geometry.centroid.x.to_numpy(), shapes.geometry.centroid.y.to_numpy()], axis=1)
        sizes = np.sqrt(shapes.geometry.area.to_numpy(dtype=np.float64))
    centers = xy @ affine[:2, :2].T + affine[:2, 2]
    radius_scale = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))
    diameters = sizes * radius_scale
    diameter = float(np.median(diameters))
    barcodes = np.asarray(shapes.index.astype(str), dtype=object)
    for candidate_table in [table] if table is not None else list(sdata.tables.values()):
        attrs = candidate_table.uns.get("spatialdata_attrs", {})
        if shapes_name in np.atleast_1d(attrs.get("region", [])).tolist():
            region_key, instance_key = attrs["region_key"], attrs["instance_key"]
            rows = candidate_table.obs[candidate_table.obs[region_key] == shapes_name]
            by_instance = dict(zip(rows[instance_key].to_numpy(), rows.index.astype(str), strict=True))
            barcodes = np.asarray([by_instance.get(i, str(i)) for i in shapes.index], dtype=object)
            break
    return Spots(centers_px=centers, diameter_px=diameter, mpp=mpp, barcodes=barcodes)
