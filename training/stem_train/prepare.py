"""``stem-train prepare``: a HEST folder → per-slide patch embeddings, a gene panel and a manifest.

Order matters for the user: everything that can fail fast (folder layout, held-out ids, encoder
name and weights file, the gene list) is checked before the first patch is embedded, and the
manifest is written last, so an interrupted run leaves no manifest that ``fit`` could trust.
Embeddings go through napari-stem's per-slide cache: a rerun with the same encoder, weights, patch
mode and spots reuses them instantly.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_stem.errors import DatasetError, describe_path
from napari_stem.precision import PRECISION_HELP, PRECISIONS
from napari_stem.validate import BATCH_SIZE, NON_NEGATIVE_INT, POSITIVE_INT
from stem_train import genes as gene_selection
from stem_train.cohort import (
    SlideTask,
    refuse_under_torchrun,
    report_spots,
    run_cohort,
    settings_fingerprint,
    worker_device,
)
from stem_train.cohort import add_arguments as add_cohort_arguments
from stem_train.manifest import EMBEDDINGS_DIR, MANIFEST_FILE, PreparedDataset, PreparedSlide
from stem_train.worker_models import LazyEncoder, worker_encoder

DEFAULT_OUT_NAME = "stem_prepared"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from napari_stem.embedding.encoders import DEFAULT_ENCODER
    from napari_stem.embedding.patches import PATCH_MODES

    parser = subparsers.add_parser(
        "prepare",
        help="embed every slide's spots (original + 7 flips/rotations) and choose the gene panel",
        description=(
            "Prepare a HEST-layout folder (wsis/, st/, metadata/) for training: embed the patch under every "
            "spot with an image encoder, once as is and once per non-identity flip/rotation (the 7 dihedral "
            "augmentations the reference trains on), into PREP_DIR/embeddings/<id>.h5; choose the gene panel; "
            "write PREP_DIR/manifest.json, selected_gene_list.txt and all_slide_lst.txt. Embeddings are cached: "
            "rerunning with the same encoder, weights and patch mode reuses them."
        ),
        epilog=(
            "Gene selection. hmhvg (default) is the reference's 'high mean, high variance' procedure: union of "
            "per-slide top HVGs (scanpy seurat flavour on median-normalised log1p counts), minus names starting "
            "with the --drop-prefixes, then the top-k genes by raw-count mean intersected with the top-k by "
            "raw-count std, k raised until N genes remain, sorted by name. hvg: scanpy's top-N HVGs of all "
            "selection slides stacked. list: your own file, in its order. Held-out slides never inform the "
            "choice unless --include-held-out-in-gene-selection is given (the reference includes its test slide)."
        ),
    )
    parser.add_argument(
        "data_dir", type=Path, metavar="DATA_DIR", help="HEST-layout folder with wsis/, st/ and metadata/"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PREP_DIR",
        help=f"output folder (default: DATA_DIR/{DEFAULT_OUT_NAME}); fit, baseline and predict read it",
    )
    parser.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help=f"image encoder: efficientnet_lite0 (offline, ImageNet), uni, conch, uni+conch (the paper's) or a timm name with --encoder-weights (default: {DEFAULT_ENCODER})",
    )
    parser.add_argument(
        "--encoder-weights",
        default=None,
        metavar="PATH",
        help="local weights file for the encoder (for uni+conch: 'uni=PATH,conch=PATH'); default: the encoder's own source (packaged or Hugging Face Hub)",
    )
    parser.add_argument(
        "--patch-mode",
        choices=PATCH_MODES,
        default="hest",
        help="hest: 112 µm at 0.5 µm/px (224 px), the same tissue area on every scanner (default); "
        "stem-native: the reference's crop, max(224 px, spot diameter) at the scan's own resolution",
    )
    parser.add_argument(
        "--held-out",
        default="",
        metavar="ID,ID",
        help="comma-separated sample ids kept out of training (the 'test' split: fit validates on them, "
        "evaluate scores them); default: none, every slide trains",
    )
    parser.add_argument(
        "--genes-method",
        choices=gene_selection.GENE_METHODS,
        default=None,
        help="how to choose the panel: hmhvg (the reference's, default), hvg, or list (default when --gene-list is given)",
    )
    parser.add_argument(
        "--n-genes", type=POSITIVE_INT, default=200, help="panel size for hmhvg and hvg (default: 200, the paper's)"
    )
    parser.add_argument(
        "--gene-list",
        type=Path,
        default=None,
        metavar="FILE",
        help="text file, one gene symbol per line (implies --genes-method list)",
    )
    parser.add_argument(
        "--include-held-out-in-gene-selection",
        action="store_true",
        help="let held-out slides inform the gene statistics, as the reference does (slight leakage; off by default)",
    )
    parser.add_argument(
        "--drop-prefixes",
        default=",".join(gene_selection.REFERENCE_PREFIXES),
        metavar="P,P",
        help="gene-name prefixes removed before hmhvg/hvg selection (default: MT,mt,RPS,RPL, the reference's "
        "since 2025-03; 'MT,mt,RP,rp' reproduces its earlier filter; '' keeps every gene)",
    )
    parser.add_argument(
        "--hvg-per-slide",
        type=POSITIVE_INT,
        default=gene_selection.HVG_PER_SLIDE,
        help=f"hmhvg: highly variable genes taken from each slide before the union (default: {gene_selection.HVG_PER_SLIDE})",
    )
    parser.add_argument(
        "--batch-size",
        type=BATCH_SIZE,
        default=None,
        help="patches per encoder forward pass (default: 8 on CPU, 64 on CUDA)",
    )
    parser.add_argument(
        "--no-augment",
        action="store_true",
        help="embed only the original patches, not the 7 flips/rotations (8x faster; fit then needs --num-aug-ratio 0)",
    )
    parser.add_argument(
        "--num-workers",
        type=NON_NEGATIVE_INT,
        default=0,
        help="processes reading patches from the slides (default: 0, in the main process)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="device for the encoder: auto (a GPU if present), cpu, cuda, cuda:1, ... (default: auto)",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=f"encoder arithmetic. {PRECISION_HELP}")
    add_cohort_arguments(parser.add_argument_group("cohort (many slides on Dask; see the README)"))
    return parser


def run(args: argparse.Namespace) -> int:
    import anndata
    from tqdm.auto import tqdm

    from napari_stem.embedding.augment import N_AUGMENTATIONS
    from napari_stem.embedding.encoders import encoder_weights_id, get_encoder_spec
    from napari_stem.embedding.patches import PatchSpec
    from napari_stem.hest import iter_hest_samples
    from napari_stem.validate import check_writable_folder

    data_dir = args.data_dir.resolve()
    out = (args.out or data_dir / DEFAULT_OUT_NAME).resolve()
    samples = list(iter_hest_samples(data_dir))
    if not samples:
        raise DatasetError(f"{describe_path(data_dir)} holds no samples (st/*.h5ad with wsis/ and metadata/).")
    sample_ids = [sample.sample_id for sample in samples]
    held_out = parse_held_out(args.held_out, sample_ids)
    if len(held_out) == len(samples):
        raise DatasetError("every slide is held out; leave at least one slide for training.")
    method = args.genes_method or ("list" if args.gene_list is not None else "hmhvg")
    if method == "list" and args.gene_list is None:
        raise DatasetError("--genes-method list needs --gene-list FILE (one gene symbol per line).")
    if method != "list" and args.gene_list is not None:
        raise DatasetError(f"--gene-list is only used with --genes-method list, not {method}; drop one of them.")
    encoder_weights_id(args.encoder, args.encoder_weights)  # unknown encoder or missing weights file: fail now
    patch_spec = PatchSpec.stem_native() if args.patch_mode == "stem-native" else PatchSpec()
    _warn_shared_patients(samples, held_out)

    adatas = {
        sample.sample_id: anndata.read_h5ad(sample.st_path)
        for sample in tqdm(samples, desc="reading expression", unit="slide")
    }
    spots_by_sample = check_samples_usable(samples, adatas)
    n_views = 1 if args.no_augment else 1 + N_AUGMENTATIONS
    embedding_bytes = (
        sum(len(spots) for spots in spots_by_sample.values())
        * (get_encoder_spec(args.encoder).dim or 1024)
        * 4
        * n_views
    )
    check_writable_folder(out, embedding_bytes, flag="--out")
    selection = choose_genes(args, method, adatas, held_out)
    print(f"gene panel: {len(selection.genes)} genes by {method} ({_describe(selection.info)})")

    previous = _previous_slides(out)  # their image hashes are reused where the slide file is unchanged
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a stale manifest must not outlive a failed rerun
    created = [folder for folder in (out, out / EMBEDDINGS_DIR) if not folder.exists()]
    try:
        slides, embedding_dim = _embed_samples(args, samples, spots_by_sample, adatas, held_out, out, patch_spec)
    except BaseException:
        for folder in reversed(created):  # leave no empty folders behind a failed first run
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    slides = record_images(slides, samples, previous)
    manifest = PreparedDataset(
        data_dir=str(data_dir),
        encoder=args.encoder,
        encoder_weights=str(args.encoder_weights) if args.encoder_weights else None,
        embedding_dim=embedding_dim,
        patch=patch_spec.to_dict(),
        genes=selection.genes,
        gene_selection=selection.info,
        slides=slides,
    )
    manifest.save(out)
    n_train = sum(slide.split == "train" for slide in slides)
    print(
        f"prepared {len(slides)} slides ({n_train} train, {len(slides) - n_train} held out), {embedding_dim}-d embeddings, {len(selection.genes)} genes"
    )
    print(f"wrote {out}")
    return 0


def check_samples_usable(samples: list[Any], adatas: dict[str, Any]) -> dict[str, Any]:
    """Every sample's spots, after refusing NaN counts, duplicated or off-slide spots (before any embedding)."""
    from napari_stem.slide import open_slide
    from napari_stem.validate import check_finite_counts, check_spots

    spots_by_sample = {}
    for sample in samples:
        check_finite_counts(adatas[sample.sample_id].X, describe_path(sample.st_path))
        spots = sample.read_spots()
        n_spots = adatas[sample.sample_id].n_obs
        if len(spots) != n_spots:
            raise DatasetError(
                f"{describe_path(sample.st_path)}: {len(spots)} spot centres for {n_spots} expression rows."
            )
        with open_slide(sample.wsi_path, mpp=sample.mpp) as slide:
            check_spots(spots, slide.shape, describe_path(sample.st_path))
        spots_by_sample[sample.sample_id] = spots
    return spots_by_sample


