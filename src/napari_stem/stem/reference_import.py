"""Reference Stem checkpoints into napari-stem's format, without ever running their code.

The reference trainer saves ``{"model", "ema", "opt"}`` state dicts (``0000100.pt``), with no
architecture and no gene list; its released weights are pickled whole modules. A state dict is read
with ``torch.load(weights_only=True)``, the architecture is inferred from the tensor shapes, the
parameter names are mapped onto ours, and the genes come from the trainer's
``selected_gene_list.txt``. A pickled module is refused with a recipe to convert it where the
reference code is trusted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from napari_stem.errors import CheckpointError, describe_path
from napari_stem.gene_list import read_gene_list as read_gene_list_file
from napari_stem.stem.checkpoint import StemCheckpoint, save_checkpoint, validated_state_dict

if TYPE_CHECKING:  # torch is imported where weights are touched
    from napari_stem.stem.model import StemConfig

REFERENCE_HEADS = 6  # the reference's default for hidden 384; not recoverable from weights

# Reference (Stem/models.py) parameter-name prefixes -> ours; everything else is identical.
REFERENCE_RENAMES = {
    "gene_joint_embed.gene_name_ebd": "gene_embed.identity_table",
    "gene_joint_embed.gene_count_ebd.": "gene_embed.value_mlp.",
    "label_embed.": "cond_embed.",
}

CONVERT_FULL_MODEL_RECIPE = """\
# only in a trusted environment where the reference code (Stem/) is importable:
import torch
full_model = torch.load("FILE.pt", weights_only=False, map_location="cpu")
torch.save({"ema": full_model.state_dict()}, "FILE_state_dict.pt")"""


def reference_to_ours(state_dict: dict) -> dict:
    return {_rename(k, REFERENCE_RENAMES): v for k, v in state_dict.items()}


def ours_to_reference(state_dict: dict) -> dict:
    inverse = {v: k for k, v in REFERENCE_RENAMES.items()}
    return {_rename(k, inverse): v for k, v in state_dict.items()}


def _rename(key: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def import_reference_checkpoint(
    pt_path,
    gene_list_file,
    *,
    num_heads: int | None = None,
    out_path=None,
    target_transform: str = "log2p1",
    embedding: dict | None = None,
    provenance: dict | None = None,
    overwrite: bool = False,
    map_location="cpu",
) -> StemCheckpoint:
    """Load a reference trainer checkpoint ({"model", "ema", "opt"} or {"ema"}) safely.

    The architecture comes from the tensor shapes; the head count cannot, so ``num_heads`` is
    required unless the hidden size is the reference default 384 (6 heads). The gene list file
    (one symbol per line, the trainer's ``selected_gene_list.txt``) must match the checkpoint's
    gene count. With ``out_path`` the result is also saved in our format.
    """
    from napari_stem.stem.model import StemModel

    pt_path = Path(pt_path)
    raw = _torch_load_weights_only(pt_path)
    ema_state, model_state = _reference_state_dicts(raw, pt_path)
    config = infer_reference_config(ema_state, num_heads=num_heads, source=pt_path)
    genes = read_gene_list(gene_list_file)
    if len(genes) != config.n_genes:
        raise CheckpointError(
            f"gene list {describe_path(gene_list_file)} has {len(genes)} genes, but checkpoint "
            f"{describe_path(pt_path)} was trained on {config.n_genes}"
        )
    model = StemModel(config)
    model.load_state_dict(validated_state_dict(reference_to_ours(ema_state), config, describe_path(pt_path)))
    step = int(pt_path.stem) if pt_path.stem.isdigit() else None
    provenance = {
        "source": "reference-import",
        "reference_file": pt_path.name,
        "steps": step,
        "gene_list_file": Path(gene_list_file).name,
        "weights": "ema" if "ema" in raw else "model" if "model" in raw else "state_dict",
        **(provenance or {}),
    }
    embedding = dict(embedding or {})
    if out_path is not None:
        save_checkpoint(
            out_path,
            config=config,
            genes=genes,
            ema=model,
            model=reference_to_ours(model_state) if model_state is not None else None,
            target_transform=target_transform,
            embedding=embedding,
            provenance=provenance,
            overwrite=overwrite,
        )
    model.to(map_location).eval()
    return StemCheckpoint(
        path=Path(out_path) if out_path is not None else pt_path,
        config=config,
        genes=genes,
        target_transform=target_transform,
        model=model,
        embedding=embedding,
        provenance=provenance,
    )


def _torch_load_weights_only(pt_path: Path):
    from napari_stem.safe_load import torch_load_tensors

    return torch_load_tensors(pt_path, "reference checkpoint", CheckpointError, recipe=CONVERT_FULL_MODEL_RECIPE)


def _reference_state_dicts(raw, pt_path: Path) -> tuple[dict, dict | None]:
    """(weights to sample with, raw training weights or None) from a reference checkpoint."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{describe_path(pt_path)} does not hold a state dict")
    if "ema" in raw or "model" in raw:
        ema = raw.get("ema", raw.get("model"))
        return ema, raw.get("model") if "ema" in raw else None
    if "gene_joint_embed.gene_name_ebd" in raw:  # a bare state dict, as find_model() accepts
        return raw, None
    raise CheckpointError(
        f"{describe_path(pt_path)} holds neither 'ema'/'model' state dicts nor Stem weights (keys: {sorted(raw)[:5]})"
    )


def infer_reference_config(state_dict: dict, *, num_heads: int | None = None, source="checkpoint") -> StemConfig:
    """Architecture from reference tensor shapes (genes, condition dim, hidden, depth, MLP ratio)."""
    from napari_stem.stem.model import StemConfig

    try:
        n_genes, hidden = state_dict["gene_joint_embed.gene_name_ebd"].shape
        cond_dim = state_dict["label_embed.0.weight"].shape[1]
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{describe_path(source)} is not a Stem state dict: no {exc}") from exc
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if num_heads is None:
        if hidden != 384:
            raise CheckpointError(
                f"{describe_path(source)} has hidden size {hidden}; the number of attention heads "
                f"is not stored in the weights, pass num_heads (the --num_heads used in training)"
            )
        num_heads = REFERENCE_HEADS
    try:
        return StemConfig(
            n_genes=int(n_genes),
            cond_dim=int(cond_dim),
            hidden_size=int(hidden),
            depth=depth,
            num_heads=int(num_heads),
            mlp_ratio=mlp_hidden / hidden,
        )
    except ValueError as exc:
        raise CheckpointError(f"{describe_path(source)}: {exc}") from exc


def read_gene_list(path) -> list[str]:
    """The gene list a reference checkpoint was trained on (its ``selected_gene_list.txt``)."""
    return read_gene_list_file(path, error=CheckpointError)
