"""Checkpoints: safe round trips, atomic writes, reference import, clear errors for bad files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

import napari_stem.stem.checkpoint as ckpt
from napari_stem.errors import CheckpointError
from napari_stem.stem.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from napari_stem.stem.model import StemConfig, StemModel
from napari_stem.stem.reference_import import import_reference_checkpoint, reference_to_ours
from reference_fixture import COND_DIM, N_GENES, NUM_HEADS, REFERENCE_ARGS, REFERENCE_STEP, write_gene_list
from reference_fixture import REFERENCE_PT as FIXTURE_PT

TINY = StemConfig(n_genes=6, cond_dim=4, hidden_size=16, depth=1, num_heads=2)
GENES = ["ACTB", "GAPDH", "CD74", "KRT8", "EPCAM", "VIM"]
EMBEDDING = {"encoder": "uni+conch", "dim": 4, "patch_mode": "stem-native", "patch_size_um": 112.0}


def _model(seed: int) -> StemModel:
    torch.manual_seed(seed)
    model = StemModel(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, StemModel, StemModel]:
    ema, raw = _model(0), _model(1)
    path = save_checkpoint(
        tmp_path / "run" / "final",
        config=TINY,
        genes=GENES,
        ema=ema,
        model=raw,
        embedding=EMBEDDING,
        provenance={"steps": 1234, "data": "synthetic"},
    )
    return path, ema, raw


@pytest.fixture
def gene_file(tmp_path: Path) -> Path:
    return write_gene_list(tmp_path / "selected_gene_list.txt", trailer="\n\n")


def test_round_trip_restores_weights_genes_and_specs(saved) -> None:
    path, ema, raw = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.safetensors"]
    loaded = load_checkpoint(path, expected_genes=GENES, expected_cond_dim=4)
    assert loaded.config == TINY and loaded.genes == GENES and loaded.target_transform == "log2p1"
    assert loaded.embedding.to_dict() == EMBEDDING and loaded.provenance == {"steps": 1234, "data": "synthetic"}
    assert not loaded.model.training
    for name, tensor in ema.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    training = load_checkpoint(path / "config.json", weights="model")  # a file inside works too
    assert all(torch.equal(training.model.state_dict()[k], v) for k, v in raw.state_dict().items())
    x, t, y = torch.randn(2, 1, 6), torch.tensor([1, 900]), torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), ema.eval()(x, t, y), rtol=0, atol=0)
    assert read_metadata(path)["genes"] == GENES


def test_numpy_values_in_specs_are_stored_as_json(tmp_path: Path) -> None:
    import numpy as np

    spec = {"encoder": "uni", "dim": np.int64(4), "um_per_px": np.float32(0.5), "crop": np.array([224, 224])}
    path = save_checkpoint(
        tmp_path / "c", config=TINY, genes=GENES, ema=_model(0), embedding=spec, provenance={"data": tmp_path / "hest"}
    )
    loaded = load_checkpoint(path)
    assert loaded.embedding.to_dict() == {"encoder": "uni", "dim": 4, "um_per_px": 0.5, "crop": [224, 224]}
    assert loaded.provenance == {"data": str(tmp_path / "hest")}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "d", config=TINY, genes=GENES, ema=_model(0), embedding={"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_loading_never_unpickles(saved, monkeypatch) -> None:
    path, _, _ = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    assert load_checkpoint(path).genes == GENES


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    def crash_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", config=TINY, genes=GENES, ema=_model(0))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_old_checkpoint(saved, monkeypatch) -> None:
    path, ema, _ = saved
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(path, config=TINY, genes=GENES, ema=_model(5))
    monkeypatch.setattr(ckpt, "_write_weights", lambda tensors, file: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_checkpoint(path, config=TINY, genes=GENES, ema=_model(5), overwrite=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["final"]
    assert torch.equal(load_checkpoint(path).model.final_layer.linear.weight, ema.final_layer.linear.weight)
    monkeypatch.undo()
    save_checkpoint(path, config=TINY, genes=GENES, ema=_model(5), overwrite=True)
    assert torch.equal(load_checkpoint(path).model.final_layer.linear.weight, _model(5).final_layer.linear.weight)
    assert sorted(p.name for p in path.parent.iterdir()) == ["final"]


def test_save_rejects_a_gene_list_that_does_not_fit(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="5 gene names for a model of 6 genes"):
        save_checkpoint(tmp_path / "c", config=TINY, genes=GENES[:5], ema=_model(0))
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        save_checkpoint(
            tmp_path / "c",
            config=TINY,
            genes=GENES,
            ema=StemModel(StemConfig(n_genes=6, cond_dim=5, hidden_size=16, depth=1, num_heads=2)),
        )
    assert not (tmp_path / "c").exists()


def test_gene_and_condition_mismatches_name_both_sides(saved) -> None:
    path, _, _ = saved
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expected_genes=GENES[:5] + ["MKI67", "TOP2A"])
    message = str(err.value)
    assert str(path) in message and "predicts 6 genes" in message and "7 genes" in message
    assert "MKI67" in message and "VIM" in message
    with pytest.raises(
        CheckpointError, match=r"different order \(position 0: 'ACTB' in the checkpoint, 'GAPDH' expected\)"
    ):
        load_checkpoint(path, expected_genes=[GENES[1], GENES[0], *GENES[2:]])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, expected_cond_dim=1536)
    message = str(err.value)
    assert str(path) in message and "4-dim" in message and "1536-dim" in message and "uni+conch" in message


def test_missing_and_malformed_checkpoints(tmp_path: Path, saved) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_checkpoint(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    path, _, _ = saved
    (path / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights.safetensors"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="import_reference_checkpoint"):
        load_checkpoint(FIXTURE_PT)
    (path / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)


def test_import_reference_checkpoint_infers_the_architecture(tmp_path: Path, gene_file: Path) -> None:
    imported = import_reference_checkpoint(
        FIXTURE_PT,
        gene_file,
        num_heads=NUM_HEADS,
        out_path=tmp_path / "imported",
        embedding={"encoder": "random", "dim": COND_DIM},
    )
    assert imported.config == StemConfig(
        n_genes=N_GENES,
        cond_dim=COND_DIM,
        hidden_size=REFERENCE_ARGS["hidden_size"],
        depth=REFERENCE_ARGS["depth"],
        num_heads=NUM_HEADS,
        mlp_ratio=REFERENCE_ARGS["mlp_ratio"],
    )
    assert imported.genes == [f"G{i}" for i in range(N_GENES)] and not imported.model.training
    reference = torch.load(FIXTURE_PT, weights_only=True)
    ours = reference_to_ours(reference["ema"])
    assert all(torch.equal(imported.model.state_dict()[k], v) for k, v in ours.items())
    loaded = load_checkpoint(tmp_path / "imported", expected_genes=imported.genes, expected_cond_dim=COND_DIM)
    assert loaded.provenance["steps"] == REFERENCE_STEP and loaded.provenance["source"] == "reference-import"
    assert loaded.embedding.to_dict() == {"encoder": "random", "dim": COND_DIM}
    raw = load_checkpoint(tmp_path / "imported", weights="model").model.state_dict()
    assert all(torch.equal(raw[k], v) for k, v in reference_to_ours(reference["model"]).items())


def test_import_uses_weights_only_and_accepts_converted_state_dicts(tmp_path, gene_file, monkeypatch) -> None:
    converted = tmp_path / "kidney_state_dict.pt"
    torch.save({"ema": torch.load(FIXTURE_PT, weights_only=True)["ema"]}, converted)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    imported = import_reference_checkpoint(converted, gene_file, num_heads=NUM_HEADS)
    assert calls and all(call.get("weights_only") is True for call in calls)
    assert imported.config.n_genes == N_GENES and imported.provenance["steps"] is None


def test_full_model_pickles_are_refused_with_a_conversion_recipe(tmp_path: Path, gene_file: Path) -> None:
    full = tmp_path / "kidney_hmhvg_full_model.pt"
    torch.save(torch.nn.Linear(2, 2), full)  # a pickled module, like the released Stem weights
    with pytest.raises(CheckpointError) as err:
        import_reference_checkpoint(full, gene_file)
    message = str(err.value)
    assert "contains pickled code" in message and "refuses it for safety" in message and str(full) in message
    assert "trusted environment" in message and "re-running" not in message.lower()
    assert 'torch.load("kidney_hmhvg_full_model.pt", weights_only=False' in message
    assert 'torch.save({"ema": full_model.state_dict()}, "kidney_hmhvg_full_model_state_dict.pt")' in message


def test_import_errors_name_the_files(tmp_path: Path, gene_file: Path) -> None:
    short = write_gene_list(tmp_path / "genes_short.txt", n_genes=N_GENES - 1, trailer="")
    with pytest.raises(CheckpointError) as err:
        import_reference_checkpoint(FIXTURE_PT, short, num_heads=NUM_HEADS)
    assert f"has {N_GENES - 1} genes" in str(err.value) and f"trained on {N_GENES}" in str(err.value)
    assert str(short) in str(err.value) and str(FIXTURE_PT) in str(err.value)
    with pytest.raises(CheckpointError, match="pass num_heads"):
        import_reference_checkpoint(FIXTURE_PT, gene_file)
    with pytest.raises(CheckpointError, match="does not exist"):
        import_reference_checkpoint(tmp_path / "missing.pt", gene_file)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 4)
    with pytest.raises(CheckpointError, match="cannot read .* damaged .* Unsupported operand"):
        import_reference_checkpoint(junk, gene_file)
    wrong = tmp_path / "wrong.pt"
    torch.save({"weights": torch.zeros(2)}, wrong)
    with pytest.raises(CheckpointError, match="neither 'ema'/'model'"):
        import_reference_checkpoint(wrong, gene_file)


def test_reading_metadata_does_not_import_torch(saved) -> None:
    """The widget shows a checkpoint's genes and encoder the moment it is chosen: no 2 s torch import."""
    import subprocess
    import sys

    path = saved[0]
    code = (
        "import sys, napari_stem.stem.checkpoint as c\n"
        f"meta = c.read_metadata({str(path)!r})\n"
        "print(len(meta['genes']), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [str(len(GENES)), "False"]


def test_the_training_range_round_trips_and_is_checked(tmp_path: Path) -> None:
    target_range = {"min": [0.0] * 6, "max": [1.0, 2.0, 3.0, 4.0, 5.0, 6.5]}
    path = save_checkpoint(tmp_path / "ranged", config=TINY, genes=GENES, ema=_model(0), target_range=target_range)
    assert load_checkpoint(path).target_range == target_range
    assert (
        load_checkpoint(save_checkpoint(tmp_path / "plain", config=TINY, genes=GENES, ema=_model(0))).target_range
        is None
    )
    for bad in (
        {"min": [0.0] * 5, "max": [1.0] * 5},
        {"min": [2.0] * 6, "max": [1.0] * 6},
        {"min": [0.0] * 6, "max": [float("nan")] * 6},
        {"low": [0.0] * 6},
    ):
        with pytest.raises(CheckpointError, match="target_range"):
            save_checkpoint(tmp_path / "bad", config=TINY, genes=GENES, ema=_model(0), target_range=bad)
    config = json.loads((path / "config.json").read_text())
    config["target_range"]["max"][0] = -1.0  # edited by hand
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="target_range"):
        load_checkpoint(path)
