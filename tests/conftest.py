"""Shared fixtures: real demo files (cached), a small synthetic HEST dataset, isolated napari settings."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent


@pytest.fixture(autouse=True, scope="session")
def _isolated_napari_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep napari's settings out of the user's home; keep the asset cache shared."""
    settings = tmp_path_factory.mktemp("napari-settings")
    os.environ["NAPARI_CONFIG"] = str(settings / "settings.yaml")
    os.environ.setdefault("NAPARI_STEM_CACHE", str(Path.home() / ".cache" / "napari-stem"))


@pytest.fixture(autouse=True)
def _torch_survives_napari():
    """Once a test has opened napari on Mesa, block triton as the widget does (napari_stem.plugin.torch_guard):
    otherwise a later test importing torchvision (timm encoders) crashes the run, depending on order."""
    yield
    from napari_stem.plugin.torch_guard import block_triton_if_llvm_loaded

    block_triton_if_llvm_loaded()


@pytest.fixture(scope="session")
def demo_slide_file() -> Path:
    """The real H&E slide cmu_small_region.svs (2220 × 2967 px, 0.499 µm/px)."""
    from napari_stem.datasets import demo_slide_path

    return demo_slide_path()


@pytest.fixture(scope="session")
def synthetic_hest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small synthetic HEST samples (two patients), 30 genes; shared read-only by tests."""
    from napari_stem.synthetic import make_demo_dataset

    root = tmp_path_factory.mktemp("synthetic_hest")
    make_demo_dataset(root, n_slides=4, n_genes=30, seed=7, slide_size_um=1200.0)
    return root


@pytest.fixture(scope="session")
def spaceranger_outs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scanpy's real mini spaceranger ``outs/`` (Visium 1.0.0), from the scanpy sdist, cached."""
    from napari_stem.datasets import cache_dir

    target = cache_dir() / "scanpy-visium-1.0.0"
    if not (target / "filtered_feature_bc_matrix.h5").exists():
        download = tmp_path_factory.mktemp("scanpy-sdist")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "scanpy==1.11.5",
                "-d",
                str(download),
            ],
            check=True,
            capture_output=True,
        )
        archive = next(download.glob("scanpy-*.tar.gz"))
        prefix = "scanpy-1.11.5/tests/_data/visium_data/1.0.0/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            partial = target.with_name(target.name + ".part")
            for member in members:
                member.name = member.name[len(prefix) :]
                tar.extract(member, partial, filter="data")
        partial.replace(target)
    return target


#: Options of the shared training run (small model, short EMA: a few hundred CPU steps that learn).
SYNTHETIC_FIT_ARGS = (
    "--preset",
    "stem-small",
    "--hidden-size",
    "64",
    "--depth",
    "2",
    "--num-heads",
    "4",
    "--max-steps",
    "400",
    "--global-batch-size",
    "128",
    "--lr",
    "2e-3",
    "--ema-decay",
    "0.98",
    "--log-every",
    "50",
    "--val-every",
    "200",
    "--ckpt-every",
    "200",
    "--val-samples",
    "2",
    "--device",
    "cpu",
)


@pytest.fixture(scope="session")
def prepared_synthetic(synthetic_hest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``stem-train prepare`` of ``synthetic_hest``: efficientnet_lite0 on CPU, hest patches, SYN003
    held out (test split), HMHVG panel of 20 genes chosen on SYN000-SYN002. Returns PREP_DIR (read-only)."""
    from stem_train.cli import main

    out = tmp_path_factory.mktemp("prepared_synthetic")
    code = main(
        [
            "prepare",
            str(synthetic_hest),
            "--out",
            str(out),
            "--held-out",
            "SYN003",
            "--n-genes",
            "20",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def fitted_synthetic_run(prepared_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``stem-train fit`` on ``prepared_synthetic`` with :data:`SYNTHETIC_FIT_ARGS` (seed 0, CPU).
    Returns RUN_DIR; RUN_DIR/checkpoint is the final EMA checkpoint (read-only).

    Trained on one intra-op thread: a tiny model's ops are too small to split, and on a busy
    machine two threads were 10-20x slower (spin waits); the result is the same either way.
    """
    import torch

    from stem_train.cli import main

    out = tmp_path_factory.mktemp("fitted_synthetic_run") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["fit", str(prepared_synthetic), "--out", str(out), *SYNTHETIC_FIT_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    return out
