"""The model's architecture as plain data: size presets and :class:`StemConfig`.

Torch-free, so the command line lists presets and checkpoints are described without importing
torch (seconds on a cold start).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

#: Steps of the diffusion chain the model is trained on (the reference's linear schedule). Torch-free
#: here so the argument checks (napari_stem.validate) and the GUI know it without importing torch.
N_TRAIN_STEPS = 1000

# Architecture presets. n_genes always comes from the gene panel; cond_dim from the encoder
# unless the preset fixes it.
PRESETS: dict[str, dict] = {
    # The paper's model: UNI (1024) + CONCH (512) condition, DiT-S-like transformer.
    "stem-reference": dict(cond_dim=1536, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0),
    # Small enough to train and sample on a laptop CPU for demos.
    "stem-small": dict(hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0),
}

#: ``stem-train fit``'s defaults for each preset, used for the options not given. The reference's
#: are the paper's, meant for ~300k steps on HEST; at the few thousand steps a CPU affords, their
#: EMA barely leaves the initial weights, so stem-small's were chosen on the demo's validation
#: slide (bench/bench_recipes.py; the table is in the README).
TRAINING_DEFAULTS: dict[str, dict] = {
    "stem-reference": dict(lr=1e-4, ema_decay=0.9999, num_aug_ratio=7),
    "stem-small": dict(lr=1e-3, ema_decay=0.995, num_aug_ratio=4),
}


@dataclass(frozen=True)
class StemConfig:
    """Everything needed to rebuild a :class:`StemModel`; saved as JSON next to the weights."""

    n_genes: int
    cond_dim: int
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0

    def __post_init__(self):
        for name in ("n_genes", "cond_dim", "hidden_size", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"StemConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> StemConfig:
        """Build from a JSON dict; unknown keys are an error so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown StemConfig keys: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, *, n_genes: int, **overrides) -> StemConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = {**PRESETS[name], **overrides, "n_genes": n_genes}
        if "cond_dim" not in values:
            raise ValueError(f"preset {name!r} needs cond_dim (the embedding dimension)")
        return cls(**values)
