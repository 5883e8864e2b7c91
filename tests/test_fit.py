"""``stem-train fit``: it learns, checkpoints load, --resume continues exactly, DDP matches one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from napari_stem.metrics import pearson_per_gene
from napari_stem.stem.checkpoint import load_checkpoint
from stem_train import fit
from stem_train.cli import main
from stem_train.data import BatchOrder, assemble_training_set, draw_augmentations
from stem_train.manifest import PreparedDataset, PreparedSlide

#: A model small enough that a few dozen steps take seconds.
TINY = (
    "--preset",
    "stem-small",
    "--hidden-size",
    "32",
    "--depth",
    "1",
    "--num-heads",
    "2",
    "--lr",
    "1e-3",
    "--ema-decay",
    "0.9",
    "--device",
    "cpu",
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models train fastest on one intra-op thread (see the fitted_synthetic_run fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _log(run_dir: Path, kind: str = "train") -> list[dict]:
    records = [json.loads(line) for line in (run_dir / fit.LOG_FILE).read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "weights.safetensors"))


# ---------------------------------------------------------------------- the shared run
def test_fitted_run_learns_and_its_checkpoint_loads(fitted_synthetic_run: Path, prepared_synthetic: Path) -> None:
    manifest = PreparedDataset.load(prepared_synthetic)
    train = _log(fitted_synthetic_run)
    assert train[-1]["step"] == 400 and train[-1]["loss"] < 0.75 * train[0]["loss"]
    val = _log(fitted_synthetic_run, "val")
    assert [r["step"] for r in val] == [200, 400] and all(np.isfinite(r["val_pcc"]) for r in val)

    checkpoint = load_checkpoint(
        fitted_synthetic_run / fit.FINAL_CHECKPOINT, expected_genes=manifest.genes, expected_cond_dim=1280
    )
    assert checkpoint.embedding == manifest.embedding_spec() and checkpoint.target_transform == "log2p1"
    assert checkpoint.provenance["steps"] == 400 and checkpoint.provenance["held_out_slides"] == ["SYN003"]
    assert checkpoint.provenance["gene_selection"]["method"] == "hmhvg"
    assert (checkpoint.config.hidden_size, checkpoint.config.depth) == (64, 2)

    latest = (fitted_synthetic_run / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_0000400"
    state = torch.load(fitted_synthetic_run / "checkpoints" / latest / fit.STATE_FILE, weights_only=True)
    assert state["step"] == 400 and state["spec"]["genes"] == manifest.genes


def test_fitted_model_beats_the_per_gene_mean_on_the_held_out_slide(
    fitted_synthetic_run: Path, prepared_synthetic: Path
) -> None:
    """On SYN003 the sampled mean correlates with the truth (the per-gene mean cannot) and has a
    lower MSE than the training slides' per-gene mean."""
    from napari_stem.stem.sampling import sample_expression
    from stem_train.data import assemble_held_out

    manifest = PreparedDataset.load(prepared_synthetic)
    held_out = assemble_held_out(manifest)
    prediction = sample_expression(
        fitted_synthetic_run / fit.FINAL_CHECKPOINT, held_out.conditions, n_samples=8, steps=20, device="cpu"
    )
    assert np.nanmean(pearson_per_gene(held_out.targets, prediction.mean)) > 0.3
    training = assemble_training_set(manifest, num_aug_ratio=0)
    mean_mse = np.mean((held_out.targets - training.targets.mean(axis=0)) ** 2)
    assert np.mean((held_out.targets - prediction.mean) ** 2) < 0.9 * mean_mse


# ---------------------------------------------------------------------- data order
def test_batch_order_is_a_function_of_seed_and_step() -> None:
    order = BatchOrder(n_rows=100, global_batch_size=16, seed=3)
    assert order.steps_per_epoch == 6 and order.position(13) == (2, 1)
    epoch = np.concatenate([order.global_batch(s) for s in range(6)])
    assert len(set(epoch.tolist())) == 96  # one epoch: distinct rows
    again = BatchOrder(100, 16, 3)
    for step in (0, 7, 13, 6):
        np.testing.assert_array_equal(again.global_batch(step), order.global_batch(step))
        shards = [order.rank_batch(step, rank, 4) for rank in range(4)]
        assert sorted(np.concatenate(shards).tolist()) == sorted(order.global_batch(step).tolist())
    assert not np.array_equal(BatchOrder(100, 16, 4).global_batch(0), order.global_batch(0))


