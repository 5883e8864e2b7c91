"""The seven dihedral (D4) views of a patch that the reference precomputes for training.

The reference makes them with ``PIL.Image.transpose(k)``; :func:`dihedral` makes the same views on a
whole batch tensor, so augmented embeddings need no extra read of the slide.
"""

from __future__ import annotations

from typing import Any

#: The reference's ``patch.transpose(k)`` for k = 0..6: the seven non-identity elements of D4.
DIHEDRAL_AUGMENTATIONS = (
    "FLIP_LEFT_RIGHT",
    "FLIP_TOP_BOTTOM",
    "ROTATE_90",
    "ROTATE_180",
    "ROTATE_270",
    "TRANSPOSE",
    "TRANSVERSE",
)
N_AUGMENTATIONS = len(DIHEDRAL_AUGMENTATIONS)


def dihedral(batch: Any, index: int, dims: tuple[int, int] = (-3, -2)) -> Any:
    """``PIL.Image.transpose(index)`` on every image of a batch tensor (``dims`` = height, width).

    ``index`` follows PIL's order (:data:`DIHEDRAL_AUGMENTATIONS`); ROTATE_90 is counter-clockwise
    and TRANSVERSE mirrors across the anti-diagonal, as in PIL. Default ``dims`` suit NHWC.
    """
    import torch

    h, w = dims
    if index == 0:
        return batch.flip(w)
    if index == 1:
        return batch.flip(h)
    if index in (2, 3, 4):
        return torch.rot90(batch, index - 1, dims=(h, w))
    if index == 5:
        return batch.transpose(h, w)
    if index == 6:
        return torch.rot90(batch.transpose(h, w), 2, dims=(h, w))
    raise ValueError(f"dihedral augmentation index must be 0..6, got {index}")
