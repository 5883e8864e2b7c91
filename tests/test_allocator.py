"""glibc malloc thresholds for tensor buffers: set once on Linux/glibc, never over the user's own."""

from __future__ import annotations

import platform

import pytest

from napari_stem import allocator

tune = allocator.keep_tensor_buffers_in_heap.__wrapped__  # the uncached decision, testable per environment


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_thresholds_are_set_on_glibc(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", allocator.OPT_OUT_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    assert tune() is True


@pytest.mark.parametrize(
    "variable, value",
    [("NAPARI_STEM_MALLOC_TUNING", "0"), ("MALLOC_MMAP_THRESHOLD_", "131072"), ("MALLOC_TRIM_THRESHOLD_", "0")],
)
def test_left_alone_when_the_user_chose(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert tune() is False


def test_left_alone_off_glibc(monkeypatch):
    monkeypatch.delenv(allocator.OPT_OUT_VARIABLE, raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert tune() is False


def test_cpu_encoders_and_sampling_apply_it(monkeypatch):
    import numpy as np

    from napari_stem.embedding.encoders import create_encoder
    from napari_stem.stem.model import StemConfig, StemModel
    from napari_stem.stem.sampling import sample_expression

    calls = []
    monkeypatch.setattr("napari_stem.embedding.encoders.keep_tensor_buffers_in_heap", lambda: calls.append("encoder"))
    monkeypatch.setattr("napari_stem.stem.sampling.keep_tensor_buffers_in_heap", lambda: calls.append("sampling"))
    create_encoder("efficientnet_lite0", device="cpu")
    model = StemModel(StemConfig(n_genes=3, cond_dim=4, hidden_size=8, depth=1, num_heads=2))
    sample_expression(model, np.zeros((2, 4), np.float32), n_samples=1, steps=1, device="cpu")
    assert calls == ["encoder", "sampling"]
