"""``stem-train import-reference``: convert a reference Stem checkpoint into napari-stem's format.

The reference trainer saves ``{"model", "ema", "opt"}`` state dicts with ``torch.save``; they are
read with ``torch.load(weights_only=True)`` (never unpickled as code), renamed onto our modules,
and saved as safetensors + JSON together with the gene list and the encoder they were trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_stem.validate import POSITIVE_INT


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "import-reference",
        help="convert a reference Stem checkpoint (.pt state dicts) into a napari-stem checkpoint",
        description=(
            "Convert a checkpoint written by the reference Stem trainer (SichenZhu/Stem: a .pt holding "
            "{'model', 'ema', 'opt'} state dicts) into napari-stem's safetensors + JSON format, with its "
            "gene list, so the plugin and 'stem-train predict' can use it. Released 'full model' pickles "
            "are refused (loading them runs arbitrary code); the error explains how to convert them in a "
            "trusted environment first."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="the reference .pt file, e.g. results/000/checkpoints/0300000.pt")
    parser.add_argument(
        "--genes", type=Path, required=True, help="the gene list it was trained on (selected_gene_list.txt)"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the converted checkpoint to")
    parser.add_argument(
        "--num-heads",
        type=POSITIVE_INT,
        default=None,
        help="attention heads (not stored in the weights; default: 6 for hidden size 384, the paper's)",
    )
    parser.add_argument(
        "--encoder",
        default="uni+conch",
        help="encoder the model was trained on (default: uni+conch, the paper's 1536-d condition)",
    )
    parser.add_argument(
        "--patch-mode",
        choices=("stem-native", "hest"),
        default="stem-native",
        help="how its training patches were cut (default: stem-native, the reference's crop)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it is a checkpoint napari-stem wrote (anything else is never replaced)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from napari_stem.embedding.encoders import get_encoder_spec
    from napari_stem.embedding.patches import PatchSpec
    from napari_stem.errors import CheckpointError
    from napari_stem.stem.checkpoint import check_replaceable, save_checkpoint
    from napari_stem.stem.reference_import import import_reference_checkpoint
    from napari_stem.validate import check_not_an_input, check_writable_folder
    from napari_stem.values import EmbeddingSpec

    check_not_an_input(args.out, (args.checkpoint, args.genes))
    if args.out.exists():  # refused now, not after reading the weights
        check_replaceable(args.out, args.overwrite)
    check_writable_folder(args.out.parent)
    patch = PatchSpec.stem_native() if args.patch_mode == "stem-native" else PatchSpec()
    encoder_dim = get_encoder_spec(args.encoder).dim
    loaded = import_reference_checkpoint(args.checkpoint, args.genes, num_heads=args.num_heads)
    config = loaded.config
    if config.cond_dim != encoder_dim:
        raise CheckpointError(
            f"{args.checkpoint} was trained on {config.cond_dim}-d embeddings but encoder '{args.encoder}' gives "
            f"{encoder_dim}-d; pass the --encoder it was trained with (the paper's is uni+conch, 1536-d)."
        )
    save_checkpoint(
        args.out,
        config=config,
        genes=loaded.genes,
        ema=loaded.model,
        target_transform=loaded.target_transform,
        embedding=EmbeddingSpec.from_dict({"encoder": args.encoder, "dim": encoder_dim, "patch": patch.to_dict()}),
        provenance={"imported_from": str(args.checkpoint.resolve())},
        overwrite=args.overwrite,
    )
    print(
        f"imported {args.checkpoint}: {config.n_genes} genes, condition {config.cond_dim}-d, hidden {config.hidden_size}, "
        f"depth {config.depth}, heads {config.num_heads}"
    )
    print(f"wrote {args.out.resolve()}")
    return 0
