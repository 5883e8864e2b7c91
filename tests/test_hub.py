"""Checkpoints on the Hugging Face Hub (``hf-hub:owner/name[@rev]``) and ``stem-train push``, offline.

``huggingface_hub`` runs unchanged against a local stand-in of the Hub's HTTP API
(:mod:`hub_standin`); only ``HfApi.create_repo``/``upload_folder`` (pushing) are replaced by a
function that puts the uploaded folder where the stand-in serves it from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hub_standin import HubStandin, point_hub_at
from tiny_models import save_tiny_checkpoint

pytest.importorskip("huggingface_hub")

GENES = ["EPCAM", "KRT8", "VIM"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", GENES, cond_dim=16)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import napari_stem.hub as hub_module

    monkeypatch.setattr(hub_module, "_resolved", {})
    with HubStandin() as standin:
        point_hub_at(monkeypatch, standin.endpoint, tmp_path / "hf_cache")
        yield standin


def _model_repo(tmp_path: Path, checkpoint: Path, name: str = "repo", extra: dict[str, bytes] | None = None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for file in ("config.json", "weights.safetensors"):
        shutil.copy(checkpoint / file, folder / file)
    for file, data in (extra or {}).items():
        (folder / file).write_bytes(data)
    return folder


def test_hub_reference_loads_only_config_and_safetensors(
    hub: HubStandin, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from napari_stem.hub import parse_hub_reference, resolve_checkpoint
    from napari_stem.stem.checkpoint import load_checkpoint, read_metadata

    assert parse_hub_reference("hf-hub:lab/stem-prad@v1") == ("lab/stem-prad", "v1")
    assert resolve_checkpoint(tmp_path / "local") == tmp_path / "local"  # paths are left alone
    hub.add_repo(
        "lab/stem-tiny",
        _model_repo(tmp_path, tiny_checkpoint, extra={"pytorch_model.bin": b"\x80pickle", "notes.txt": b"x"}),
    )

    checkpoint = load_checkpoint("hf-hub:lab/stem-tiny")
    assert checkpoint.genes == GENES and checkpoint.config.cond_dim == 16
    assert str(checkpoint.path).startswith(str(tmp_path / "hf_cache"))  # cached like timm's weights
    assert "models--lab--stem-tiny" in str(checkpoint.path)
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.log if method == "GET" and "/resolve/" in path}
    assert fetched == {"config.json", "weights.safetensors"}  # never the pickle, never other files
    assert read_metadata(Path("hf-hub:lab/stem-tiny@main"))["genes"] == GENES  # a Path from argparse works too


def test_hub_repo_with_pickles_only_is_refused(hub: HubStandin, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from napari_stem.errors import CheckpointError
    from napari_stem.stem.checkpoint import read_metadata

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    hub.add_repo("lab/pickled", folder)
    with pytest.raises(CheckpointError, match="pickled weights.*never loads"):
        read_metadata("hf-hub:lab/pickled")
    assert not hub.downloads("pytorch_model.bin")


def test_gated_and_missing_repos_say_what_to_do(
    hub: HubStandin, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from napari_stem.hub import HubError
    from napari_stem.stem.checkpoint import read_metadata

    hub.add_repo("lab/gated", _model_repo(tmp_path, tiny_checkpoint), gated=True, accepted_tokens={"hf_good"})
    with pytest.raises(HubError, match="gated and no Hugging Face token is set.*hf auth login"):
        read_metadata("hf-hub:lab/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_other")
    with pytest.raises(HubError, match="token has no access.*Accept its terms"):
        read_metadata("hf-hub:lab/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert read_metadata("hf-hub:lab/gated")["genes"] == GENES
    with pytest.raises(HubError, match="no model repo 'lab/nothing'"):
        read_metadata("hf-hub:lab/nothing")


def test_push_writes_a_model_card_and_round_trips(
    hub: HubStandin,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    from huggingface_hub import HfApi

    from napari_stem.stem.checkpoint import load_checkpoint
    from stem_train.cli import main

    uploads = []

    def create_repo(self, repo_id, *, repo_type=None, private=False, exist_ok=False, **_):
        uploads.append(("create", repo_id, private))

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, allow_patterns=None, **_):
        target = tmp_path / "hub_repos" / repo_id.replace("/", "__")
        shutil.copytree(folder_path, target)
        hub.add_repo(repo_id, target)
        uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), allow_patterns))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "training_state.pt").write_bytes(b"\x80optimiser pickle")
    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {
                "truth": "/data/st/SYN003.h5ad",
                "n_spots": 73,
                "n_genes": 3,
                "fixed_panel_pcc": {"mean": 0.5812},
                "reference_metrics": {"pcc_10": 0.61, "mse": 1.2},
                "calibration": {"crps": 0.33, "applicable": True},
                "intervals_verdict": "as stated",
            }
        )
    )

    assert main(["push", str(ckpt), "me/stem-tiny", "--report", str(report)]) == 0
    assert "hf-hub:me/stem-tiny" in capsys.readouterr().out
    assert uploads[0] == ("create", "me/stem-tiny", False)
    assert uploads[1][2] == ["README.md", "config.json", "weights.safetensors"]  # no training_state.pt pickle
    card = (tmp_path / "hub_repos" / "me__stem-tiny" / "README.md").read_text()
    for expected in (
        'library_name: "napari-stem"',
        "3 (EPCAM, KRT8, VIM)",
        "efficientnet_lite0",
        "hest mode",
        "fixed-panel mean PCC: 0.581",
        "pcc 10: 0.610",
        "crps: 0.330",
        "SYN003.h5ad` (73 spots",
        "steps: 0",
        "data: untrained test model",
        "Intended use",
        "--checkpoint hf-hub:me/stem-tiny",
    ):
        assert expected in card, expected
    assert load_checkpoint("hf-hub:me/stem-tiny").genes == GENES  # what was pushed loads back

    assert main(["push", str(ckpt), "me/stem-tiny", "--card-only"]) == 0
    assert "Not evaluated" in capsys.readouterr().out


def test_widget_controller_accepts_a_hub_reference(hub: HubStandin, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from napari_stem.plugin.controller import PredictController

    hub.add_repo("lab/stem-tiny", _model_repo(tmp_path, tiny_checkpoint))
    summary = PredictController.checkpoint_summary(Path("hf-hub:lab/stem-tiny"))  # what the FileEdit hands over
    assert "3 genes" in summary and "efficientnet_lite0" in summary


def test_encoder_weights_from_the_hub(hub: HubStandin, tmp_path: Path) -> None:
    """--encoder-weights hf-hub:owner/name[/file]: fetched to the cache, loaded by the tensors-only loader."""
    from napari_stem.embedding.default_weights import default_weights_path
    from napari_stem.embedding.encoders import create_encoder, encoder_weights_id, get_encoder_spec
    from napari_stem.hub import HubError, resolve_weights_file

    local = default_weights_path(get_encoder_spec("efficientnet_lite0"))  # the packaged ImageNet weights (.pth)
    folder = tmp_path / "effnet"
    (folder / "weights").mkdir(parents=True)
    shutil.copy(local, folder / "pytorch_model.bin")
    shutil.copy(local, folder / "weights" / "lite0.pth")
    hub.add_repo("lab/effnet", folder)

    default = resolve_weights_file("hf-hub:lab/effnet")  # model.safetensors absent: pytorch_model.bin
    assert default.name == "pytorch_model.bin" and default.read_bytes() == local.read_bytes()
    assert resolve_weights_file("hf-hub:lab/effnet@main/weights/lite0.pth").name == "lite0.pth"
    assert encoder_weights_id("efficientnet_lite0", "hf-hub:lab/effnet") == encoder_weights_id(
        "efficientnet_lite0", local
    ).replace(local.name, "pytorch_model.bin")
    encoder = create_encoder(
        "efficientnet_lite0", "hf-hub:lab/effnet/weights/lite0.pth", device="cpu", precision="fp32"
    )
    assert encoder.dim == 1280
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no weights")
    hub.add_repo("lab/empty", tmp_path / "empty")
    with pytest.raises(HubError, match="looked for model.safetensors, pytorch_model.bin"):
        resolve_weights_file("hf-hub:lab/empty")
