"""HEST-layout folders: iteration and errors that name the missing file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from napari_stem.errors import DatasetError
from napari_stem.hest import hest_sample_ids, is_hest_folder, iter_hest_samples


def test_iterates_samples_with_metadata(synthetic_hest: Path) -> None:
    samples = list(iter_hest_samples(synthetic_hest))
    assert [s.sample_id for s in samples] == ["SYN000", "SYN001", "SYN002", "SYN003"]
    assert hest_sample_ids(synthetic_hest) == ["SYN000", "SYN001", "SYN002", "SYN003"]
    assert [s.patient for s in samples] == ["P0", "P0", "P1", "P1"]
    assert samples[0].mpp == 0.5
    assert samples[0].wsi_path == synthetic_hest / "wsis" / "SYN000.tif"
    assert is_hest_folder(synthetic_hest) and not is_hest_folder(synthetic_hest / "st")
    slide = samples[1].open_slide()
    spots = samples[1].read_spots()
    assert slide.mpp == 0.5 and spots.mpp == 0.5
    assert (spots.centers_px[:, 0] < slide.shape[1]).all()
    assert [s.sample_id for s in iter_hest_samples(synthetic_hest, ["SYN002"])] == ["SYN002"]


def _copy(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "hest"
    shutil.copytree(root, copy)
    return copy


def test_missing_st_file_names_it(synthetic_hest: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_hest, tmp_path)
    (root / "st" / "SYN001.h5ad").unlink()
    with pytest.raises(DatasetError, match=r"SYN001.*st/SYN001\.h5ad"):
        list(iter_hest_samples(root))


def test_missing_slide_and_metadata(synthetic_hest: Path, tmp_path: Path) -> None:
    root = _copy(synthetic_hest, tmp_path)
    (root / "wsis" / "SYN002.tif").unlink()
    with pytest.raises(DatasetError, match=r"SYN002.*no slide"):
        list(iter_hest_samples(root, ["SYN002"]))
    (root / "metadata" / "SYN003.json").unlink()
    with pytest.raises(DatasetError, match=r"metadata/SYN003\.json"):
        list(iter_hest_samples(root, ["SYN003"]))
    (root / "metadata" / "SYN000.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"SYN000\.json.*not valid JSON"):
        list(iter_hest_samples(root, ["SYN000"]))


def test_not_a_hest_folder(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    with pytest.raises(DatasetError, match=r"not a HEST-layout folder: missing wsis/, metadata/"):
        list(iter_hest_samples(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        hest_sample_ids(tmp_path / "nowhere")
