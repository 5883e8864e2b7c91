"""``stem-train make-demo-data``: write a learnable synthetic dataset in HEST-1k layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_stem.validate import MPP, POSITIVE_FLOAT, POSITIVE_INT


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "make-demo-data",
        help="write a learnable synthetic HEST-layout dataset (wsis/, st/, metadata/)",
        description=(
            "Write N synthetic samples in HEST-1k's layout: pyramidal TIFF slides (wsis/<id>.tif), raw "
            "counts with Visium geometry (st/<id>.h5ad) and metadata/<id>.json. Expression of most genes "
            "is a function of the tissue under each spot plus negative-binomial noise, so models can "
            "learn it; the rest are pure noise. Deterministic for a seed."
        ),
    )
    parser.add_argument("out", type=Path, help="output folder (created if missing)")
    parser.add_argument("--slides", type=POSITIVE_INT, default=4, help="number of samples (default: 4)")
    parser.add_argument("--genes", type=POSITIVE_INT, default=50, help="number of genes (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="a real slide to use as image source (e.g. the demo H&E); default: procedural tissue",
    )
    parser.add_argument(
        "--size-um", type=POSITIVE_FLOAT, default=1500.0, help="edge of each procedural slide in µm (default: 1500)"
    )
    parser.add_argument("--mpp", type=MPP, default=0.5, help="pixel size of the written slides in µm/px (default: 0.5)")
    return parser


def run(args: argparse.Namespace) -> int:
    from napari_stem.synthetic import make_demo_dataset
    from napari_stem.validate import check_memory, check_writable_folder

    side_px = args.size_um / args.mpp
    check_memory(
        side_px**2 * 3 * 8,
        f"a {args.size_um:g} µm slide at {args.mpp:g} µm/px ({side_px:,.0f} px square)",
        "Use a smaller --size-um or a larger --mpp.",
    )
    check_writable_folder(args.out, side_px**2 * 3 * args.slides)
    samples = make_demo_dataset(
        args.out,
        n_slides=args.slides,
        n_genes=args.genes,
        seed=args.seed,
        source=args.source,
        slide_size_um=args.size_um,
        mpp=args.mpp,
    )
    for sample in samples:
        print(f"{sample.sample_id}\tpatient {sample.patient}\t{sample.n_spots} spots")
    print(f"wrote {len(samples)} samples to {args.out.resolve()}")
    return 0
