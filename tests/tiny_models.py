"""A tiny untrained Stem checkpoint for tests that need the prediction path but not a good model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def save_tiny_checkpoint(
    path: Path, genes: Sequence[str], *, encoder: str = "efficientnet_lite0", cond_dim: int = 1280
) -> Path:
    """One block, hidden 32; weights nudged off the zero-init so the output depends on the condition."""
    import torch

    from napari_stem.embedding.patches import PatchSpec
    from napari_stem.stem.checkpoint import save_checkpoint
    from napari_stem.stem.model import StemConfig, StemModel

    torch.manual_seed(0)
    config = StemConfig(n_genes=len(genes), cond_dim=cond_dim, hidden_size=32, depth=1, num_heads=2)
    model = StemModel(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    embedding = {"encoder": encoder, "dim": cond_dim, "patch": PatchSpec().to_dict()}
    return save_checkpoint(
        path,
        config=config,
        genes=list(genes),
        ema=model,
        embedding=embedding,
        provenance={"steps": 0, "data": "untrained test model"},
    )