def test_augmentation_draw_depends_on_the_seed_only() -> None:
    views = draw_augmentations(50, 3, seed=5)
    assert views.shape == (50, 3) and all(len(set(row)) == 3 for row in views.tolist())
    assert views.min() >= 0 and views.max() <= 6
    np.testing.assert_array_equal(views, draw_augmentations(50, 3, seed=5))
    assert not np.array_equal(views, draw_augmentations(50, 3, seed=6))
    assert draw_augmentations(50, 0, seed=5).shape == (50, 0)


def test_training_set_drops_empty_spots_like_the_reference(tmp_path: Path) -> None:
    """All-zero and all-NaN spots go; a partial NaN becomes 0; rows = kept spots x (1 + ratio)."""
    data_dir = tmp_path / "hest"
    (data_dir / "st").mkdir(parents=True)
    counts = np.array([[1, 3], [0, 0], [np.nan, np.nan], [7, np.nan], [0, 1]], dtype=np.float32)
    adata = anndata.AnnData(X=sp.csr_matrix(counts))
    adata.var_names = ["A", "B"]
    adata.write_h5ad(data_dir / "st" / "S1.h5ad")
    prep = tmp_path / "prep"
    (prep / "embeddings").mkdir(parents=True)
    embeddings = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    with h5py.File(prep / "embeddings" / "S1.h5", "w") as handle:
        handle["embeddings"] = embeddings
        handle["embeddings_aug"] = embeddings[:, None, :] + 1000 * np.arange(1, 8, dtype=np.float32)[None, :, None]
    manifest = PreparedDataset(
        str(data_dir),
        "toy",
        None,
        4,
        {"mode": "hest"},
        ["A", "B"],
        {"method": "list"},
        [PreparedSlide("S1", "P", "train", 5, "embeddings/S1.h5")],
    )
    manifest.save(prep)
    training = assemble_training_set(PreparedDataset.load(prep), num_aug_ratio=2, seed=0)
    assert training.n_spots == 5 and training.n_dropped == 2 and len(training) == 3 * 3
    np.testing.assert_allclose(training.targets, np.log2(1 + np.array([[1, 3], [7, 0], [0, 1]])), rtol=1e-6)
    kept_spots = [0, 3, 4]
    np.testing.assert_array_equal(training.conditions[:3], embeddings[kept_spots])
    views = draw_augmentations(5, 2, seed=0)[kept_spots]
    aug_rows = training.conditions[3:]
    for row, spot in enumerate(np.repeat(np.arange(3), 2)):
        view = views[spot, row % 2]
        np.testing.assert_array_equal(aug_rows[row], embeddings[kept_spots[spot]] + 1000 * (view + 1))
    np.testing.assert_array_equal(training.spot_of_row, [0, 1, 2, 0, 0, 1, 1, 2, 2])


# ---------------------------------------------------------------------- resume
def test_resume_continues_a_killed_run_exactly(
    prepared_synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = [
        "fit",
        str(prepared_synthetic),
        *TINY,
        "--max-steps",
        "30",
        "--global-batch-size",
        "32",
        "--log-every",
        "5",
        "--ckpt-every",
        "10",
        "--val-every",
        "10",
        "--val-spots",
        "16",
        "--val-sample-steps",
        "2",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*common, "--out", str(straight)]) == 0

    real_update, calls = fit.update_ema, []

    def update_then_die(*args, **kwargs):
        real_update(*args, **kwargs)
        calls.append(1)
        if len(calls) == 17:  # after the step-10 checkpoint and the step-15 log line
            raise KeyboardInterrupt

    monkeypatch.setattr(fit, "update_ema", update_then_die)
    assert main([*common, "--out", str(killed)]) == 130
    monkeypatch.setattr(fit, "update_ema", real_update)
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    assert [r["step"] for r in _log(killed)] == [5, 10, 15]

    assert main([*common, "--out", str(killed), "--resume"]) == 0
    resumed, reference = _log(killed), _log(straight)
    assert [r["step"] for r in resumed] == [5, 10, 15, 20, 25, 30]  # the step-15 line of the killed run was cut
    for ours, theirs in zip(resumed, reference, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-7)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6)
    for ours, theirs in zip(_log(killed, "val"), _log(straight, "val"), strict=True):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-6)
    final_ours, final_theirs = _weights(killed / fit.FINAL_CHECKPOINT), _weights(straight / fit.FINAL_CHECKPOINT)
    for key, value in final_theirs.items():
        torch.testing.assert_close(final_ours[key], value, rtol=1e-6, atol=1e-7)

    # resuming with another model or other genes is refused, naming both sides
    assert main([*common, "--out", str(killed), "--resume", "--hidden-size", "48", "--max-steps", "40"]) == 2
    assert main([*common, "--out", str(killed), "--resume", "--seed", "1", "--max-steps", "40"]) == 2


