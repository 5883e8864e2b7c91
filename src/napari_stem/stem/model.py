"""Stem's gene-token diffusion transformer (Zhu et al., ICLR 2025), restated after DiT's models.py.

Each gene is one token: MLP(value) + a learned gene-identity vector. The patch embedding enters
only through adaLN-Zero, as c = t_emb + MLP(y). The output has two channels per gene: the noise
prediction and the IDDPM variance-interpolation value. Module names keep the DiT/Stem layout, so a
reference state dict maps onto this one by renaming three prefixes (see ``checkpoint.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_stem.stem.model_config import PRESETS, StemConfig  # noqa: F401  (re-exported: the model's public API)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine on every token; (N, L, H) with (N, H) shift and scale."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly respaced-to-original) timestep, then an MLP."""

    def __init__(self, hidden_size: int, n_frequencies: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_frequencies, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.n_frequencies = n_frequencies

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dim % 2:
            features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.n_frequencies))


class GeneTokenEmbedder(nn.Module):
    """One token per gene: MLP(1 -> H -> H) of its (noisy) value plus a learned identity vector.

    The identity table is the only thing telling genes apart; there is no positional encoding.
    """

    def __init__(self, n_genes: int, hidden_size: int):
        super().__init__()
        self.identity_table = nn.Parameter(torch.empty(n_genes, hidden_size))
        self.value_mlp = nn.Sequential(nn.Linear(1, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, G) -> (N, G, H)
        return self.value_mlp(x.transpose(1, 2)) + self.identity_table


class SelfAttention(nn.Module):
    """Multi-head self-attention across the genes of one spot (fused qkv, as timm's Attention)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, hidden = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, hidden // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, hidden))


class FeedForward(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift, scale, gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # Gated residuals as one fused pass each: x + gate * branch.
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """adaLN then a per-token Linear(H -> 2): channel 0 = eps, channel 1 = variance fraction."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, 2)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale)).transpose(1, 2)


class StemModel(nn.Module):
    """forward(x (N, 1, G), t (N,), y (N, D)) -> (N, 2, G), exactly as the reference StemModel."""

    def __init__(self, config: StemConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.gene_embed = GeneTokenEmbedder(config.n_genes, hidden)
        self.time_embed = TimestepEmbedder(hidden)
        self.cond_embed = nn.Sequential(
            nn.Linear(config.cond_dim, config.cond_dim), nn.SiLU(), nn.Linear(config.cond_dim, hidden)
        )
        self.blocks = nn.ModuleList(DiTBlock(hidden, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(hidden)
        self.initialize_weights()

    def initialize_weights(self):
        """The reference's init: xavier Linears, N(0, 0.02) embedding MLPs, adaLN-Zero, zero head."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        nn.init.kaiming_uniform_(self.gene_embed.identity_table, a=math.sqrt(5))
        for linear in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for linear in (self.cond_embed[0], self.cond_embed[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed_condition(self, y: torch.Tensor) -> torch.Tensor:
        """MLP of the patch embedding; constant over the sampling steps, so samplers cache it."""
        return self.cond_embed(y)

    def forward_embedded(self, x: torch.Tensor, t: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor:
        """forward() with the condition already passed through :meth:`embed_condition`."""
        c = self.time_embed(t) + y_emb
        tokens = self.gene_embed(x)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.final_layer(tokens, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(x, t, self.embed_condition(y))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
