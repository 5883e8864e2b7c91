"""Which precision "auto" picks: bf16 only where the hardware computes it natively."""

from __future__ import annotations

import pytest

from napari_stem import precision as precision_module
from napari_stem.precision import cpu_flags_have_native_bf16, resolve_precision

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"


def test_cpu_flags_name_native_bf16_only_on_the_flags_line():
    assert cpu_flags_have_native_bf16(ZEN4)
    assert cpu_flags_have_native_bf16(SAPPHIRE_RAPIDS)
    assert not cpu_flags_have_native_bf16(SKYLAKE)  # AVX-512 without BF16: oneDNN would emulate it
    assert not cpu_flags_have_native_bf16("bugs\t: avx512_bf16\n")  # not a flags line
    assert not cpu_flags_have_native_bf16("")


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_hardware(monkeypatch, native):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="auto, bf16, fp32; got 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_sampling_records_the_precision_it_ran_in(monkeypatch):
    import numpy as np

    from napari_stem.stem.model import StemConfig, StemModel
    from napari_stem.stem.sampling import sample_expression

    model = StemModel(StemConfig(n_genes=4, cond_dim=6, hidden_size=16, depth=1, num_heads=2))
    embeddings = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    for native, expected in [(True, "bf16"), (False, "fp32")]:
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda native=native: native)
        prediction = sample_expression(model, embeddings, n_samples=2, steps=2, device="cpu")
        assert prediction.metadata["precision"] == expected