def test_resume_errors(prepared_synthetic: Path, fitted_synthetic_run: Path, tmp_path: Path, capsys) -> None:
    base = ["fit", str(prepared_synthetic), *TINY, "--max-steps", "2", "--global-batch-size", "8", "--val-every", "0"]
    assert main([*base, "--out", str(fitted_synthetic_run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "hidden_size 64 vs 32" in err and "step_0000400" in err
    assert main([*base, "--out", str(fitted_synthetic_run)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "big"), "--global-batch-size", "100000"]) == 2
    assert "--global-batch-size" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "not_prepared"), "--out", str(tmp_path / "run")]) == 2
    assert "stem-train prepare" in capsys.readouterr().err


# ---------------------------------------------------------------------- DDP
def test_torchrun_two_ranks_match_one_process(prepared_synthetic: Path, tmp_path: Path) -> None:
    options = [
        *TINY,
        "--max-steps",
        "4",
        "--global-batch-size",
        "16",
        "--num-aug-ratio",
        "3",
        "--log-every",
        "1",
        "--ckpt-every",
        "4",
        "--val-every",
        "0",
    ]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["fit", str(prepared_synthetic), "--out", str(single), *options]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "-m",
            "stem_train.cli",
            "fit",
            str(prepared_synthetic),
            "--out",
            str(ddp),
            *options,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    draws = dict(re.findall(r"rank (\d)/2: augmentation draw (\w+)", result.stdout))
    assert set(draws) == {"0", "1"} and draws["0"] == draws["1"]
    assert json.loads((single / fit.RUN_FILE).read_text())["augmentation_fingerprint"] == draws["0"]
    assert json.loads((ddp / fit.RUN_FILE).read_text())["world_size"] == 2

    for name in (fit.FINAL_CHECKPOINT, "checkpoints/step_0000004"):
        ours, theirs = _weights(ddp / name), _weights(single / name)
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    config = json.loads((ddp / fit.FINAL_CHECKPOINT / "config.json").read_text())
    assert (
        config["architecture"]
        == json.loads((single / fit.FINAL_CHECKPOINT / "config.json").read_text())["architecture"]
    )
    # same global batches and noise: the two-rank losses equal the single process's up to float sums
    for ours, theirs in zip(_log(ddp), _log(single), strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-3)


def test_fit_records_the_training_targets_range_for_clipping(
    fitted_synthetic_run: Path, prepared_synthetic: Path
) -> None:
    manifest = PreparedDataset.load(prepared_synthetic)
    targets = assemble_training_set(manifest, num_aug_ratio=0).targets  # views share their spots' targets
    for folder in (fitted_synthetic_run / fit.FINAL_CHECKPOINT, fitted_synthetic_run / "checkpoints" / "step_0000400"):
        recorded = load_checkpoint(folder).target_range
        np.testing.assert_allclose(recorded["min"], targets.min(axis=0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(recorded["max"], targets.max(axis=0), rtol=0, atol=1e-6)
        assert len(recorded["min"]) == len(manifest.genes)


def test_training_options_left_unset_come_from_the_preset() -> None:
    import argparse

    from napari_stem.stem.model_config import TRAINING_DEFAULTS

    parser = argparse.ArgumentParser()
    fit.add_parser(parser.add_subparsers())
    for preset, expected in TRAINING_DEFAULTS.items():
        args = parser.parse_args(["fit", "prep", "--out", "run", "--preset", preset])
        fit.apply_preset_defaults(args)
        assert {name: getattr(args, name) for name in expected} == expected
    # An option given on the command line wins over the preset.
    args = parser.parse_args(
        ["fit", "prep", "--out", "run", "--preset", "stem-small", "--lr", "3e-4", "--num-aug-ratio", "0"]
    )
    fit.apply_preset_defaults(args)
    assert (args.lr, args.num_aug_ratio, args.ema_decay) == (3e-4, 0, TRAINING_DEFAULTS["stem-small"]["ema_decay"])
    assert TRAINING_DEFAULTS["stem-small"] != TRAINING_DEFAULTS["stem-reference"]
