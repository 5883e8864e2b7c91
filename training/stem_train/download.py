"""``stem-train download``: HEST-1k samples from the Hugging Face Hub into the layout ``prepare`` reads.

A thin command over :func:`napari_stem.hest_download.download`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_stem.hest_download import FILTER_COLUMNS, HEST_REPO, KNOWN_PARTS, REQUIRED_PARTS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "download",
        help="download HEST-1k samples (by id or metadata) from the Hugging Face Hub into a HEST folder",
        description=(
            f"Download HEST-1k samples from the gated Hugging Face dataset {HEST_REPO} into OUT in the HEST layout "
            "(wsis/<id>.tif, st/<id>.h5ad, metadata/<id>.json) that 'stem-train prepare' reads. Samples are chosen "
            "by id (--ids) and/or by the columns of HEST's metadata table (HEST_v*.csv, the newest unless --table): "
            "each filter takes one value or several separated by commas (any matches, case-insensitive); filters "
            "combine with AND.\n\n"
            "Access: accept the dataset's terms on its Hugging Face page, then log in ('hf auth login') or set "
            "HF_TOKEN. Only the files of the chosen samples and parts are fetched, from one pinned commit; each "
            "file's size is checked against the Hub's listing. Interrupted downloads resume: run the same command "
            "again and complete files are skipped. --dry-run lists the files and their total size."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "out", type=Path, metavar="OUT", help="folder for the HEST data (created; reused when resuming)"
    )
    parser.add_argument("--ids", default=None, metavar="ID,ID", help="sample ids, e.g. TENX95,MEND145")
    filters = parser.add_argument_group("metadata filters (columns of HEST_v*.csv)")
    for name, column in FILTER_COLUMNS.items():
        filters.add_argument(f"--{name}", default=None, metavar="VALUE[,VALUE]", help=f"column '{column}'")
    parser.add_argument(
        "--parts",
        default=",".join(REQUIRED_PARTS),
        metavar="PART,PART",
        help=f"folders to fetch (default: {','.join(REQUIRED_PARTS)}, what prepare needs)",
    )
    parser.add_argument(
        "--with",
        dest="extra_parts",
        default="",
        metavar="PART,PART",
        help=f"extra folders: {', '.join(p for p in KNOWN_PARTS if p not in REQUIRED_PARTS)} "
        "(cellvit_seg zips are unpacked)",
    )
    parser.add_argument(
        "--table", default=None, metavar="HEST_vX_Y_Z.csv", help="metadata table to select from (default: the newest)"
    )
    parser.add_argument("--repo", default=HEST_REPO, help=f"dataset repo (default: {HEST_REPO})")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the dataset (default: main)")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the files that would be fetched and their size; write nothing"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


def run(args: argparse.Namespace) -> int:
    from napari_stem.hest_download import download, format_bytes

    filters = {name: _split(getattr(args, name)) for name in FILTER_COLUMNS}
    parts = _split(args.parts) + [p for p in _split(args.extra_parts) if p not in _split(args.parts)]
    result = download(
        args.out,
        _split(args.ids) or None,
        filters=filters,
        parts=parts,
        repo_id=args.repo,
        revision=args.revision,
        table=args.table,
        dry_run=args.dry_run,
        progress=not args.no_progress,
    )
    plan = result.plan
    if args.dry_run:
        print(plan.describe())
        print(f"dry run: nothing written; would write to {args.out}")
        return 0
    for sample_id, missing in plan.missing.items():
        print(f"note: {sample_id} has no {', '.join(missing)} in the repo")
    print(
        f"{len(plan.sample_ids)} samples in {args.out}: fetched {len(result.fetched)} files "
        f"({format_bytes(result.fetched_bytes)}), {len(result.already_present)} already there "
        f"({plan.repo_id}@{plan.revision[:10]}, {plan.table})"
    )
    if set(REQUIRED_PARTS) <= set(plan.parts):
        print(f"next: stem-train prepare {args.out} --held-out {plan.sample_ids[-1]}")
    return 0
