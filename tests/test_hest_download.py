"""``stem-train download`` / ``napari_stem.hest_download.download`` against a local stand-in of HEST-1k on the Hub.

``huggingface_hub`` runs unchanged (``HfApi.dataset_info``/``list_repo_tree``, ``hf_hub_download``);
the stand-in (:mod:`hub_standin`) serves a folder laid out like ``MahmoodLab/hest``: synthetic
samples, two versions of the metadata table, patches and a zipped cell segmentation.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from hub_standin import HubStandin, point_hub_at

pytest.importorskip("huggingface_hub")

REPO = "MahmoodLab/hest"
TABLE = """id,organ,species,st_technology,patient,dataset_title,oncotree_code
SYN000,Breast,Homo sapiens,Visium,P0,Synthetic A,IDC
SYN001,Breast,Homo sapiens,Visium,P0,Synthetic A,IDC
SYN002,Bowel,Mus musculus,Visium,P1,Synthetic B,
SYN003,Bowel,Homo sapiens,Xenium,P1,Synthetic B,
"""


@pytest.fixture(scope="module")
def hest_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HEST-1k-shaped dataset repo folder (4 small samples; SYN000 has patches and a cellvit zip)."""
    from napari_stem.synthetic import make_demo_dataset

    folder = tmp_path_factory.mktemp("hest_repo") / "hest"
    make_demo_dataset(folder, n_slides=4, n_genes=5, seed=3, slide_size_um=500.0)
    (folder / "HEST_v1_1_0.csv").write_text(TABLE.replace("Breast", "Old"))
    (folder / "HEST_v1_3_0.csv").write_text(TABLE)
    (folder / "patches").mkdir()
    (folder / "patches" / "SYN000.h5").write_bytes(b"patches" * 100)
    (folder / "cellvit_seg").mkdir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr("SYN000_cellvit_seg.geojson", '{"type": "FeatureCollection", "features": []}')
    (folder / "cellvit_seg" / "SYN000_cellvit_seg.zip").write_bytes(buffer.getvalue())
    (folder / "README.md").write_text("HEST-1k stand-in")
    return folder