def _embed_samples(
    args: argparse.Namespace,
    samples: list[Any],
    spots_by_sample: dict[str, Any],
    adatas: dict[str, Any],
    held_out: list[str],
    out: Path,
    patch_spec: Any,
) -> tuple[list[PreparedSlide], int]:
    options = {
        "encoder_weights": args.encoder_weights,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "augment": not args.no_augment,
    }
    dims: dict[str, int] = {}
    if args.scheduler.distributed:  # one Dask task per slide, each running embed_slide below
        from napari_stem.embedding.cache import spots_fingerprint

        refuse_under_torchrun(args.scheduler)
        encoder_spec = {
            "name": args.encoder,
            "weights": args.encoder_weights,
            "precision": args.precision,
            "device": None if args.device == "auto" else args.device,
        }
        tasks = [
            SlideTask(
                sample.sample_id,
                out / f"{EMBEDDINGS_DIR}/{sample.sample_id}.h5",
                embed_slide_task,
                {
                    "sample": sample,
                    "spots": spots_by_sample[sample.sample_id],
                    "cache_path": out / f"{EMBEDDINGS_DIR}/{sample.sample_id}.h5",
                    "encoder": encoder_spec,
                    "patch": patch_spec.to_dict(),
                    "options": options,
                },
                n_spots=len(spots_by_sample[sample.sample_id]),
                settings=settings_fingerprint(
                    encoder_spec,
                    patch_spec.to_dict(),
                    options,
                    str(sample.wsi_path),
                    sample.mpp,
                    spots_fingerprint(spots_by_sample[sample.sample_id]),
                ),
            )
            for sample in samples
        ]
        report = run_cohort(tasks, args.scheduler, retry_failed=args.retry_failed, show_workers=args.show_workers)
        print(report.table())
        report.raise_if_failed("no manifest was written, so fit cannot start yet")
        dims = {outcome.name: int(outcome.result["embedding_dim"]) for outcome in report.outcomes}
    else:
        encoder = LazyEncoder(
            args.encoder, args.encoder_weights, None if args.device == "auto" else args.device, args.precision
        )
        for sample in samples:
            dims[sample.sample_id] = embed_slide(
                out / f"{EMBEDDINGS_DIR}/{sample.sample_id}.h5",
                sample,
                spots_by_sample[sample.sample_id],
                encoder,
                patch_spec,
                **options,
            )
    slides = []
    for sample in samples:
        split = "test" if sample.sample_id in held_out else "train"
        n_spots = adatas[sample.sample_id].n_obs
        slides.append(
            PreparedSlide(sample.sample_id, sample.patient, split, n_spots, f"{EMBEDDINGS_DIR}/{sample.sample_id}.h5")
        )
    return slides, max(dims.values(), default=0)


