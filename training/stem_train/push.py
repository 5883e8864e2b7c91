"""``stem-train push``: publish a napari-stem checkpoint as a Hugging Face Hub model repo.

A thin command over :func:`napari_stem.hub_publish.push_checkpoint`; the uploaded repo is what
``--checkpoint hf-hub:owner/name`` loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push",
        help="upload a checkpoint (config.json + weights.safetensors + a model card) to the Hugging Face Hub",
        description=(
            "Upload a napari-stem checkpoint folder to the Hugging Face Hub model repo OWNER/NAME (created if "
            "needed): config.json, weights.safetensors and a model card (README.md) written from the checkpoint "
            "(genes, encoder, patch mode, training data and steps) with metrics from an evaluation report "
            "(--report, from 'stem-train evaluate') and the intended use. Training state (training_state.pt, a "
            "pickle) is never uploaded. Needs a write token ('hf auth login' or HF_TOKEN). Others then predict "
            "with --checkpoint hf-hub:OWNER/NAME; --card-only prints the card without uploading."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", type=Path, metavar="CKPT", help="checkpoint folder written by stem-train fit or import-reference"
    )
    parser.add_argument("repo_id", metavar="OWNER/NAME", help="Hub model repo to upload to")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="report.json",
        help="evaluation report whose metrics go into the card",
    )
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.add_argument("--card-only", action="store_true", help="print the model card and upload nothing")
    return parser


def run(args: argparse.Namespace) -> int:
    import json

    from napari_stem.hub_publish import model_card, push_checkpoint
    from napari_stem.stem.checkpoint import read_metadata

    if args.card_only:
        report = json.loads(args.report.read_text(encoding="utf-8")) if args.report else None
        print(model_card(read_metadata(args.checkpoint), args.repo_id, report))
        return 0
    url = push_checkpoint(
        args.checkpoint,
        args.repo_id,
        report=args.report,
        private=args.private,
        revision=args.revision,
        commit_message=args.message,
    )
    print(f"pushed {args.checkpoint} to {url}; use it with --checkpoint hf-hub:{args.repo_id}")
    return 0
