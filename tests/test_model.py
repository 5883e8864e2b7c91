"""The gene-token DiT: size, initialisation, attention and conditioning behave as the reference."""

from __future__ import annotations

import math

import pytest
import torch

from napari_stem.stem.model import PRESETS, StemConfig, StemModel, count_parameters
from reference_fixture import REFERENCE_DEFAULT_PARAM_COUNT

TINY = StemConfig(n_genes=12, cond_dim=8, hidden_size=32, depth=2, num_heads=4)


def _randomised(config: StemConfig, seed: int = 0) -> StemModel:
    """A model whose zero-initialised layers are filled in, so outputs depend on everything."""
    torch.manual_seed(seed)
    model = StemModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model.eval()


def test_reference_default_has_the_reference_parameter_count() -> None:
    with torch.device("meta"):
        model = StemModel(StemConfig.from_preset("stem-reference", n_genes=200))
    assert count_parameters(model) == REFERENCE_DEFAULT_PARAM_COUNT  # counted by the reference code


def test_each_extra_gene_adds_one_identity_vector() -> None:
    with torch.device("meta"):
        g200 = count_parameters(StemModel(StemConfig(n_genes=200, cond_dim=1536)))
        g1000 = count_parameters(StemModel(StemConfig(n_genes=1000, cond_dim=1536)))
    assert g1000 - g200 == 800 * 384


def test_initialisation_is_adaln_zero_with_a_zero_head() -> None:
    torch.manual_seed(0)
    model = StemModel(TINY)
    zero = [model.final_layer.linear, model.final_layer.adaLN_modulation[-1]]
    zero += [block.adaLN_modulation[-1] for block in model.blocks]
    for linear in zero:
        assert not linear.weight.any() and not linear.bias.any()
    # A fresh model predicts exactly zero noise and zero variance value.
    out = model(torch.randn(3, 1, 12), torch.tensor([0, 500, 999]), torch.randn(3, 8))
    assert out.shape == (3, 2, 12) and not out.any()
    # Identity table: kaiming-uniform(a=sqrt(5)) bound 1/sqrt(fan_in); xavier elsewhere.
    table = model.gene_embed.identity_table
    assert table.abs().max() <= 1 / math.sqrt(32) and table.std() > 0.5 / math.sqrt(3 * 32)
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.abs().max() <= math.sqrt(6 / (32 + 96)) and not qkv.bias.any()
    for linear in (model.time_embed.mlp[0], model.cond_embed[2]):
        assert 0.015 < linear.weight.std() < 0.025


def test_attention_equals_explicit_softmax_attention() -> None:
    torch.manual_seed(0)
    attn = StemModel(TINY).blocks[0].attn
    x = torch.randn(2, 12, 32)
    q, k, v = attn.qkv(x).reshape(2, 12, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 12, 32))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_spots_are_independent_and_genes_are_told_apart_only_by_identity() -> None:
    model = _randomised(TINY)
    x, t, y = torch.randn(4, 1, 12), torch.tensor([3, 90, 400, 999]), torch.randn(4, 8)
    out = model(x, t, y)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(model(x[order], t[order], y[order]), out[order], rtol=1e-5, atol=1e-6)
    # Permuting genes together with their identity vectors permutes the output the same way.
    perm = torch.randperm(12)
    with torch.no_grad():
        model.gene_embed.identity_table.copy_(model.gene_embed.identity_table[perm])
    torch.testing.assert_close(model(x[:, :, perm], t, y), out[:, :, perm], rtol=1e-4, atol=1e-5)


def test_cached_condition_path_equals_forward() -> None:
    model = _randomised(TINY)
    x, t, y = torch.randn(2, 1, 12), torch.tensor([5, 700]), torch.randn(2, 8)
    torch.testing.assert_close(model.forward_embedded(x, t, model.embed_condition(y)), model(x, t, y))


def test_config_round_trips_and_presets() -> None:
    assert StemConfig.from_dict(TINY.to_dict()) == TINY
    reference = StemConfig.from_preset("stem-reference", n_genes=200)
    assert (reference.cond_dim, reference.hidden_size, reference.depth, reference.num_heads) == (1536, 384, 12, 6)
    assert "stem-small" in PRESETS
    with pytest.raises(ValueError, match="cond_dim"):
        StemConfig.from_preset("stem-small", n_genes=50)
    with pytest.raises(ValueError, match="unknown StemConfig keys"):
        StemConfig.from_dict({**TINY.to_dict(), "hiden_size": 3})
    with pytest.raises(ValueError, match="divisible"):
        StemConfig(n_genes=5, cond_dim=4, hidden_size=30, num_heads=4)