def embed_slide(
    cache_path: Path,
    sample: Any,
    spots: Any,
    encoder: Any,
    patch_spec: Any,
    *,
    encoder_weights: Any = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    augment: bool = True,
    progress: bool = True,
    on_batch: Any = None,
) -> int:
    """One slide's embeddings into ``cache_path`` (reused when they match); returns their width.

    ``on_batch(done, total)`` follows the spots as they are embedded (a cohort's live spot count).

    The per-slide path of ``prepare``, whether slides run one after the other here or as cohort
    tasks on Dask workers (:mod:`stem_train.cohort`), so both give the same files.
    """
    from tqdm.auto import tqdm

    from napari_stem.embedding.cache import TRAINING_DATA_OWNER, iter_embed_slide_cached

    embedding_dim = 0
    with tqdm(total=len(spots), desc=f"embedding {sample.sample_id}", unit="spot", disable=not progress) as bar:
        for event in iter_embed_slide_cached(
            cache_path,
            sample.wsi_path,
            spots,
            encoder,
            patch_spec,
            encoder_weights=encoder_weights,
            batch_size=batch_size,
            num_workers=num_workers,
            augment=augment,
            mpp=sample.mpp,
            owner=TRAINING_DATA_OWNER,
        ):
            bar.update(event.done - bar.n)
            embedding_dim = int(event.embeddings.shape[1])
            if event.from_cache:
                bar.set_postfix_str("cached")
            if on_batch is not None:
                on_batch(event.done, event.total)
    return embedding_dim


