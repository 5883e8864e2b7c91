"""``stem-train predict``: HEST folders, single slides with a tissue grid, rank sharding, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, synthetic_hest: Path) -> Path:
    """An untrained small Stem model on efficientnet_lite0 embeddings for five synthetic genes."""
    import anndata

    genes = list(anndata.read_h5ad(synthetic_hest / "st" / "SYN003.h5ad", backed="r").var_names[:5])
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", genes)


@pytest.fixture(scope="module")
def hest_prediction(
    tmp_path_factory: pytest.TempPathFactory, synthetic_hest: Path, tiny_checkpoint: Path
) -> dict[str, Path]:
    from stem_train.cli import main

    root = tmp_path_factory.mktemp("predict")
    out, cache = root / "predictions", root / "cache"
    code = main(
        [
            "predict",
            str(synthetic_hest),
            "--checkpoint",
            str(tiny_checkpoint),
            "--sample-ids",
            "SYN003",
            "--out",
            str(out),
            "--samples",
            "8",
            "--steps",
            "3",
            "--device",
            "cpu",
            "--keep-samples",
            "--median",
            "--cache-dir",
            str(cache),
            "--batch-size",
            "16",
            "--precision",
            "fp32",
        ]
    )
    assert code == 0
    return {"out": out, "cache": cache, "root": root}


def test_predict_hest_sample_is_scanpy_ready_and_evaluable(
    hest_prediction: dict[str, Path], synthetic_hest: Path, tiny_checkpoint: Path
) -> None:
    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    from stem_train.evaluate import evaluate_files

    path = hest_prediction["out"] / "SYN003.h5ad"
    assert sorted(p.name for p in hest_prediction["out"].iterdir()) == ["SYN003.h5ad"]  # nothing half-written left
    adata = anndata.read_h5ad(path)
    truth = anndata.read_h5ad(synthetic_hest / "st" / "SYN003.h5ad")
    assert list(adata.obs_names) == list(truth.obs_names) and adata.n_vars == 5
    # --samples 8 cannot give exact 50 % / 90 % intervals (the default --intervals): raised to 19
    assert {"variance", "lo50", "hi50", "lo90", "hi90", "median"} <= set(adata.layers)
    assert not any(name.startswith("q") for name in adata.layers)
    assert adata.obsm["samples"].shape == (truth.n_obs, 19 * 5)
    declared = json.loads(adata.uns["napari_stem"]["intervals_json"])
    assert [
        (d["level"], d["n_samples"], d["rank"], d["exact"], d["lower_layer"], d["upper_layer"]) for d in declared
    ] == [(0.5, 19, 5, True, "lo50", "hi50"), (0.9, 19, 1, True, "lo90", "hi90")]
    samples = np.sort(adata.obsm["samples"].reshape(truth.n_obs, 19, 5), axis=1)
    np.testing.assert_array_equal(adata.layers["lo90"], samples[:, 0])
    np.testing.assert_array_equal(adata.layers["hi50"], samples[:, 14])
    np.testing.assert_allclose(adata.obsm["spatial"], truth.obsm["spatial"])
    axes = sc.pl.spatial(adata, color=[adata.var_names[0]], library_id="ST", img_key="downscaled_fullres", show=False)
    assert len(axes) == 1 and axes[0].get_images()  # drawn over the slide thumbnail
    matplotlib.pyplot.close("all")

    report = evaluate_files(path, synthetic_hest / "st" / "SYN003.h5ad", hest_prediction["root"] / "eval", plots=False)
    assert report["calibration"]["source"] == "samples" and report["calibration"]["n_samples"] == 19
    assert [check["layers"] for check in report["calibration"]["written_intervals"]] == [
        ["lo50", "hi50"],
        ["lo90", "hi90"],
    ]
    assert report["provenance"]["checkpoint"] == str(tiny_checkpoint)
    assert report["provenance"]["precision"] == "fp32"  # --precision reaches the sampler ...
    import h5py

    (cache_file,) = hest_prediction["cache"].rglob("*.h5")
    with h5py.File(cache_file, "r") as handle:
        assert handle.attrs["precision"] == "fp32"  # ... and the encoder


def test_predict_shards_slides_across_ranks(
    hest_prediction: dict[str, Path],
    synthetic_hest: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stem_train.cli import main
    from stem_train.predict import plan_jobs, shard

    jobs = plan_jobs(synthetic_hest, tmp_path, sample_ids=["SYN000", "SYN001", "SYN002", "SYN003"])
    assert [job.name for job in shard(jobs, 1, 3)] == ["SYN001"]
    assert [job.name for job in shard(jobs, 0, 3)] == ["SYN000", "SYN003"]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(
        [
            "predict",
            str(synthetic_hest),
            "--checkpoint",
            str(tiny_checkpoint),
            "--sample-ids",
            "SYN000,SYN003",
            "--out",
            str(tmp_path / "out"),
            "--samples",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--cache-dir",
            str(hest_prediction["cache"]),
        ]
    )  # SYN003's embeddings are cached: no encoder run
    assert code == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["SYN003.h5ad"]


def test_predict_slide_on_a_tissue_grid(synthetic_hest: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import anndata

    from stem_train.cli import main

    out = tmp_path / "grid.h5ad"
    code = main(
        [
            "predict",
            str(synthetic_hest / "wsis" / "SYN000.tif"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--grid-pitch-um",
            "300",
            "--samples",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--intervals",
            "",
        ]
    )
    assert code == 0
    adata = anndata.read_h5ad(out)
    assert 0 < adata.n_obs < 30 and all("x" in barcode for barcode in adata.obs_names)
    assert "downscaled_fullres" in adata.uns["spatial"]["ST"]["images"]
    assert set(adata.layers) == {"variance"} and "intervals_json" not in adata.uns["napari_stem"]
    assert json.loads(adata.uns["napari_stem"]["provenance_json"])["n_samples"] == 2  # no intervals: as asked


def test_predict_raises_samples_for_exact_intervals_and_refuses_quantiles(
    synthetic_hest: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import anndata

    from stem_train.cli import main

    out = tmp_path / "half.h5ad"
    code = main(
        [
            "predict",
            str(synthetic_hest / "wsis" / "SYN000.tif"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--grid-pitch-um",
            "300",
            "--samples",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--intervals",
            "0.5",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "drawing 3 samples per spot instead of --samples 2" in printed and "1.5x as long" in printed
    adata = anndata.read_h5ad(out)
    assert {"lo50", "hi50"} <= set(adata.layers)
    (declared,) = json.loads(adata.uns["napari_stem"]["intervals_json"])
    assert (
        declared["level"] == 0.5 and declared["n_samples"] == 3 and declared["label"] == "50 % interval from 3 samples"
    )

    assert (
        main(
            [
                "predict",
                str(synthetic_hest / "wsis" / "SYN000.tif"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "q.h5ad"),
                "--quantiles",
                "0.05,0.95",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--intervals 0.5,0.9" in err and "not interval ends" in err
    assert not (tmp_path / "q.h5ad").exists()


def test_predict_errors_name_the_file(
    synthetic_hest: Path,
    tiny_checkpoint: Path,
    hest_prediction: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    import anndata

    from napari_stem.stem.checkpoint import save_checkpoint
    from napari_stem.stem.model import StemConfig, StemModel
    from stem_train.cli import main

    slide = str(synthetic_hest / "wsis" / "SYN003.tif")
    assert main(["predict", slide, "--checkpoint", str(tmp_path / "missing_ckpt")]) == 2
    assert "missing_ckpt" in capsys.readouterr().err

    no_coordinates = tmp_path / "no_coords.h5ad"
    adata = anndata.read_h5ad(synthetic_hest / "st" / "SYN003.h5ad")
    del adata.obsm["spatial"]
    adata.write_h5ad(no_coordinates)
    assert (
        main(
            [
                "predict",
                slide,
                "--checkpoint",
                str(tiny_checkpoint),
                "--spots",
                str(no_coordinates),
                "--out",
                str(tmp_path / "o.h5ad"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no_coords.h5ad" in err and "obsm['spatial']" in err

    assert main(["predict", str(synthetic_hest), "--checkpoint", str(tiny_checkpoint), "--sample-ids", "NOPE"]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert (
        main(
            ["predict", str(synthetic_hest), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "one.h5ad")]
        )
        == 2
    )
    assert "give a folder" in capsys.readouterr().err

    config = StemConfig(n_genes=2, cond_dim=64, hidden_size=16, depth=1, num_heads=2)
    other = save_checkpoint(
        tmp_path / "other_encoder",
        config=config,
        genes=["A", "B"],
        ema=StemModel(config),
        embedding={"encoder": "efficientnet_lite0", "patch": {"mode": "hest"}},
    )
    code = main(
        [
            "predict",
            str(synthetic_hest),
            "--checkpoint",
            str(other),
            "--sample-ids",
            "SYN003",
            "--out",
            str(tmp_path / "x"),
            "--device",
            "cpu",
            "--cache-dir",
            str(hest_prediction["cache"]),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "other_encoder" in err and "1280-d" in err and "64-d" in err
    assert not (tmp_path / "x" / "SYN003.h5ad").exists()
