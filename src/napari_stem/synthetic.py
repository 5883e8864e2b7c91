"""Learnable synthetic data in HEST-1k's exact layout.

No HEST sample can be downloaded here, so napari-stem makes its own: pyramidal TIFF slides,
HEST-style ``st/<id>.h5ad`` counts and ``metadata/<id>.json``. Expression is *learnable*: each
image-driven gene's negative-binomial mean is a function of what the image shows under the spot
(haematoxylin and eosin densities from :func:`skimage.color.rgb2hed`, nuclear density, texture),
while noise genes ignore the image. A model that reads the patch can therefore beat the per-gene
mean on held-out slides, and one that does not, cannot.

The image source is either procedural tissue (regions of stroma, tumour-like and immune-like
texture, new for every slide) or a real slide (e.g. the demo H&E). A real source is cut into
disjoint bands of tissue, one per split, so the held-out slide shows tissue no training slide
shows: training slides are the training bands in different dihedral orientations, stains and spot
lattices (augmentation never crosses the split); the validation and test slides are their own
bands. Each slide's metadata records its band, so :func:`source_footprint` can prove it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_stem.atomic import replace_atomically, write_text_atomically
from napari_stem.embedding.patches import HEST_PATCH_SIZE_UM
from napari_stem.spots import VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM, hex_grid

#: Genes whose names start like this are dropped by Stem's HMHVG filter; the generator includes a
#: few so that filter is exercised.
_FILTERED_GENE_NAMES = ("MT-CO1", "MT-ND1", "RPL13", "RPS6")

_FEATURE_NAMES = ("hematoxylin", "eosin", "nuclear_fraction", "texture")


#: How a real source slide is shared between the splits, top to bottom: (split, share of its tissue).
#: The test band lies between training tissue, as a section cut from the middle of a block would.
SOURCE_BANDS: tuple[tuple[str, float], ...] = (("train", 0.35), ("validation", 0.15), ("test", 0.30), ("train", 0.20))

#: Rows left out between two bands (used by no slide): one HEST patch edge, so no spot near a cut sees tissue that
#: continues on the other side.
BAND_GAP_UM = HEST_PATCH_SIZE_UM

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SyntheticSample:
    sample_id: str
    patient: str
    n_spots: int
    split: str = "train"  # "train", "validation" or "test" (procedural slides are all "train")


@dataclass(frozen=True)
class SourceBand:
    """Rows ``[top, bottom)`` of the source image that belong to one split."""

    split: str
    top: int
    bottom: int


@dataclass(frozen=True)
class _SlidePlan:
    split: str
    band: SourceBand | None  # None: procedural tissue
    orientation: int


# ---------------------------------------------------------------------- public API
def make_demo_dataset(
    out_dir: str | Path,
    n_slides: int = 4,
    n_genes: int = 50,
    seed: int = 0,
    source: str | Path | None = None,
    slide_size_um: float = 1500.0,
    mpp: float = 0.5,
    image_gene_fraction: float = 0.7,
    compression: str = "jpeg",
    spot_pitch_um: float = VISIUM_PITCH_UM,
    source_magnification: float = 1.0,
) -> list[SyntheticSample]:
    """Write ``n_slides`` HEST-layout samples to ``out_dir`` and return what was written.

    Deterministic for a given ``seed``. ``source`` is a slide whose tissue replaces the procedural
    texture (read at ``mpp``): its last two samples are the validation and test slides, each cut
    from tissue no other split shows (needs ``n_slides >= 3``). ``slide_size_um`` sets the
    procedural slide's edge; ``spot_pitch_um`` the lattice pitch (spots keep Visium's diameter).
    ``source_magnification`` > 1 shows the source enlarged (its pixels stand for fewer µm), so a
    small real region holds enough spots to split.
    """
    from napari_stem.tissue import tissue_fraction_at, tissue_mask_from_rgb

    if source is not None and n_slides < 3:
        raise ValueError(
            f"a real source is split into training, validation and test slides: n_slides must be >= 3, not {n_slides}"
        )
    if spot_pitch_um < VISIUM_SPOT_DIAMETER_UM:
        raise ValueError(f"spot_pitch_um {spot_pitch_um:g} would make {VISIUM_SPOT_DIAMETER_UM:g} µm spots overlap")
    out_dir = Path(out_dir)
    for sub in ("wsis", "st", "metadata"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    genes = _gene_names(n_genes)
    gene_model = _GeneModel.random(rng, genes, image_gene_fraction)
    source_image = _read_source(source, mpp / source_magnification) if source is not None else None
    plans = _plan_slides(source_image, n_slides, mpp)

    slides = []
    for index, plan in enumerate(plans):
        slide_rng = np.random.default_rng([seed, index])
        if plan.band is None:
            image = _procedural_tissue(slide_rng, int(round(slide_size_um / mpp)))
            origin_um = (50.0, 50.0)
        else:
            band = source_image[plan.band.top : plan.band.bottom]
            image = _restain(np.ascontiguousarray(_dihedral(band, plan.orientation)), slide_rng)
            origin_um = tuple(
                float(v) for v in 20.0 + slide_rng.uniform(0.0, spot_pitch_um, 2)
            )  # a new lattice per view
        mask = tissue_mask_from_rgb(image[::4, ::4])
        layout = hex_grid(image.shape[1] * mpp, image.shape[0] * mpp, spot_pitch_um, origin_um=origin_um)
        centers_px = np.stack([layout["x_um"], layout["y_um"]], axis=1) / mpp
        radius_px = VISIUM_SPOT_DIAMETER_UM / 2 / mpp
        fully_inside = (
            (centers_px[:, 0] >= radius_px)
            & (centers_px[:, 1] >= radius_px)
            & (centers_px[:, 0] < image.shape[1] - radius_px)
            & (centers_px[:, 1] < image.shape[0] - radius_px)
        )
        keep = fully_inside & (tissue_fraction_at(mask, 0.25, centers_px, radius_px) >= 0.5)
        slides.append((image, layout[keep].reset_index(drop=True), centers_px[keep]))

    features = [spot_image_features(image, centers, VISIUM_SPOT_DIAMETER_UM / 2 / mpp) for image, _, centers in slides]
    pooled = np.concatenate(features)
    feature_mean, feature_std = pooled.mean(axis=0), pooled.std(axis=0) + 1e-6

    written = []
    for index, ((image, layout, centers_px), raw_features, plan) in enumerate(
        zip(slides, features, plans, strict=True)
    ):
        sample_id = f"SYN{index:03d}"
        # A real source is one patient's tissue; procedural slides pair up into made-up patients.
        patient = Path(source).stem if source is not None else f"P{index // 2}"
        standardized = (raw_features - feature_mean) / feature_std
        counts = gene_model.sample_counts(standardized, np.random.default_rng([seed, index, 1]))
        provenance = None
        if plan.band is not None:
            provenance = {
                "split": plan.split,
                "source_image": Path(source).name,
                "source_shape_px": list(source_image.shape[:2]),
                "source_rows_px": [plan.band.top, plan.band.bottom],
                "source_orientation": plan.orientation,
            }
        _write_sample(
            out_dir,
            sample_id,
            patient,
            image,
            mpp,
            layout,
            centers_px,
            genes,
            counts,
            gene_model,
            compression,
            spot_pitch_um,
            provenance,
        )
        written.append(SyntheticSample(sample_id=sample_id, patient=patient, n_spots=len(centers_px), split=plan.split))
    return written


def source_bands(
    tissue_per_row: np.ndarray, gap_px: int, bands: tuple[tuple[str, float], ...] = SOURCE_BANDS
) -> list[SourceBand]:
    """Cut a source into horizontal bands holding the given shares of its tissue, ``gap_px`` rows apart."""
    cumulative = np.cumsum(tissue_per_row) / max(float(np.sum(tissue_per_row)), 1e-9)
    shares = np.cumsum([share for _, share in bands])[:-1]
    cuts = [0, *(int(np.searchsorted(cumulative, q)) for q in shares), len(tissue_per_row)]
    first_half = gap_px // 2
    result = []
    for index, (split, _) in enumerate(bands):
        top = cuts[index] + (first_half if index > 0 else 0)
        bottom = cuts[index + 1] - (gap_px - first_half if index < len(bands) - 1 else 0)
        result.append(SourceBand(split, top, max(top, bottom)))
    return result


def source_footprint(metadata: dict, centers_px: np.ndarray, patch_px: float) -> np.ndarray:
    """The source pixels that the patches around ``centers_px`` show, for a slide cut from a real source.

    ``metadata`` is the slide's ``metadata/<id>.json``; the result has the source's shape, so two
    slides' footprints can be intersected to prove (or refute) that they share no tissue.
    """
    height, width = metadata["source_shape_px"]
    top, bottom = metadata["source_rows_px"]
    orientation = int(metadata["source_orientation"])
    slide_height, slide_width = _dihedral(np.empty((bottom - top, width), dtype=bool), orientation).shape
    covered = np.zeros((slide_height, slide_width), dtype=bool)
    half = patch_px / 2
    for x, y in np.asarray(centers_px, dtype=np.float64):
        x0, y0 = max(0, int(math.floor(x - half))), max(0, int(math.floor(y - half)))
        x1, y1 = min(slide_width, int(math.ceil(x + half))), min(slide_height, int(math.ceil(y + half)))
        covered[y0:y1, x0:x1] = True
    footprint = np.zeros((height, width), dtype=bool)
    footprint[top:bottom] = _undo_dihedral(covered, orientation)
    return footprint


def shared_tissue(hest_dir: str | Path, patch_um: float = HEST_PATCH_SIZE_UM) -> dict[tuple[str, str], int]:
    """Source pixels that a held-out slide's spot patches share with a training slide's, per pair.

    Reads each slide's ``metadata/<id>.json`` (split and source band) and ``st/<id>.h5ad`` (spot
    centres). An empty result means no validation or test patch shows training tissue. Slides
    without a recorded source band (procedural tissue) are independent and skipped.
    """
    import anndata

    hest_dir = Path(hest_dir)
    footprints: dict[str, tuple[str, np.ndarray]] = {}
    for meta_path in sorted((hest_dir / "metadata").glob("*.json")):
        metadata = json.loads(meta_path.read_text())
        if "source_rows_px" not in metadata:
            continue
        sample_id = metadata["id"]
        centers = anndata.read_h5ad(hest_dir / "st" / f"{sample_id}.h5ad", backed="r").obsm["spatial"]
        patch_px = patch_um / float(metadata["pixel_size_um_embedded"])
        footprints[sample_id] = (metadata["split"], source_footprint(metadata, np.asarray(centers), patch_px))
    training = {sid: fp for sid, (split, fp) in footprints.items() if split == "train"}
    shared = {}
    for sid, (split, footprint) in footprints.items():
        if split == "train":
            continue
        for train_id, train_footprint in training.items():
            overlap = int(np.count_nonzero(footprint & train_footprint))
            if overlap:
                shared[(sid, train_id)] = overlap
    return shared


def _plan_slides(source_image: np.ndarray | None, n_slides: int, mpp: float) -> list[_SlidePlan]:
    """Which tissue each slide shows: procedural, or a band of the source in one orientation."""
    if source_image is None:
        return [_SlidePlan("train", None, 0) for _ in range(n_slides)]
    from napari_stem.tissue import tissue_mask_from_rgb

    mask = tissue_mask_from_rgb(source_image[::4, ::4])
    tissue_per_row = np.repeat(mask.mean(axis=1), 4)[: source_image.shape[0]]
    bands = source_bands(tissue_per_row, int(round(BAND_GAP_UM / mpp)))
    training = [band for band in bands if band.split == "train"]
    plans = [_SlidePlan("train", training[i % len(training)], i % 8) for i in range(n_slides - 2)]
    for split in ("validation", "test"):
        plans.append(_SlidePlan(split, next(band for band in bands if band.split == split), 0))
    return plans


def spot_image_features(image: np.ndarray, centers_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Per-spot image statistics under a disc: H and E density, nuclear fraction, texture."""
    from skimage.color import rgb2hed

    radius = int(math.ceil(radius_px))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = xx**2 + yy**2 <= radius_px**2
    rows = []
    for x, y in centers_px:
        xi, yi = int(round(x)), int(round(y))
        patch = image[yi - radius : yi + radius + 1, xi - radius : xi + radius + 1]
        if patch.shape[:2] != disc.shape:  # spot at the border: pad with glass
            padded = np.full(disc.shape + (3,), 240, dtype=np.uint8)
            padded[: patch.shape[0], : patch.shape[1]] = patch
            patch = padded
        hed = rgb2hed(patch)[disc]
        grey = patch[disc].mean(axis=1)
        rows.append([hed[:, 0].mean(), hed[:, 1].mean(), (hed[:, 0] > 0.12).mean(), grey.std() / 64.0])
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(_FEATURE_NAMES))


