"""What napari-stem refuses: ordinary mistakes never destroy files, never give NaN with exit 0,
never crash; each is refused before the work with a message naming the value and the fix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from reference_fixture import COND_DIM, N_GENES, NUM_HEADS, REFERENCE_PT
from stem_train.cli import main
from tiny_models import save_tiny_checkpoint


# ---------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit code and stderr of ``stem-train ARGS`` (argparse refusals included)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = int(exc.code)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def genes(synthetic_hest: Path) -> list[str]:
    import anndata

    return list(anndata.read_h5ad(synthetic_hest / "st" / "SYN003.h5ad", backed="r").var_names[:4])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, genes: list[str]) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("bad-input-ckpt") / "tiny", genes)


@pytest.fixture
def workspace(tmp_path: Path, synthetic_hest: Path) -> dict[str, Path]:
    """A copy of one synthetic slide and its spots that tests may point outputs at."""
    slide = tmp_path / "slide.tif"
    shutil.copy(synthetic_hest / "wsis" / "SYN003.tif", slide)
    spots = tmp_path / "spots.h5ad"
    shutil.copy(synthetic_hest / "st" / "SYN003.h5ad", spots)
    return {"root": tmp_path, "slide": slide, "spots": spots}


def few_spots(
    source: Path,
    target: Path,
    n: int = 4,
    shift_px: tuple[float, float] = (0.0, 0.0),
    shifted: int = 0,
    barcodes: list[str] | None = None,
) -> Path:
    """The first ``n`` spots of ``source``; the last ``shifted`` of them moved by ``shift_px``."""
    import anndata

    adata = anndata.read_h5ad(source)[:n].copy()
    if shifted:
        adata.obsm["spatial"][-shifted:] += np.asarray(shift_px)
    if barcodes is not None:
        adata.obs_names = barcodes
    adata.write_h5ad(target)
    return target


def predict_args(workspace: dict[str, Path], checkpoint: Path, spots: Path, out: Path, *extra: str) -> list:
    return [
        "predict",
        workspace["slide"],
        "--checkpoint",
        checkpoint,
        "--spots",
        spots,
        "--out",
        out,
        "--samples",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--intervals",
        "",
        "--precision",
        "fp32",
        *extra,
    ]


# ---------------------------------------------------------------------- data destroyed
def test_predict_never_writes_over_its_inputs_or_foreign_files(workspace, checkpoint, capsys) -> None:
    before = snapshot(workspace["root"])
    code, err = run_cli(predict_args(workspace, checkpoint, workspace["spots"], workspace["spots"]), capsys)
    assert code == 2 and "is an input of this run" in err and "spots.h5ad" in err
    other = workspace["root"] / "other_truth.h5ad"
    shutil.copy(workspace["spots"], other)
    before = snapshot(workspace["root"])
    code, err = run_cli(predict_args(workspace, checkpoint, workspace["spots"], other), capsys)
    assert code == 2 and "not a prediction napari-stem wrote" in err
    assert snapshot(workspace["root"]) == before


def test_predict_never_writes_into_a_hest_folders_own_truth(synthetic_hest, checkpoint, tmp_path, capsys) -> None:
    hest = tmp_path / "hest"
    shutil.copytree(synthetic_hest, hest)
    before = snapshot(hest)
    code, err = run_cli(
        ["predict", hest, "--checkpoint", checkpoint, "--out", hest / "st", "--sample-ids", "SYN003"], capsys
    )
    assert code == 2 and "SYN003.h5ad" in err and "is an input of this run" in err
    assert snapshot(hest) == before


def test_predict_cache_never_replaces_prepared_training_embeddings(
    prepared_synthetic, synthetic_hest, checkpoint, tmp_path, capsys
) -> None:
    prep = tmp_path / "prep"
    (prep / "embeddings").mkdir(parents=True)
    shutil.copy(prepared_synthetic / "manifest.json", prep / "manifest.json")
    shutil.copy(prepared_synthetic / "embeddings" / "SYN003.h5", prep / "embeddings" / "SYN003.h5")
    spots = few_spots(synthetic_hest / "st" / "SYN003.h5ad", tmp_path / "other_spots.h5ad")  # not the prepared spot set
    before = snapshot(prep)
    code, err = run_cli(
        [
            "predict",
            synthetic_hest / "wsis" / "SYN003.tif",
            "--checkpoint",
            checkpoint,
            "--spots",
            spots,
            "--out",
            tmp_path / "out.h5ad",
            "--cache-dir",
            prep / "embeddings",
            "--samples",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--intervals",
            "",
        ],
        capsys,
    )
    assert code == 2 and "prepared training embeddings" in err and "--cache-dir" in err
    assert snapshot(prep) == before and not (tmp_path / "out.h5ad").exists()


def test_import_reference_overwrite_replaces_only_its_own_checkpoints(tmp_path, capsys, monkeypatch) -> None:
    import napari_stem.embedding.encoders as encoders

    n_genes, cond_dim = N_GENES, COND_DIM
    monkeypatch.setattr(encoders, "get_encoder_spec", lambda name: type("Spec", (), {"dim": cond_dim})())
    gene_list = tmp_path / "genes.txt"
    gene_list.write_text("\n".join(f"G{i}" for i in range(n_genes)))
    args = [
        "import-reference",
        REFERENCE_PT,
        "--genes",
        gene_list,
        "--num-heads",
        str(NUM_HEADS),
        "--encoder",
        "tiny",
        "--overwrite",
    ]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "diary.txt").write_text("my notes")
    plain = tmp_path / "plain_file"
    plain.write_text("keep me")
    before = snapshot(tmp_path)
    for target, reason in ((notes, "did not write"), (plain, "it is a file")):
        code, err = run_cli([*args, "--out", target], capsys)
        assert code == 2 and "refusing to replace" in err and reason in err
    assert snapshot(tmp_path) == before
    own = tmp_path / "converted"
    assert run_cli([*args, "--out", own], capsys)[0] == 0
    assert run_cli([*args, "--out", own], capsys)[0] == 0  # an earlier import is napari-stem's own: replaced
    assert sorted(p.name for p in own.iterdir()) == ["config.json", "weights.safetensors"]
    (own / "README.txt").write_text("added by the user")
    code, err = run_cli([*args, "--out", own], capsys)
    assert code == 2 and "README.txt" in err and (own / "README.txt").exists()


# ---------------------------------------------------------------------- garbage with exit 0
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(checkpoint, workspace, tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from napari_stem.errors import CheckpointError
    from napari_stem.stem.checkpoint import load_checkpoint

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    tensors = load_file(str(damaged / "weights.safetensors"))
    name = sorted(k for k in tensors if k.startswith("ema."))[3]
    tensors[name][..., 0] = float("nan")
    save_file(tensors, str(damaged / "weights.safetensors"))
    with pytest.raises(CheckpointError, match=f"non-finite weights .*'{name.removeprefix('ema.')}'"):
        load_checkpoint(damaged)
    out = tmp_path / "prediction.h5ad"
    code, err = run_cli(predict_args(workspace, damaged, workspace["spots"], out), capsys)
    assert code == 2 and "non-finite weights" in err and not out.exists()


def test_non_finite_samples_are_never_written(checkpoint) -> None:
    import torch

    from napari_stem.errors import StemError
    from napari_stem.predict import predict
    from napari_stem.spots import Spots
    from napari_stem.stem.checkpoint import load_checkpoint
    from napari_stem.values import PredictOptions

    loaded = load_checkpoint(checkpoint)
    with torch.no_grad():  # a network that diverges after loading (the load check cannot see it)
        for parameter in loaded.model.parameters():
            parameter.fill_(float("nan"))
    spots = Spots(centers_px=np.array([[10.0, 10.0], [20.0, 20.0]]), diameter_px=5.0, mpp=0.5)
    with pytest.raises(StemError, match="non-finite values .* Nothing was written"):
        predict(
            "unused.tif",
            spots,
            loaded,
            PredictOptions(n_samples=2, steps=2, device="cpu"),
            embeddings=np.zeros((2, loaded.config.cond_dim)),
        )


def test_checkpoint_whose_config_lists_other_genes_is_refused_before_any_work(
    checkpoint, workspace, tmp_path, capsys
) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(checkpoint, edited)
    config = json.loads((edited / "config.json").read_text())
    config["genes"] = config["genes"][:-1]
    (edited / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    code, err = run_cli(predict_args(workspace, edited, workspace["spots"], tmp_path / "p.h5ad"), capsys)
    assert code == 2 and f"lists {len(config['genes'])} genes but its model predicts {len(config['genes']) + 1}" in err
    assert time.perf_counter() - started < 1.0  # read from the config alone, nothing embedded


@pytest.mark.parametrize(
    ("command", "option", "value", "words"),
    [
        ("predict", "--samples", "1", "at least 2"),
        ("predict", "--samples", "0", "at least 2"),
        ("predict", "--samples", "-3", "at least 2"),
        ("predict", "--steps", "0", "between 1 and 1000"),
        ("predict", "--steps", "-1", "between 1 and 1000"),
        ("predict", "--steps", "5000", "between 1 and 1000"),
        ("predict", "--batch-size", "0", "at least 1"),
        ("predict", "--sample-batch-size", "0", "at least 1"),
        ("predict", "--grid-pitch-um", "0", "greater than 0"),
        ("predict", "--mpp", "1000", "at most 20"),
        ("predict", "--mpp", "0", "at least 0.05"),
        ("fit", "--lr", "nan", "finite number"),
        ("fit", "--lr", "inf", "finite number"),
        ("fit", "--max-steps", "0", "at least 1"),
        ("fit", "--global-batch-size", "0", "at least 1"),
        ("prepare", "--batch-size", "0", "at least 1"),
        ("make-demo-data", "--mpp", "1000", "at most 20"),
    ],
)
def test_bad_arguments_are_refused_at_parse_time(command, option, value, words, tmp_path, capsys) -> None:
    positional = {
        "predict": ["x.tif", "--checkpoint", tmp_path],
        "fit": [tmp_path, "--out", tmp_path / "run"],
        "prepare": [tmp_path],
        "make-demo-data": [tmp_path / "d"],
    }[command]
    started = time.perf_counter()
    code, err = run_cli([command, *positional, option, value], capsys)
    assert time.perf_counter() - started < 1.0
    assert code == 2 and option in err and words in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_python_api_refuses_zero_samples_and_steps_instead_of_defaulting(checkpoint) -> None:
    from napari_stem.predict import predict
    from napari_stem.spots import Spots
    from napari_stem.validate import InputError
    from napari_stem.values import PredictOptions

    spots = Spots(centers_px=np.array([[10.0, 10.0]]), diameter_px=5.0, mpp=0.5)
    for options, words in (
        ({"n_samples": 0}, "at least 2"),
        ({"n_samples": 1}, "at least 2"),
        ({"steps": 0}, "between 1 and 1000"),
        ({"sample_batch_size": 0}, "at least 1"),
    ):
        with pytest.raises(InputError, match=words):
            predict("unused.tif", spots, checkpoint, PredictOptions(**options), embeddings=np.zeros((1, 1280)))
    with pytest.raises(InputError, match="holds no spots"):
        predict("unused.tif", Spots(centers_px=np.zeros((0, 2)), diameter_px=5.0), checkpoint)


def test_grid_pitch_smaller_than_the_spots_or_absurdly_fine_is_refused(demo_slide_file, monkeypatch) -> None:
    import napari_stem.validate as validate
    from napari_stem.grid import spots_over_tissue
    from napari_stem.slide import open_slide
    from napari_stem.validate import InputError
    from napari_stem.values import GridSpec

    with open_slide(demo_slide_file) as slide:
        with pytest.raises(InputError, match="grid pitch .* at least 55"):
            spots_over_tissue(slide, GridSpec(pitch_um=0.01, spot_diameter_um=55.0))
        started = time.perf_counter()
        with pytest.raises(InputError, match=r"would need about .* of memory.*larger grid pitch"):
            spots_over_tissue(slide, GridSpec(0.06, 0.05))  # ~5e8 spots on this 1.1 x 1.5 mm slide
        assert time.perf_counter() - started < 1.0
        monkeypatch.setattr(validate, "available_memory_bytes", lambda: 10 * 2**20)
        with pytest.raises(InputError, match="10.0 MiB available"):
            spots_over_tissue(slide, GridSpec(pitch_um=5.0, spot_diameter_um=2.0))


def test_spots_off_the_slide_are_refused_or_dropped_and_counted(workspace, checkpoint, capsys) -> None:
    import anndata

    root = workspace["root"]
    moved = few_spots(workspace["spots"], root / "moved.h5ad", n=4, shift_px=(1e6, 0.0), shifted=2)
    out = root / "pred.h5ad"
    code, err = run_cli(predict_args(workspace, checkpoint, moved, out), capsys)
    assert code == 2 and "2 of 4 spots" in err and "off the slide" in err and "--drop-off-slide-spots" in err
    assert not out.exists()
    code, _ = run_cli(predict_args(workspace, checkpoint, moved, out, "--drop-off-slide-spots"), capsys)
    assert code == 0
    written = anndata.read_h5ad(out)
    assert written.n_obs == 2 and np.isfinite(written.X).all() and np.isfinite(written.layers["variance"]).all()


def test_empty_and_duplicated_spot_sets_are_refused(workspace, checkpoint, capsys) -> None:
    import anndata

    root = workspace["root"]
    empty = few_spots(workspace["spots"], root / "empty.h5ad", n=0)
    code, err = run_cli(predict_args(workspace, checkpoint, empty, root / "a.h5ad"), capsys)
    assert code == 2 and "holds no spots" in err
    barcodes = list(anndata.read_h5ad(workspace["spots"], backed="r").obs_names[:3])
    duplicated = few_spots(workspace["spots"], root / "dup.h5ad", n=4, barcodes=[*barcodes, barcodes[0]])
    code, err = run_cli(predict_args(workspace, checkpoint, duplicated, root / "b.h5ad"), capsys)
    assert code == 2 and "1 duplicated spot barcodes" in err and barcodes[0] in err
    assert not (root / "a.h5ad").exists() and not (root / "b.h5ad").exists()


def test_nan_truth_counts_are_refused_not_read_as_zero(workspace, tmp_path, capsys) -> None:
    import anndata

    from napari_stem.export import write_prediction
    from napari_stem.spots import read_spots_h5ad
    from napari_stem.stem.sampling import Prediction

    truth = anndata.read_h5ad(workspace["spots"])
    spots = read_spots_h5ad(workspace["spots"])
    genes = list(truth.var_names[:3])
    prediction = Prediction(
        mean=np.ones((len(spots), 3), np.float32), variance=np.ones((len(spots), 3), np.float32), genes=genes
    )
    predicted = write_prediction(tmp_path / "pred.h5ad", prediction, spots)
    x = np.asarray(truth.X.toarray() if hasattr(truth.X, "toarray") else truth.X, dtype=np.float32)
    x[5, 0] = np.nan
    truth.X = x
    truth.write_h5ad(tmp_path / "nan_truth.h5ad")
    code, err = run_cli(
        ["evaluate", predicted, "--truth", tmp_path / "nan_truth.h5ad", "--out", tmp_path / "eval", "--no-plots"],
        capsys,
    )
    assert code == 2 and "1 non-finite expression values" in err and not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------- crashes and tracebacks
def test_absurd_pixel_size_tag_is_not_trusted(tmp_path, capsys, checkpoint) -> None:
    import tifffile

    from napari_stem.errors import SlideError
    from napari_stem.grid import spots_over_tissue
    from napari_stem.slide import open_slide

    path = tmp_path / "one_px_per_cm.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), resolution=(1, 1), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.mpp is None and "10000 µm/px" in slide.mpp_problem
        with pytest.raises(SlideError, match="10000 µm/px.*--mpp in stem-train"):
            spots_over_tissue(slide)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5
    code, err = run_cli(
        ["predict", path, "--checkpoint", checkpoint, "--out", tmp_path / "p.h5ad", "--device", "cpu"], capsys
    )
    assert code == 2 and "--mpp" in err and "Traceback" not in err and not (tmp_path / "p.h5ad").exists()


def test_reader_tells_when_a_slide_opens_in_pixels(tmp_path) -> None:
    import tifffile

    from napari_stem.plugin.reader import read_slide

    path = tmp_path / "no_pixel_size.tif"
    tifffile.imwrite(path, np.full((32, 32, 3), 200, np.uint8))
    with pytest.warns(UserWarning, match="shown in pixels, not µm.*µm/px in the napari-stem widget"):
        layers = read_slide(str(path))
    assert layers[0][1]["scale"] == (1.0, 1.0)


def test_output_paths_are_checked_before_the_work(workspace, checkpoint, capsys) -> None:
    root = workspace["root"]
    blocker = root / "blocker"
    blocker.write_text("a file where a folder is expected")
    (root / "folder.h5ad").mkdir()
    for out, words in (
        (blocker / "sub" / "p.h5ad", "is a file, not a folder"),
        (Path("/proc/napari-stem/p.h5ad"), "not writable"),
        (root / "folder.h5ad", "is a folder"),
    ):
        started = time.perf_counter()
        code, err = run_cli(predict_args(workspace, checkpoint, workspace["spots"], out), capsys)
        assert code == 2 and words in err and "Traceback" not in err, err
        assert time.perf_counter() - started < 1.0  # refused before the model loads
    code, err = run_cli(
        ["evaluate", workspace["spots"], "--truth", workspace["spots"], "--out", blocker, "--no-plots"], capsys
    )
    assert code == 2 and "is a file" in err


def test_disk_full_is_one_line_and_leaves_nothing(workspace, checkpoint, monkeypatch, capsys) -> None:
    import anndata

    root = workspace["root"]
    spots = few_spots(workspace["spots"], root / "few.h5ad")

    def fill_the_disk(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", fill_the_disk)
    out = root / "out" / "pred.h5ad"
    code, err = run_cli(predict_args(workspace, checkpoint, spots, out), capsys)
    assert code == 2 and "No space left on device" in err and "free some space" in err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == [
        err.strip().splitlines()[-1]
    ]
    assert f"({out})" in err  # the file the user asked for, not our hidden temporary
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_disk_full_during_prepare_leaves_no_temporary_file(synthetic_hest, tmp_path, monkeypatch, capsys) -> None:
    import napari_stem.embedding.cache as cache

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache, "_write_rows", fail)
    out = tmp_path / "prep"
    code, err = run_cli(
        [
            "prepare",
            synthetic_hest,
            "--out",
            out,
            "--held-out",
            "SYN003",
            "--n-genes",
            "5",
            "--device",
            "cpu",
            "--no-augment",
        ],
        capsys,
    )
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert not out.exists()  # neither a temporary .h5 nor an empty embeddings/ folder stays behind


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_is_refused_up_front(workspace, checkpoint, tmp_path, capsys) -> None:
    disk = tmp_path / "small_disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        (disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))
        code, err = run_cli(predict_args(workspace, checkpoint, workspace["spots"], disk / "p.h5ad"), capsys)
        assert code == 2 and "free" in err and "Traceback" not in err
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_stale_temporaries_of_killed_runs_are_removed_by_the_next_write(tmp_path) -> None:
    from napari_stem.atomic import temporary_sibling, write_text_atomically

    target = tmp_path / "report.json"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".report.json.{dead.pid}.part"
    stale_dir = tmp_path / f".report.json.{dead.pid}.partial-abc123"
    stale.write_text("half")
    stale_dir.mkdir()
    live = temporary_sibling(target, "0123abcd.tmp")  # this process is alive: its file is left alone
    live.write_text("in progress")
    unrelated = tmp_path / ".other.json.1.part"
    unrelated.write_text("not ours to judge")
    other_host = tmp_path / f".report.json.{dead.pid}@another-host.part"  # shared filesystem: cannot be checked
    other_host.write_text("maybe still running elsewhere")
    mine_dead = tmp_path / temporary_sibling(target, "part").name.replace(f".{os.getpid()}@", f".{dead.pid}@")
    mine_dead.write_text("half, from a killed run on this host")
    write_text_atomically(target, "{}")
    assert target.read_text() == "{}"
    assert not stale.exists() and not stale_dir.exists() and not mine_dead.exists()
    assert live.exists() and unrelated.exists() and other_host.exists()


def test_safe_loading_messages_say_what_happened_and_never_advise_unsafe_loading(tmp_path, capsys) -> None:
    import torch

    from napari_stem.embedding.weights import load_weights_file
    from napari_stem.errors import EncoderError

    code_pickle = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2), code_pickle)
    with pytest.raises(EncoderError) as err:
        load_weights_file(code_pickle, "efficientnet_lite0")
    message = str(err.value)
    assert (
        "contains pickled code" in message and "refuses it for safety" in message and "trusted environment" in message
    )
    assert "Re-running" not in message and "will likely succeed" not in message
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.ones(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(EncoderError, match="damaged .* Use an intact copy") as err:
        load_weights_file(truncated, "efficientnet_lite0")
    assert "weights_only" not in str(err.value)


def test_widget_controller_refuses_bad_settings_before_loading_anything(demo_slide_file, checkpoint) -> None:
    from napari_stem.errors import StemError
    from napari_stem.plugin.controller import PredictController
    from napari_stem.plugin.jobs import GRID, PointsInput, PredictSettings, SlideInput
    from napari_stem.plugin.layers import SlideFrame
    from napari_stem.values import GridSpec

    controller = PredictController()
    slide = SlideInput("demo", demo_slide_file, 0.499, SlideFrame.microns(0.499))
    cases = [
        (PredictSettings(checkpoint=checkpoint, n_samples=1), GRID, "at least 2"),
        (PredictSettings(checkpoint=checkpoint, steps=0), GRID, "between 1 and 1000"),
        (PredictSettings(checkpoint=checkpoint, mpp_override=1000.0), GRID, "at most 20"),
        (PredictSettings(checkpoint=checkpoint, grid=GridSpec(10.0, 55.0)), GRID, "at least 55"),
        (
            PredictSettings(checkpoint=checkpoint),
            PointsInput("far", np.array([[1e7, 1e7], [50.0, 50.0]]), 55.0),
            "off the slide",
        ),
    ]
    for settings, spots, words in cases:
        started = time.perf_counter()
        with pytest.raises(StemError, match=words):
            controller.prepare(slide, spots, None, settings)
        assert time.perf_counter() - started < 1.0


def test_few_step_solvers_refuse_the_full_chain_before_any_work() -> None:
    from napari_stem.validate import InputError, check_steps

    assert check_steps(1000, "--steps", "ancestral") == 1000  # the paper's full chain
    assert check_steps(999, "--steps", "ancestral-matched") == 999
    with pytest.raises(InputError, match="ancestral-matched sampler .* at most 999 steps, not 1000"):
        check_steps(1000, "--steps", "ancestral-matched")
