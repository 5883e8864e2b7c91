"""``stem-train import-reference``: the reference trainer's checkpoint into our format, safely."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from reference_fixture import COND_DIM, N_GENES, NUM_HEADS, REFERENCE_CASES, write_gene_list
from reference_fixture import REFERENCE_PT as FIXTURE
from stem_train.cli import main


@pytest.fixture
def gene_list(tmp_path: Path) -> Path:
    return write_gene_list(tmp_path / "selected_gene_list.txt", prefix="GENE")


def test_import_writes_a_checkpoint_the_sampler_uses(
    tmp_path: Path, gene_list: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_stem.embedding.encoders as encoders
    from napari_stem.stem.checkpoint import load_checkpoint
    from napari_stem.stem.sampling import sample_expression

    # the fixture's tiny model has a COND_DIM-d condition; stand in an encoder of that width
    monkeypatch.setattr(encoders, "get_encoder_spec", lambda name: SimpleNamespace(dim=COND_DIM))
    out = tmp_path / "converted"
    assert (
        main(
            [
                "import-reference",
                str(FIXTURE),
                "--genes",
                str(gene_list),
                "--out",
                str(out),
                "--num-heads",
                str(NUM_HEADS),
                "--encoder",
                "tiny64",
            ]
        )
        == 0
    )
    loaded = load_checkpoint(out)
    assert loaded.genes[:2] == ["GENE0", "GENE1"] and loaded.config.cond_dim == COND_DIM
    assert loaded.embedding.encoder == "tiny64" and loaded.embedding.patch_mode == "stem-native"
    cases = np.load(REFERENCE_CASES)
    prediction = sample_expression(loaded, cases["y"][:2], n_samples=2, steps=3, device="cpu")
    assert prediction.mean.shape == (2, N_GENES)


def test_import_refuses_a_mismatched_encoder_and_gene_list(
    tmp_path: Path, gene_list: Path, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(
            [
                "import-reference",
                str(FIXTURE),
                "--genes",
                str(gene_list),
                "--out",
                str(tmp_path / "x"),
                "--num-heads",
                str(NUM_HEADS),
            ]
        )
        == 2
    )
    assert f"{COND_DIM}-d" in capsys.readouterr().err and not (tmp_path / "x").exists()
    short = tmp_path / "short.txt"
    short.write_text("A\nB\n")
    assert (
        main(
            [
                "import-reference",
                str(FIXTURE),
                "--genes",
                str(short),
                "--out",
                str(tmp_path / "y"),
                "--num-heads",
                str(NUM_HEADS),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "short.txt" in error and str(N_GENES) in error