@pytest.fixture
def hub(hest_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with HubStandin() as standin:
        standin.add_repo(REPO, hest_repo, repo_type="dataset", gated=True, accepted_tokens={"hf_accepted"})
        point_hub_at(monkeypatch, standin.endpoint, tmp_path / "hf_cache", token="hf_accepted")
        yield standin


def _size(folder: Path, *names: str) -> int:
    return sum((folder / name).stat().st_size for name in names)


def test_dry_run_selects_by_metadata_and_lists_sizes(
    hub: HubStandin, hest_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from stem_train.cli import main

    out = tmp_path / "hest_data"
    assert (
        main(["download", str(out), "--organ", "breast", "--species", "Homo sapiens", "--with", "patches", "--dry-run"])
        == 0
    )
    text = capsys.readouterr().out
    expected = [
        "wsis/SYN000.tif",
        "st/SYN000.h5ad",
        "metadata/SYN000.json",
        "patches/SYN000.h5",
        "wsis/SYN001.tif",
        "st/SYN001.h5ad",
        "metadata/SYN001.json",
    ]
    listed = [line.split()[-1] for line in text.splitlines() if line.strip() and line.split()[-1] in expected]
    assert listed == expected  # sample by sample, parts in order
    assert "SYN002" not in text and "SYN003" not in text
    assert "7 files, " in text and "2 samples" in text and "HEST_v1_3_0.csv" in text  # the newest table
    assert f"{_size(hest_repo, 'wsis/SYN000.tif'):>15,d}  wsis/SYN000.tif" in text
    assert "note: SYN001 has no patches" in text
    assert not out.exists()  # a dry run writes nothing
    assert not hub.downloads(".tif")


def test_download_writes_the_layout_prepare_reads(hub: HubStandin, hest_repo: Path, tmp_path: Path) -> None:
    from napari_stem.hest import iter_hest_samples
    from napari_stem.hest_download import download

    out = tmp_path / "hest_data"
    result = download(
        out,
        ["SYN002"],
        filters={"technology": "visium"},
        parts=("wsis", "st", "metadata", "cellvit_seg"),
        progress=False,
    )
    assert result.plan.sample_ids == ["SYN002"] and result.plan.missing == {"SYN002": ["cellvit_seg"]}
    for name in ("wsis/SYN002.tif", "st/SYN002.h5ad", "metadata/SYN002.json"):
        assert (out / name).read_bytes() == (hest_repo / name).read_bytes()
    assert result.fetched_bytes == _size(hest_repo, "wsis/SYN002.tif", "st/SYN002.h5ad", "metadata/SYN002.json")
    [sample] = list(iter_hest_samples(out))
    assert sample.sample_id == "SYN002" and sample.mpp == pytest.approx(0.5)
    assert len(sample.read_spots()) > 0

    result = download(out, ["SYN000"], parts=("wsis", "st", "metadata", "cellvit_seg"), progress=False)
    assert (out / "cellvit_seg" / "SYN000_cellvit_seg.geojson").is_file()  # unzipped as HEST's notebook does
    assert sorted(s.sample_id for s in iter_hest_samples(out)) == ["SYN000", "SYN002"]


def test_gated_dataset_without_token_or_terms(
    hub: HubStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from stem_train.cli import main

    monkeypatch.delenv("HF_TOKEN")
    assert main(["download", str(tmp_path / "d"), "--ids", "SYN000", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "gated and no Hugging Face token is set" in error and "huggingface.co/datasets/MahmoodLab/hest" in error
    assert "hf auth login" in error and "Traceback" not in error
    monkeypatch.setenv("HF_TOKEN", "hf_not_accepted")
    assert main(["download", str(tmp_path / "d"), "--ids", "SYN000"]) == 2
    assert "token has no access to the gated repo 'MahmoodLab/hest'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_interrupted_download_resumes_without_refetching(hub: HubStandin, hest_repo: Path, tmp_path: Path) -> None:
    from napari_stem.hest_download import download
    from napari_stem.hub import HubError

    out = tmp_path / "hest_data"
    hub.fail["wsis/SYN001.tif"] = 1  # the Hub fails once in the middle of the run
    with pytest.raises(HubError, match="downloading wsis/SYN001.tif"):
        download(out, ["SYN000", "SYN001"], progress=False)
    assert (out / "metadata" / "SYN000.json").is_file() and not (out / "wsis" / "SYN001.tif").exists()
    before = len(hub.log)

    hub.cut_once["st/SYN001.h5ad"] = 2000  # and the connection drops mid-file on the rerun
    result = download(out, ["SYN000", "SYN001"], progress=False)
    assert result.already_present == ["wsis/SYN000.tif", "st/SYN000.h5ad", "metadata/SYN000.json"]
    assert result.fetched == ["wsis/SYN001.tif", "st/SYN001.h5ad", "metadata/SYN001.json"]
    rerun = [entry for entry in hub.log[before:] if entry[0] == "GET" and "/resolve/" in entry[1]]
    assert not any("SYN000" in path for _, path, _ in rerun)  # finished files are not fetched again
    # the dropped file is retried by the client within the call (from the last whole chunk it wrote: here 0)
    assert [path.rsplit("/", 2)[-2:] for _, path, _ in rerun].count(["st", "SYN001.h5ad"]) == 2
    assert (out / "st" / "SYN001.h5ad").read_bytes() == (hest_repo / "st" / "SYN001.h5ad").read_bytes()

    again = download(out, ["SYN000", "SYN001"], progress=False)  # everything present: nothing fetched
    assert again.fetched == [] and len(again.already_present) == 6

    hub.repos[("dataset", REPO)].commit = "f" * 40  # a new commit of the dataset, these files unchanged
    before = len(hub.log)
    newer = download(out, ["SYN000", "SYN001"], progress=False)
    assert newer.plan.revision == "f" * 40 and newer.already_present == []  # checked against the new commit...
    assert not [
        e for e in hub.log[before:] if e[0] == "GET" and "/resolve/" in e[1] and "/wsis/" in e[1]
    ]  # ...not re-fetched


def test_sizes_are_verified_and_bad_selections_named(hub: HubStandin, tmp_path: Path) -> None:
    from dataclasses import replace

    from napari_stem.errors import DatasetError
    from napari_stem.hest_download import download, plan_download

    plan = plan_download(["SYN003"])
    plan.files[0] = replace(plan.files[0], size=plan.files[0].size + 1)  # the Hub lists another size
    with pytest.raises(DatasetError, match="arrived with .* bytes, the Hub lists"):
        download(tmp_path / "d", plan=plan, progress=False)
    assert not (tmp_path / "d" / plan.files[0].path).exists()
    with pytest.raises(DatasetError, match="not in the HEST metadata table: NOPE"):
        plan_download(["NOPE"])
    with pytest.raises(DatasetError, match="no HEST sample has organ = brain; values in the table: Bowel, Breast"):
        plan_download(filters={"organ": "Brain"})
    with pytest.raises(DatasetError, match="give ids .* or metadata filters"):
        plan_download()
    assert plan_download(["SYN000"], table="HEST_v1_1_0.csv").table == "HEST_v1_1_0.csv"
