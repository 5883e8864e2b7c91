"""``stem-train prepare``: embeddings + panel + manifest on the synthetic dataset, cache reuse, bad input."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import h5py
import pytest

from stem_train.cli import main
from stem_train.manifest import GENE_LIST_FILE, MANIFEST_FILE, SLIDE_LIST_FILE, PreparedDataset


def test_prepared_folder_contract(prepared_synthetic: Path) -> None:
    manifest = PreparedDataset.load(prepared_synthetic)
    assert [s.sample_id for s in manifest.slides] == ["SYN000", "SYN001", "SYN002", "SYN003"]
    assert [s.split for s in manifest.slides] == ["train", "train", "train", "test"]
    assert [s.patient for s in manifest.slides] == ["P0", "P0", "P1", "P1"]
    assert manifest.encoder == "efficientnet_lite0" and manifest.embedding_dim == 1280
    assert manifest.patch["mode"] == "hest"
    spec = {"encoder": "efficientnet_lite0", "dim": 1280, "patch": manifest.patch}
    assert manifest.embedding_spec().to_dict() == spec
    assert len(manifest.genes) == 20 and manifest.genes == sorted(manifest.genes)
    assert not any(g.startswith(("MT", "RPS", "RPL")) for g in manifest.genes)
    selection = manifest.gene_selection
    assert selection["method"] == "hmhvg" and selection["slides"] == ["SYN000", "SYN001", "SYN002"]
    assert selection["includes_held_out"] is False
    assert (prepared_synthetic / GENE_LIST_FILE).read_text().split() == manifest.genes
    assert (prepared_synthetic / SLIDE_LIST_FILE).read_text().split() == ["SYN000", "SYN001", "SYN002", "SYN003"]
    for slide in manifest.slides:  # the slide files' identity, for evaluate's leak check
        image = Path(slide.image)
        assert image.parent == Path(manifest.data_dir) / "wsis" and image.stem == slide.sample_id
        assert (
            slide.image_sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
            and slide.image_bytes == image.stat().st_size
        )
        with h5py.File(manifest.embeddings_path(slide)) as handle:
            assert handle["embeddings"].shape == (slide.n_spots, 1280)
            assert handle["embeddings_aug"].shape == (slide.n_spots, 7, 1280)


def _copy_embeddings(prepared: Path, out: Path) -> None:
    """Seed a new output folder with the fixture's embeddings so prepare reuses them (no re-embedding)."""
    shutil.copytree(prepared / "embeddings", out / "embeddings")


def test_rerun_reuses_cache_and_options_reach_the_manifest(
    synthetic_hest: Path, prepared_synthetic: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_stem.embedding.encoders

    def no_model(*args, **kwargs):
        raise AssertionError("the encoder was built although every slide's embeddings are cached")

    monkeypatch.setattr(napari_stem.embedding.encoders, "create_encoder", no_model)
    out = tmp_path / "prep"
    _copy_embeddings(prepared_synthetic, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    panel = tmp_path / "panel.txt"
    panel.write_text("SG0010\nSG0003\nMT-CO1\n")
    args = [
        "prepare",
        str(synthetic_hest),
        "--out",
        str(out),
        "--held-out",
        "SYN000,SYN003",
        "--gene-list",
        str(panel),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert capsys.readouterr().err.count("cached") >= 4
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()} == before
    manifest = PreparedDataset.load(out)
    assert manifest.genes == ["SG0010", "SG0003", "MT-CO1"]  # the file's order, no prefix filter
    assert manifest.gene_selection["method"] == "list"
    assert [s.sample_id for s in manifest.split("test")] == ["SYN000", "SYN003"]

    assert (
        main(
            [
                "prepare",
                str(synthetic_hest),
                "--out",
                str(out),
                "--held-out",
                "SYN003",
                "--n-genes",
                "5",
                "--include-held-out-in-gene-selection",
                "--genes-method",
                "hvg",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    manifest = PreparedDataset.load(out)
    assert manifest.gene_selection["slides"] == ["SYN000", "SYN001", "SYN002", "SYN003"]
    assert manifest.gene_selection["includes_held_out"] is True and len(manifest.genes) == 5


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--held-out", "SYN009"], "unknown sample(s) SYN009"),
        (["--held-out", "SYN000,SYN001,SYN002,SYN003"], "every slide is held out"),
        (["--n-genes", "400"], "--n-genes 27 or fewer"),
        (["--genes-method", "list"], "needs --gene-list"),
        (["--encoder", "no_such_encoder"], "unknown encoder 'no_such_encoder'"),
    ],
)
def test_bad_options_fail_before_writing(
    synthetic_hest: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    out = tmp_path / "prep"
    assert main(["prepare", str(synthetic_hest), "--out", str(out), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err  # one line, no traceback
    assert not out.exists()


def test_gene_list_naming_absent_genes(synthetic_hest: Path, tmp_path: Path, capsys) -> None:
    panel = tmp_path / "my_panel.txt"
    panel.write_text("SG0001\nNOT_A_GENE\n")
    out = tmp_path / "prep"
    assert main(["prepare", str(synthetic_hest), "--out", str(out), "--gene-list", str(panel)]) == 2
    err = capsys.readouterr().err
    assert "my_panel.txt" in err and "NOT_A_GENE" in err
    assert not (out / MANIFEST_FILE).exists()


def test_missing_data_folder(tmp_path: Path, capsys) -> None:
    assert main(["prepare", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_image_hash_is_streamed_and_reused_only_for_an_unchanged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stem_train import manifest as manifest_module

    slide = tmp_path / "S1.tif"
    slide.write_bytes(b"abc" * 5000)
    assert manifest_module.sha256_file(slide, chunk_bytes=1000) == hashlib.sha256(b"abc" * 5000).hexdigest()
    record = manifest_module.image_record(slide)
    previous = manifest_module.PreparedSlide("S1", "P", "train", 1, "embeddings/S1.h5", **record)
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: "rehashed")
    assert (
        manifest_module.image_record(slide, previous)["image_sha256"] == record["image_sha256"]
    )  # unchanged: not reread
    slide.write_bytes(b"abd" * 5000)  # same size, new content and time
    os.utime(slide, ns=(record["image_mtime_ns"] + 10**9, record["image_mtime_ns"] + 10**9))
    assert manifest_module.image_record(slide, previous)["image_sha256"] == "rehashed"
