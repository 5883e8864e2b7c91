"""Sampling API: shapes, statistics, seeds independent of batching, progress and cancellation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_stem.errors import CheckpointError
from napari_stem.predict import DEFAULT_SAMPLER
from napari_stem.stem.checkpoint import save_checkpoint
from napari_stem.stem.model import StemConfig, StemModel
from napari_stem.stem.sampling import X0_CLIP_MARGIN, Prediction, SampleStep, iter_sample, sample_expression

CONFIG = StemConfig(n_genes=10, cond_dim=8, hidden_size=32, depth=2, num_heads=4)
GENES = [f"GENE{i}" for i in range(10)]


@pytest.fixture(scope="module")
def model() -> StemModel:
    """Random weights, zero-initialised layers filled small so outputs depend on the input."""
    torch.manual_seed(0)
    model = StemModel(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return model.eval()


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(7, 8)).astype(np.float32)


def test_prediction_shapes_and_statistics(model, embeddings) -> None:
    pred = sample_expression(
        model,
        embeddings,
        n_samples=4,
        steps=5,
        keep_samples=True,
        quantiles=[0.9, 0.1, 0.5],
        intervals=[0.9],
        genes=GENES,
    )
    assert isinstance(pred, Prediction) and pred.genes == GENES
    assert pred.mean.shape == pred.variance.shape == (7, 10) and pred.samples.shape == (7, 4, 10)
    assert pred.mean.dtype == np.float32
    np.testing.assert_allclose(pred.mean, pred.samples.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.variance, pred.samples.var(axis=1, ddof=1), rtol=1e-4, atol=1e-6)
    assert pred.quantile_levels == (0.1, 0.5, 0.9) and pred.quantiles.shape == (3, 7, 10)
    assert (pred.quantiles[0] <= pred.quantiles[1]).all() and (pred.quantiles[1] <= pred.quantiles[2]).all()
    (spec,) = pred.interval_specs  # 4 samples cannot give 90 %: [min, max], labelled as the 60 % it is
    assert spec.rank == 1 and spec.name == "60" and pred.intervals.shape == (1, 2, 7, 10)
    np.testing.assert_array_equal(pred.intervals[0, 0], pred.samples.min(axis=1))
    np.testing.assert_array_equal(pred.intervals[0, 1], pred.samples.max(axis=1))
    assert (pred.variance > 0).all()  # samples of one spot differ
    assert (
        pred.metadata["steps"] == 5
        and pred.metadata["sampler"] == DEFAULT_SAMPLER
        and pred.metadata["variance_ddof"] == 1
    )

    # a selection keeps every per-spot array aligned, whether given as a mask or as indices
    mask = np.array([True, False, True, False, False, True, False])
    for index in (mask, np.flatnonzero(mask)):
        part = pred.subset(index)
        np.testing.assert_array_equal(part.mean, pred.mean[[0, 2, 5]])
        np.testing.assert_array_equal(part.variance, pred.variance[[0, 2, 5]])
        np.testing.assert_array_equal(part.samples, pred.samples[[0, 2, 5]])
        np.testing.assert_array_equal(part.quantiles, pred.quantiles[:, [0, 2, 5]])
        np.testing.assert_array_equal(part.intervals, pred.intervals[:, :, [0, 2, 5]])
        assert part.genes == GENES and part.metadata == pred.metadata and part.metadata is not pred.metadata


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ancestral", 0.0)])
def test_same_seed_same_result_whatever_the_batch_size(model, embeddings, sampler, eta) -> None:
    runs = [
        sample_expression(
            model, embeddings, n_samples=3, steps=4, sampler=sampler, eta=eta, seed=11, batch_size=b, keep_samples=True
        ).samples
        for b in (1, 3, 7)
    ]
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], rtol=1e-5, atol=1e-5)
    different_seed = sample_expression(
        model, embeddings, n_samples=3, steps=4, sampler=sampler, eta=eta, seed=12, keep_samples=True
    ).samples
    assert np.abs(different_seed - runs[0]).max() > 1e-2


def test_ddim_eta_and_ancestral_give_different_draws_from_the_same_start(model, embeddings) -> None:
    def run(**kwargs):
        return sample_expression(
            model, embeddings[:2], n_samples=2, steps=6, seed=3, keep_samples=True, **kwargs
        ).samples

    deterministic = run(sampler="ddim")
    np.testing.assert_array_equal(deterministic, run(sampler="ddim"))
    stochastic = run(sampler="ddim", eta=1.0)
    ancestral = run(sampler="ancestral")
    assert stochastic.shape == ancestral.shape == (2, 2, 10)
    assert np.abs(stochastic - deterministic).max() > 1e-3 and np.abs(ancestral - stochastic).max() > 1e-3


def test_iter_sample_reports_progress_and_can_be_cancelled(model, embeddings) -> None:
    events = iter_sample(model, torch.from_numpy(embeddings).double(), n_samples=2, steps=3, batch_size=3)
    first = next(events)
    assert (first.start, first.stop, first.done_spots, first.total_spots) == (0, 3, 3, 7)
    assert first.mean.shape == (3, 10) and first.samples is None
    assert not torch.is_inference_mode_enabled()  # nothing leaks into the caller between batches
    assert [e.stop for e in events] == [6, 7]
    events.close()


def test_checkpoint_path_gives_gene_names_and_checks_the_embedding_dim(model, embeddings, tmp_path) -> None:
    path = save_checkpoint(
        tmp_path / "ckpt", config=CONFIG, genes=GENES, ema=model, embedding={"encoder": "toy", "dim": 8}
    )
    pred = sample_expression(path, embeddings, n_samples=2, steps=3)
    assert pred.genes == GENES and pred.metadata["checkpoint"] == str(path)
    assert pred.metadata["target_transform"] == "log2p1"
    direct = sample_expression(model, embeddings, n_samples=2, steps=3)
    np.testing.assert_allclose(pred.mean, direct.mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"expects 8-dim embeddings.*'toy'.*5-dim"):
        sample_expression(path, embeddings[:, :5])
    with pytest.raises(ValueError, match="expects 8-dim"):
        sample_expression(model, embeddings[:, :5])


def test_bad_arguments_and_single_sample(model, embeddings) -> None:
    with pytest.raises(ValueError, match="sampler"):
        sample_expression(model, embeddings, sampler="euler")
    with pytest.raises(ValueError, match="NaN"):
        sample_expression(model, np.full((2, 8), np.nan))
    with pytest.raises(ValueError, match="steps"):
        sample_expression(model, embeddings, steps=0)
    single = sample_expression(model, embeddings[:2], n_samples=1, steps=2)
    assert np.isnan(single.variance).all() and np.isfinite(single.mean).all()


def test_bf16_precision_runs_close_to_fp32(model, embeddings) -> None:
    fp32 = sample_expression(model, embeddings, n_samples=2, steps=3, precision="fp32")
    bf16 = sample_expression(model, embeddings, n_samples=2, steps=3, precision="bf16")
    assert bf16.metadata["precision"] == "bf16"
    np.testing.assert_allclose(bf16.mean, fp32.mean, atol=0.1 * np.abs(fp32.mean).max())


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, napari_stem; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde", "ancestral-matched"])
def test_solvers_count_evaluations_as_steps_and_ignore_the_batch_size(model, embeddings, sampler) -> None:
    events = list(
        iter_sample(
            model, embeddings, n_samples=2, steps=3, sampler=sampler, batch_size=4, step_events=True, keep_samples=True
        )
    )
    assert [(e.step, e.n_steps) for e in events if isinstance(e, SampleStep)][:3] == [(1, 3), (2, 3), (3, 3)]
    calls = []
    original = model.forward_embedded
    try:
        model.forward_embedded = lambda *a, **k: calls.append(1) or original(*a, **k)
        one_batch = sample_expression(model, embeddings, n_samples=2, steps=3, sampler=sampler, keep_samples=True)
    finally:
        del model.forward_embedded
    assert len(calls) == 3  # one network evaluation per step
    batched = np.concatenate([e.samples for e in events if not isinstance(e, SampleStep)])
    np.testing.assert_allclose(batched, one_batch.samples, rtol=1e-5, atol=1e-5)
    assert np.isfinite(one_batch.samples).all() and one_batch.metadata["sampler"] == sampler


def test_clipping_to_the_recorded_range_and_the_reference_without_it(model, embeddings, tmp_path) -> None:
    """A checkpoint's training range bounds every sample; clip_x0=False is the unclipped reference,
    bit for bit, as is a checkpoint that records no range."""
    low, high = [-0.05] * 10, [0.05] * 10
    ranged = save_checkpoint(
        tmp_path / "ranged",
        config=CONFIG,
        genes=GENES,
        ema=model,
        embedding={"encoder": "toy", "dim": 8},
        target_range={"min": low, "max": high},
    )
    plain = save_checkpoint(
        tmp_path / "plain", config=CONFIG, genes=GENES, ema=model, embedding={"encoder": "toy", "dim": 8}
    )
    for sampler in ("ancestral", "ancestral-matched"):  # the reference's loop and the solvers'
        run = {"n_samples": 3, "steps": 4, "sampler": sampler, "keep_samples": True, "seed": 5, "clip_margin": 0.0}
        reference = sample_expression(model, embeddings, **run).samples
        clipped = sample_expression(ranged, embeddings, **run)
        assert clipped.metadata["clip_x0"] is True and clipped.metadata["clip_margin"] == 0.0
        assert clipped.samples.min() >= -0.05 and clipped.samples.max() <= 0.05
        # by default the range is widened by X0_CLIP_MARGIN on both sides
        widened = sample_expression(ranged, embeddings, **{**run, "clip_margin": X0_CLIP_MARGIN}).samples
        assert widened.min() >= -0.05 - X0_CLIP_MARGIN and widened.max() <= 0.05 + X0_CLIP_MARGIN
        assert reference.min() < -0.05 or reference.max() > 0.05  # the range did something
        unclipped = sample_expression(ranged, embeddings, clip_x0=False, **run)
        assert unclipped.metadata["clip_x0"] is False
        np.testing.assert_array_equal(unclipped.samples, reference)
        np.testing.assert_array_equal(sample_expression(plain, embeddings, **run).samples, reference)
        # a range given outright (e.g. for a bare model) clips the same way
        given = sample_expression(model, embeddings, target_range=(low, high), **run).samples
        np.testing.assert_array_equal(given, clipped.samples)