def embed_slide_task(sample: Any, spots: Any, cache_path: Path, encoder: dict, patch: dict, options: dict) -> dict:
    """One slide of a ``prepare`` cohort on a worker: :func:`embed_slide` with this worker's device and encoder."""
    from napari_stem.embedding.patches import PatchSpec

    device = worker_device(encoder["device"] or "auto")
    built = worker_encoder(encoder["name"], encoder["weights"], device, encoder["precision"])
    dim = embed_slide(
        cache_path,
        sample,
        spots,
        built,
        PatchSpec.from_dict(patch),
        progress=False,
        on_batch=lambda done, total: report_spots(done),
        **options,
    )
    return {"n_spots": len(spots), "embedding_dim": int(dim)}


def parse_held_out(text: str, sample_ids: list[str]) -> list[str]:
    """The comma-separated ids, each checked against the folder's samples."""
    held_out = [item.strip() for item in (text or "").split(",") if item.strip()]
    unknown = [item for item in held_out if item not in sample_ids]
    if unknown:
        raise DatasetError(
            f"--held-out names unknown sample(s) {', '.join(unknown)}; the folder has {', '.join(sample_ids)}."
        )
    return list(dict.fromkeys(held_out))


def choose_genes(
    args: argparse.Namespace, method: str, adatas: dict[str, Any], held_out: list[str]
) -> gene_selection.GeneSelection:
    """Run the chosen method on the selection slides; record which slides it saw."""
    from tqdm.auto import tqdm

    if method == "list":
        return gene_selection.select_from_list(args.gene_list, adatas)
    use_held_out = bool(args.include_held_out_in_gene_selection)
    deciding = {sid: adata for sid, adata in adatas.items() if use_held_out or sid not in held_out}
    prefixes = tuple(p.strip() for p in args.drop_prefixes.split(",") if p.strip())
    if method == "hmhvg":
        selection = gene_selection.select_hmhvg(
            deciding,
            args.n_genes,
            all_adatas=adatas,
            prefixes=prefixes,
            hvg_per_slide=args.hvg_per_slide,
            progress=lambda items: tqdm(items, desc="per-slide HVGs", unit="slide"),
        )
    else:
        selection = gene_selection.select_hvg(deciding, args.n_genes, all_adatas=adatas, prefixes=prefixes)
    selection.info.update(slides=list(deciding), includes_held_out=use_held_out and bool(held_out))
    return selection


def _previous_slides(out: Path) -> dict[str, PreparedSlide]:
    """The slides of the manifest a rerun replaces (none when absent or unreadable)."""
    try:
        return {slide.sample_id: slide for slide in PreparedDataset.load(out).slides}
    except (DatasetError, TypeError, ValueError):
        return {}


def record_images(
    slides: list[PreparedSlide], samples: list[Any], previous: dict[str, PreparedSlide] | None = None
) -> list[PreparedSlide]:
    """Each slide with its image file's path, size and SHA-256 (streamed), for evaluate's leak check.

    A held-out slide whose image hashes like a training slide's is the same scan under another id:
    its "held-out" score would measure memory, not generalisation.
    """
    from dataclasses import replace

    from tqdm.auto import tqdm

    from stem_train.manifest import image_record

    paths = {sample.sample_id: sample.wsi_path for sample in samples}
    previous = previous or {}
    return [
        replace(slide, **image_record(paths[slide.sample_id], previous.get(slide.sample_id)))
        for slide in tqdm(slides, desc="hashing slide files", unit="slide")
    ]


def _warn_shared_patients(samples: list[Any], held_out: list[str]) -> None:
    train_patients: dict[str, list[str]] = {}
    for sample in samples:
        if sample.sample_id not in held_out:
            train_patients.setdefault(sample.patient, []).append(sample.sample_id)
    for sample in samples:
        if sample.sample_id in held_out and sample.patient in train_patients:
            print(
                f"note: held-out {sample.sample_id} comes from patient {sample.patient}, as training slide(s) "
                f"{', '.join(train_patients[sample.patient])}; its score is not patient-independent."
            )


def _describe(info: dict[str, Any]) -> str:
    shown = {key: info[key] for key in ("k", "n_candidates", "includes_held_out", "file") if key in info}
    return ", ".join(f"{key} {value}" for key, value in shown.items())