# ---------------------------------------------------------------------- expression model
@dataclass
class _GeneModel:
    """log μ_g = base_g + features · w_g + curvature_g · relu(feature₀); noise genes have w = 0."""

    genes: list[str]
    base: np.ndarray
    weights: np.ndarray  # (n_features, n_genes)
    curvature: np.ndarray
    dispersion: np.ndarray
    image_driven: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, genes: list[str], image_gene_fraction: float) -> _GeneModel:
        n_genes = len(genes)
        image_driven = np.zeros(n_genes, dtype=bool)
        n_image = int(round(image_gene_fraction * n_genes))
        image_driven[rng.permutation(n_genes)[:n_image]] = True
        for position, name in enumerate(genes):
            if name in _FILTERED_GENE_NAMES:
                image_driven[position] = False
        base = rng.uniform(math.log(0.5), math.log(40.0), n_genes)
        base[[i for i, name in enumerate(genes) if name in _FILTERED_GENE_NAMES]] = math.log(60.0)
        weights = rng.normal(0.0, 0.6, (len(_FEATURE_NAMES), n_genes)) * image_driven
        curvature = rng.normal(0.0, 0.4, n_genes) * image_driven
        dispersion = rng.uniform(3.0, 12.0, n_genes)
        return cls(genes, base, weights, curvature, dispersion, image_driven)

    def mean_counts(self, standardized_features: np.ndarray) -> np.ndarray:
        log_mean = self.base + standardized_features @ self.weights
        log_mean = log_mean + np.maximum(standardized_features[:, :1], 0.0) * self.curvature
        return np.exp(np.clip(log_mean, -8.0, 9.0))

    def sample_counts(self, standardized_features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Negative-binomial counts as a gamma–Poisson mixture (variance μ + μ²/r)."""
        mean = self.mean_counts(standardized_features)
        rate = rng.gamma(self.dispersion, mean / self.dispersion)
        return rng.poisson(rate).astype(np.int32)


def _gene_names(n_genes: int) -> list[str]:
    n_filtered = min(len(_FILTERED_GENE_NAMES), max(0, n_genes // 10))
    names = [f"SG{i:04d}" for i in range(n_genes - n_filtered)] + list(_FILTERED_GENE_NAMES[:n_filtered])
    return sorted(names)


# ---------------------------------------------------------------------- images
def _procedural_tissue(rng: np.random.Generator, size_px: int) -> np.ndarray:
    """An H&E-like RGB image: a tissue blob split into stroma, tumour-like and immune-like regions."""
    from scipy import ndimage

    coarse = max(8, size_px // 32)

    def smooth_field(sigma: float) -> np.ndarray:
        field = ndimage.gaussian_filter(rng.normal(size=(coarse, coarse)), sigma)
        field = ndimage.zoom(field, size_px / coarse, order=1)[:size_px, :size_px]
        return (field - field.mean()) / (field.std() + 1e-9)

    yy, xx = np.mgrid[0:size_px, 0:size_px] / size_px - 0.5
    tissue = smooth_field(3.0) * 0.35 - (xx**2 + yy**2) * 6.0 + 0.9 > 0
    classes = np.argmax(np.stack([smooth_field(2.5) for _ in range(3)]), axis=0)

    # class: (background RGB, nuclei per 10k px, nucleus radius px, nucleus RGB)
    looks = [
        ((236, 160, 190), 6.0, 4, (120, 60, 150)),  # stroma: pink, sparse elongated nuclei
        ((205, 140, 195), 40.0, 6, (85, 40, 130)),  # tumour-like: purple, large dense nuclei
        ((225, 175, 210), 80.0, 3, (60, 30, 110)),  # immune-like: many small dark nuclei
    ]
    image = np.empty((size_px, size_px, 3), dtype=np.float32)
    shade = smooth_field(1.5)[..., None] * 8.0
    for label, (background, _, _, _) in enumerate(looks):
        image[classes == label] = background
    image += shade
    for label, (_, density, radius, colour) in enumerate(looks):
        n_nuclei = rng.poisson(density * size_px * size_px / 1e4)
        ys = rng.integers(0, size_px, n_nuclei)
        xs = rng.integers(0, size_px, n_nuclei)
        keep = classes[ys, xs] == label
        seeds = np.zeros((size_px, size_px), dtype=bool)
        seeds[ys[keep], xs[keep]] = True
        disc = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
        nuclei = ndimage.binary_dilation(seeds, structure=disc)
        image[nuclei] = image[nuclei] * 0.25 + np.asarray(colour, dtype=np.float32) * 0.75
    image[~tissue] = (242, 242, 242)
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _read_source(source: str | Path, mpp: float) -> np.ndarray:
    """The source slide's pixels at ``mpp`` (level 0 read whole: sources are small demo slides)."""
    from napari_stem.slide import open_slide, resize_rgb

    with open_slide(source) as slide:
        level = slide.best_level_for_mpp(mpp)
        height, width = slide.levels[level].shape[:2]
        image = slide.read_region(0, 0, width, height, level=level)
        factor = slide.level_mpp(level) / mpp
    if abs(factor - 1.0) > 1e-3:
        image = resize_rgb(image, (int(round(width * factor)), int(round(height * factor))))
    return image


def _dihedral(image: np.ndarray, k: int) -> np.ndarray:
    image = np.rot90(image, k % 4)
    return image[:, ::-1] if k >= 4 else image


def _undo_dihedral(image: np.ndarray, k: int) -> np.ndarray:
    image = image[:, ::-1] if k >= 4 else image
    return np.rot90(image, -(k % 4))


def _restain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild per-slide stain change in optical density, like a different lab's H&E."""
    optical_density = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    optical_density *= rng.uniform(0.92, 1.08, 3).astype(np.float32)
    return np.clip(256.0 * np.exp(-optical_density) - 1.0, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- writers
def write_pyramidal_tiff(
    path: str | Path, image: np.ndarray, mpp: float, compression: str = "jpeg", tile: int = 256
) -> None:
    """A tiled pyramidal TIFF that both tifffile and OpenSlide read as a multi-level slide.

    Every level is a top-level page (OpenSlide ignores SubIFD pyramids), reduced levels are
    flagged ``subfiletype=1``, and the resolution is in pixels/cm as HEST writes it.
    """
    import tifffile

    options = {"compression": compression}
    if compression == "jpeg":
        options["compressionargs"] = {"level": 90}

    def write(partial: Path) -> None:
        with tifffile.TiffWriter(partial, bigtiff=image.nbytes > 2**31) as writer:
            level_image, downsample = image, 1
            while True:
                writer.write(
                    level_image,
                    tile=(tile, tile),
                    photometric="rgb",
                    subfiletype=0 if downsample == 1 else 1,
                    resolution=(1e4 / (mpp * downsample), 1e4 / (mpp * downsample)),
                    resolutionunit="CENTIMETER",
                    metadata=None,
                    **options,
                )
                if max(level_image.shape[:2]) <= 2 * tile:
                    break
                level_image = _downsample_by_two(level_image)
                downsample *= 2

    replace_atomically(path, write)


def _downsample_by_two(image: np.ndarray) -> np.ndarray:
    height, width = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    view = image[:height, :width].reshape(height // 2, 2, width // 2, 2, 3).astype(np.uint16)
    return (view.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def _write_sample(
    out_dir: Path,
    sample_id: str,
    patient: str,
    image: np.ndarray,
    mpp: float,
    layout,
    centers_px: np.ndarray,
    genes: list[str],
    counts: np.ndarray,
    gene_model: _GeneModel,
    compression: str,
    spot_pitch_um: float,
    provenance: dict | None,
) -> None:
    import anndata
    import pandas as pd
    from scipy import sparse

    from napari_stem.slide import resize_rgb

    write_pyramidal_tiff(out_dir / "wsis" / f"{sample_id}.tif", image, mpp, compression=compression)

    scale = min(1.0, 1000.0 / max(image.shape[:2]))
    thumbnail = resize_rgb(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))))
    barcodes = [f"{sample_id}_{r}x{c}" for r, c in zip(layout["array_row"], layout["array_col"], strict=True)]
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(len(barcodes), dtype=np.int64),
            "array_row": layout["array_row"].to_numpy(),
            "array_col": layout["array_col"].to_numpy(),
            "pxl_col_in_fullres": centers_px[:, 0],
            "pxl_row_in_fullres": centers_px[:, 1],
        },
        index=pd.Index(barcodes, name="barcode"),
    )
    var = pd.DataFrame(
        {"synthetic_image_driven": gene_model.image_driven, "mito": [g.startswith("MT-") for g in genes]},
        index=pd.Index(genes, name="gene"),
    )
    adata = anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["spatial"] = centers_px.astype(np.float64)
    adata.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": thumbnail},
            "scalefactors": {
                "spot_diameter_fullres": VISIUM_SPOT_DIAMETER_UM / mpp,
                "tissue_downscaled_fullres_scalef": scale,
                "fiducial_diameter_fullres": 65.0 / mpp,
            },
            "metadata": {},
        }
    }
    st_path = out_dir / "st" / f"{sample_id}.h5ad"
    replace_atomically(st_path, lambda partial: adata.write_h5ad(partial, compression="gzip"))

    metadata = {
        "id": sample_id,
        "dataset_title": "napari-stem synthetic demo",
        "image_filename": f"{sample_id}.tif",
        "organ": "Synthetic",
        "species": "Homo sapiens",
        "patient": patient,
        "st_technology": "Visium",
        "inter_spot_dist": spot_pitch_um,
        "spot_diameter": VISIUM_SPOT_DIAMETER_UM,
        "spots_under_tissue": int(len(barcodes)),
        "nb_genes": len(genes),
        "pixel_size_um_estimated": mpp,
        "pixel_size_um_embedded": mpp,
        "fullres_px_width": int(image.shape[1]),
        "fullres_px_height": int(image.shape[0]),
        "magnification": "20x",
        "license": "CC0 (synthetic)",
        **(provenance or {}),
    }
    write_text_atomically(out_dir / "metadata" / f"{sample_id}.json", json.dumps(metadata, indent=2))
