"""Patch embedding: streaming over the real demo slide, dihedral augmentation, the HDF5 cache."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from napari_stem.embedding.augment import DIHEDRAL_AUGMENTATIONS, dihedral
from napari_stem.embedding.cache import embed_slide_cached, iter_embed_slide_cached, read_embedding_cache
from napari_stem.embedding.embed import embed_spots, iter_embed_spots
from napari_stem.embedding.patches import PatchSpec, SpotPatches
from napari_stem.errors import CheckpointError, DatasetError, EncoderError, SlideError
from napari_stem.slide import open_slide
from napari_stem.spots import Spots, hex_grid
from napari_stem.values import EmbeddingSpec

DEMO_MPP = 0.499


@pytest.fixture(scope="module")
def effnet():
    from napari_stem.embedding.encoders import create_encoder

    return create_encoder("efficientnet_lite0", device="cpu", precision="fp32")  # bit-stable across batchings


@pytest.fixture(scope="module")
def demo_spots() -> Spots:
    """23 Visium-like spots (55 µm, 100 µm hex pitch) well inside cmu_small_region.svs."""
    grid = hex_grid(400, 350, pitch_um=100, origin_um=(300, 400))
    centers_px = grid[["x_um", "y_um"]].to_numpy() / DEMO_MPP
    barcodes = [f"r{r}c{c}" for r, c in zip(grid.array_row, grid.array_col, strict=True)]
    return Spots(centers_px=centers_px, diameter_px=55 / DEMO_MPP, mpp=DEMO_MPP, barcodes=barcodes)


def _write_pyramid(path, base: np.ndarray, mpp: float | None, downsamples=(1, 2, 4)) -> None:
    """A HEST-like pyramidal TIFF: 256 px JPEG tiles, one top-level page per level (reduced = subfiletype 1)."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for index, factor in enumerate(downsamples):
            h, w = base.shape[0] // factor, base.shape[1] // factor
            level = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BOX))
            extra = {"resolution": (1e4 / (mpp * factor),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            tif.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if index == 0 else 1,
                **extra,
            )


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory, demo_slide_file):
    """1536² px at 0.25 µm/px made from real H&E (the demo slide upsampled 2×), levels 1, 2, 4."""
    with open_slide(demo_slide_file) as slide:
        tissue = slide.read_region(400, 600, 768, 768)
    base = np.asarray(Image.fromarray(tissue).resize((1536, 1536), Image.Resampling.BICUBIC))
    path = tmp_path_factory.mktemp("pyramid") / "slide.tif"
    _write_pyramid(path, base, mpp=0.25)
    return path


class CountingEncoder:
    """A cheap deterministic stand-in encoder (per-channel mean and std) that counts its calls."""

    def __init__(self, name: str = "mean-colour", weights_id: str = "none", fail_on_call: int | None = None):
        self.name, self.weights_id, self.dim, self.input_size = name, weights_id, 6, 224
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, batch):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("simulated crash in the middle of a run")
        x = torch.as_tensor(batch).float()
        return torch.cat([x.mean(dim=(1, 2)), x.std(dim=(1, 2))], dim=1)


# ---------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("index", range(7))
def test_dihedral_reproduces_pil_transpose(index):
    image = np.random.default_rng(index).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # not square: catches axis mix-ups
    expected = np.asarray(Image.fromarray(image).transpose(Image.Transpose(index)))
    assert Image.Transpose(index).name == DIHEDRAL_AUGMENTATIONS[index]
    nhwc = torch.from_numpy(np.stack([image, image[::-1].copy()]))
    assert np.array_equal(dihedral(nhwc, index)[0].numpy(), expected)
    nchw = nhwc.permute(0, 3, 1, 2)
    assert np.array_equal(dihedral(nchw, index, dims=(-2, -1))[0].permute(1, 2, 0).numpy(), expected)


def test_dihedral_rejects_identity_and_out_of_range():
    with pytest.raises(ValueError):
        dihedral(torch.zeros(1, 4, 4, 3), 7)


# ---------------------------------------------------------------------- patch geometry
def test_patch_spec_sizes_and_round_trip():
    assert PatchSpec().patch_size_px(110) == 224
    assert PatchSpec().patch_size_um(110, 0.25) == 112.0
    native = PatchSpec.stem_native()
    assert native.patch_size_px(110.2) == 224  # small spots: at least 224 px
    assert native.patch_size_px(301.7) == 300  # large spots: one diameter, as int(d // 2) * 2
    assert native.patch_size_um(110.2, 0.25) == 56.0
    assert PatchSpec.from_dict(native.to_dict()) == native
    with pytest.raises(ValueError):
        PatchSpec(mode="tiles")
    with pytest.raises(ValueError):
        PatchSpec(size_um=0)


def test_hest_patches_come_from_the_coarser_level_and_native_from_full_resolution(pyramid_tiff):
    center = (700.0, 800.0)
    hest = SpotPatches(pyramid_tiff, None, np.array([center]), 220.0, PatchSpec())
    native = SpotPatches(pyramid_tiff, None, np.array([center]), 220.0, PatchSpec.stem_native())
    with open_slide(pyramid_tiff) as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.best_level_for_mpp(0.5) == 1
        level1 = slide.read_region(350 - 112, 400 - 112, 224, 224, level=1)  # 112 µm at 0.5 µm/px, no resampling
        full = slide.read_region(700 - 112, 800 - 112, 224, 224, level=0)  # 224 px at 0.25 µm/px = 56 µm
    assert np.array_equal(hest[0], level1)
    assert np.array_equal(native[0], full)
    hest.close()
    native.close()


# ---------------------------------------------------------------------- embedding the real slide
def test_embedding_the_demo_slide_is_offline_ordered_and_deterministic(demo_slide_file, demo_spots, effnet):
    first, aug = embed_spots(demo_slide_file, demo_spots, effnet, batch_size=8, num_workers=0)
    assert aug is None
    assert first.shape == (len(demo_spots), 1280) and first.dtype == np.float32 and np.isfinite(first).all()
    again, _ = embed_spots(demo_slide_file, demo_spots, effnet, batch_size=8, num_workers=0)
    assert np.array_equal(first, again)
    other_batching, _ = embed_spots(demo_slide_file, demo_spots, effnet, batch_size=5, num_workers=1)
    np.testing.assert_allclose(other_batching, first, atol=1e-5, rtol=0)
    # row i is spot i: compare with encoding the patch read directly, for the first and last spot
    with open_slide(demo_slide_file) as slide:
        for i in (0, len(demo_spots) - 1):
            patch = slide.read_patch(tuple(demo_spots.centers_px[i]), 112.0, 0.5)
            np.testing.assert_allclose(effnet(patch[None]).numpy()[0], first[i], atol=1e-5, rtol=0)
    # different tissue, different features
    assert np.linalg.norm(first[0] - first[-1]) > 0.1 * np.linalg.norm(first[0])


def test_progress_events_cover_every_spot_once(demo_slide_file, demo_spots):
    encoder = CountingEncoder()
    events = list(iter_embed_spots(demo_slide_file, demo_spots, encoder, batch_size=10))
    assert [(e.start, e.done) for e in events] == [(0, 10), (10, 20), (20, 23)]
    assert all(e.total == 23 and e.embeddings.shape == (e.done - e.start, 6) for e in events)
    assert events[-1].fraction == 1.0 and encoder.calls == 3
    # each event says which spots it holds (increasing rows); together every spot exactly once
    assert all(len(e.index) == e.done - e.start and (np.diff(e.index) > 0).all() for e in events)
    assert sorted(np.concatenate([e.index for e in events]).tolist()) == list(range(23))


def test_spots_are_read_band_by_band_whatever_their_file_order(tmp_path, demo_slide_file, demo_spots, effnet):
    from napari_stem.embedding.patches import reading_order

    centers = np.array([[900.0, 10.0], [5.0, 300.0], [10.0, 20.0], [500.0, 250.0], [400.0, 10.0], [10.0, 20.0]])
    # bands of 224 px down the slide, left to right in a band, ties in file order
    assert reading_order(centers, 224).tolist() == [2, 5, 4, 0, 1, 3]
    assert reading_order(np.zeros((0, 2)), 224).tolist() == []

    # barcode order is spatially random: the features and the cache rows still follow the spots
    shuffled = demo_spots.subset(np.random.default_rng(5).permutation(len(demo_spots)))
    in_order, _ = embed_spots(demo_slide_file, demo_spots, effnet, batch_size=4)
    by_barcode = dict(zip(demo_spots.barcodes, in_order, strict=True))
    expected = np.stack([by_barcode[barcode] for barcode in shuffled.barcodes])
    features, _ = embed_spots(demo_slide_file, shuffled, effnet, batch_size=4)
    np.testing.assert_allclose(features, expected, atol=1e-5, rtol=0)
    cached = embed_slide_cached(tmp_path / "shuffled.h5", demo_slide_file, shuffled, effnet, batch_size=4, augment=True)
    np.testing.assert_allclose(cached.embeddings, expected, atol=1e-5, rtol=0)
    assert cached.barcodes.tolist() == [str(b) for b in shuffled.barcodes]
    np.testing.assert_allclose(cached.coords, shuffled.centers_px)
    _, augmented = embed_spots(demo_slide_file, shuffled, effnet, batch_size=23, augment=True)
    np.testing.assert_allclose(cached.embeddings_aug, augmented, atol=1e-5, rtol=0)


def test_default_batch_size_follows_the_device(demo_slide_file, demo_spots):
    from napari_stem.embedding.embed import default_batch_size

    events = list(iter_embed_spots(demo_slide_file, demo_spots, CountingEncoder()))  # a CPU encoder
    assert [e.done for e in events] == [8, 16, 23]
    assert default_batch_size("cuda:1") == 64 and default_batch_size("cpu") == 8


def test_augmented_embeddings_are_the_seven_pil_transposes(demo_slide_file, demo_spots, effnet):
    spots = demo_spots.subset(np.arange(2))
    native = PatchSpec.stem_native()
    embeddings, augmented = embed_spots(demo_slide_file, spots, effnet, native, batch_size=2, augment=True)
    assert augmented.shape == (2, 7, 1280)
    with open_slide(demo_slide_file) as slide:
        patch = slide.read_native_crop(tuple(spots.centers_px[1]), spots.diameter_px)
    assert patch.shape == (224, 224, 3)
    np.testing.assert_allclose(effnet(patch[None]).numpy()[0], embeddings[1], atol=1e-5, rtol=0)
    views = np.stack([np.asarray(Image.fromarray(patch).transpose(Image.Transpose(k))) for k in range(7)])
    np.testing.assert_allclose(effnet(views).numpy(), augmented[1], atol=1e-4, rtol=0)
    assert not np.allclose(augmented[1, 0], embeddings[1], atol=1e-3)  # a flip really changes the view


def test_workers_read_a_pyramidal_tiff_like_the_main_process(pyramid_tiff):
    grid = hex_grid(250, 250, pitch_um=100, origin_um=(60, 60))
    spots = Spots(centers_px=grid[["x_um", "y_um"]].to_numpy() / 0.25, diameter_px=220.0, mpp=0.25)
    in_process, _ = embed_spots(pyramid_tiff, spots, CountingEncoder(), batch_size=3, num_workers=0)
    in_workers, _ = embed_spots(pyramid_tiff, spots, CountingEncoder(), batch_size=3, num_workers=2)
    assert len(spots) >= 6
    np.testing.assert_array_equal(in_workers, in_process)


def test_hest_patches_need_a_pixel_size(tmp_path):
    base = np.full((512, 512, 3), 200, np.uint8)
    path = tmp_path / "no_mpp.tif"
    _write_pyramid(path, base, mpp=None, downsamples=(1, 2))
    spots = Spots(centers_px=[[100.0, 100.0]], diameter_px=100.0, mpp=None)
    with pytest.raises(SlideError, match="no pixel size"):
        embed_spots(path, spots, CountingEncoder())
    # the native crop needs no µm/px: it is defined in pixels
    embeddings, _ = embed_spots(path, spots, CountingEncoder(), PatchSpec.stem_native())
    assert embeddings.shape == (1, 6)


# ---------------------------------------------------------------------- cache
def test_cache_is_written_in_hest_bench_layout(tmp_path, demo_slide_file, demo_spots):
    cache = tmp_path / "demo.h5"
    result = embed_slide_cached(cache, demo_slide_file, demo_spots, CountingEncoder(), batch_size=8, augment=True)
    direct, direct_aug = embed_spots(demo_slide_file, demo_spots, CountingEncoder(), batch_size=8, augment=True)
    with h5py.File(cache, "r") as handle:
        assert handle["embeddings"].shape == (23, 6) and handle["embeddings"].dtype == np.float32
        assert handle["embeddings_aug"].shape == (23, 7, 6)
        assert handle["coords"].shape == (23, 2)
        assert handle["barcodes"].dtype.kind == "S" and handle["barcodes"][0] == b"r0c0"
        attrs = dict(handle.attrs)
    assert attrs["encoder"] == "mean-colour" and attrs["dim"] == 6 and attrs["patch_mode"] == "hest"
    assert attrs["patch_size_um"] == 112.0 and attrs["patch_size_px"] == 224 and attrs["mpp"] == DEMO_MPP
    assert attrs["n_augmentations"] == 7 and attrs["augmentations"].split(",") == list(DIHEDRAL_AUGMENTATIONS)
    assert attrs["complete"]
    np.testing.assert_array_equal(result.embeddings, direct)
    np.testing.assert_array_equal(result.embeddings_aug, direct_aug)
    np.testing.assert_array_equal(result.coords, demo_spots.centers_px)
    assert list(result.barcodes) == list(demo_spots.barcodes) and result.patch_spec == PatchSpec()
    assert not result.reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.h5"]  # no temporary file left behind


def test_cache_is_reused_only_when_encoder_patches_and_spots_match(tmp_path, demo_slide_file, demo_spots):
    cache = tmp_path / "demo.h5"
    encoder = CountingEncoder()
    embed_slide_cached(cache, demo_slide_file, demo_spots, encoder, batch_size=8)
    assert encoder.calls == 3

    again = embed_slide_cached(cache, demo_slide_file, demo_spots, encoder, batch_size=8)
    assert again.reused and encoder.calls == 3  # nothing recomputed

    def recomputes(**changes) -> bool:
        counter = changes.pop("encoder", CountingEncoder())
        spots = changes.pop("spots", demo_spots)
        result = embed_slide_cached(cache, demo_slide_file, spots, counter, batch_size=8, **changes)
        return counter.calls > 0 and not result.reused

    assert recomputes(encoder=CountingEncoder(name="another-encoder"))
    assert recomputes(encoder=CountingEncoder(weights_id="file:other.safetensors"))
    assert recomputes(patch_spec=PatchSpec.stem_native())
    assert not recomputes(patch_spec=PatchSpec.stem_native())
    moved = Spots(demo_spots.centers_px + [[1.0, 0.0]], demo_spots.diameter_px, DEMO_MPP, demo_spots.barcodes)
    assert recomputes(spots=moved, patch_spec=PatchSpec.stem_native())
    assert recomputes(spots=moved.subset(np.arange(20)), patch_spec=PatchSpec.stem_native())
    assert recomputes(spots=moved.subset(np.arange(20)), patch_spec=PatchSpec.stem_native(), mpp=0.5)
    # augmented embeddings: a cache without them cannot serve, one with them serves both requests
    assert recomputes(spots=moved.subset(np.arange(20)), patch_spec=PatchSpec.stem_native(), mpp=0.5, augment=True)
    assert not recomputes(spots=moved.subset(np.arange(20)), patch_spec=PatchSpec.stem_native(), mpp=0.5)


def test_cache_hit_never_builds_the_model(tmp_path, demo_slide_file, demo_spots, effnet, monkeypatch):
    cache = tmp_path / "effnet.h5"
    spots = demo_spots.subset(np.arange(4))
    first = embed_slide_cached(cache, demo_slide_file, spots, "efficientnet_lite0", batch_size=4, device="cpu")
    assert first.embeddings.shape == (4, 1280) and first.attrs["encoder_weights"] == effnet.weights_id

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built although the cache matched")

    monkeypatch.setattr("napari_stem.embedding.encoders.create_encoder", no_model)
    events = list(iter_embed_slide_cached(cache, demo_slide_file, spots, "efficientnet_lite0"))
    assert len(events) == 1 and events[0].from_cache and events[0].done == events[0].total == 4
    np.testing.assert_array_equal(events[0].embeddings, first.embeddings)
    # the same weights given as an Encoder object also hit the cache
    assert embed_slide_cached(cache, demo_slide_file, spots, effnet).reused


def test_a_crash_leaves_no_half_file_and_keeps_the_old_cache(tmp_path, demo_slide_file, demo_spots):
    cache = tmp_path / "demo.h5"
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_slide_cached(cache, demo_slide_file, demo_spots, CountingEncoder(fail_on_call=2), batch_size=8)
    assert list(tmp_path.iterdir()) == []

    embed_slide_cached(cache, demo_slide_file, demo_spots, CountingEncoder(), batch_size=8)
    before = cache.read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_slide_cached(
            cache, demo_slide_file, demo_spots, CountingEncoder(name="other", fail_on_call=3), batch_size=8
        )
    assert cache.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo.h5"]


def test_a_cancelled_run_leaves_no_file(tmp_path, demo_slide_file, demo_spots):
    cache = tmp_path / "demo.h5"
    events = iter_embed_slide_cached(cache, demo_slide_file, demo_spots, CountingEncoder(), batch_size=8)
    first = next(events)
    assert first.done == 8 and not first.from_cache
    assert len(list(tmp_path.iterdir())) == 1  # the temporary file being written
    events.close()  # what the GUI does when the user presses cancel
    assert list(tmp_path.iterdir()) == []


def test_the_last_event_comes_after_the_cache_is_in_place(tmp_path, demo_slide_file, demo_spots):
    cache = tmp_path / "demo.h5"
    for event in iter_embed_slide_cached(cache, demo_slide_file, demo_spots, CountingEncoder(), batch_size=8):
        if event.done == event.total:
            break  # a consumer that stops at 100 % must still get its file
    assert read_embedding_cache(cache).embeddings.shape == (23, 6)


def test_read_embedding_cache_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_embedding_cache(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["img"] = np.zeros((1, 2, 2, 3), np.uint8)
    with pytest.raises(DatasetError, match="no 'embeddings' dataset"):
        read_embedding_cache(other)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5")
    with pytest.raises(DatasetError, match="could not read embedding file"):
        read_embedding_cache(garbage)


def test_a_corrupt_cache_is_recomputed(tmp_path, demo_slide_file, demo_spots):
    cache = tmp_path / "demo.h5"
    cache.write_bytes(b"truncated")
    encoder = CountingEncoder()
    result = embed_slide_cached(cache, demo_slide_file, demo_spots, encoder, batch_size=8)
    assert encoder.calls == 3 and result.embeddings.shape == (23, 6)


# ---------------------------------------------------------------------- what checkpoints record
#: The ``embedding`` entries written so far: stem-train fit and the demo model, import-reference
#: (stem-native patches), test checkpoints without patch or dim, other keys, and none at all.
WRITTEN_EMBEDDING_ENTRIES = [
    {"encoder": "efficientnet_lite0", "dim": 1280, "patch": {"mode": "hest", "size_um": 112.0, "target_mpp": 0.5}},
    {"encoder": "uni+conch", "dim": 1536, "patch": {"mode": "stem-native", "size_um": 112.0, "target_mpp": 0.5}},
    {"encoder": "toy", "dim": 8},
    {"encoder": "efficientnet_lite0", "patch": {"mode": "hest"}},
    {"encoder": "uni", "dim": 4, "um_per_px": 0.5, "crop": [224, 224]},
    {},
]


@pytest.mark.parametrize("entry", WRITTEN_EMBEDDING_ENTRIES)
def test_embedding_spec_reads_back_every_entry_written(entry):
    import json

    spec = EmbeddingSpec.from_dict(json.loads(json.dumps(entry)))
    assert spec.to_dict() == entry and EmbeddingSpec.from_dict(spec.to_dict()) == spec
    assert PatchSpec.from_dict(spec.patch) == PatchSpec.from_dict(entry.get("patch", {"mode": "hest"}))
    assert spec.encoder == entry.get("encoder") and spec.dim == entry.get("dim")


def test_embedding_spec_tolerates_no_entry_and_refuses_a_malformed_one():
    assert EmbeddingSpec.from_dict(None) == EmbeddingSpec() and EmbeddingSpec().to_dict() == {}
    assert EmbeddingSpec().patch == {"mode": "hest"}  # what prediction always assumed
    with pytest.raises(ValueError, match="malformed embedding spec"):
        EmbeddingSpec.from_dict({"encoder": "uni", "dim": "wide"})


def test_a_saved_checkpoint_carries_its_embedding_spec(tmp_path):
    from napari_stem.stem.checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from tiny_models import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "tiny", ["A", "B"])
    entry = read_metadata(path)["embedding"]
    loaded = load_checkpoint(path)
    assert loaded.embedding == EmbeddingSpec(
        encoder="efficientnet_lite0", dim=1280, patch_mode="hest", patch_size_um=112.0, patch_target_mpp=0.5
    )
    assert loaded.embedding.to_dict() == entry == WRITTEN_EMBEDDING_ENTRIES[0]
    again = save_checkpoint(
        tmp_path / "again", config=loaded.config, genes=loaded.genes, ema=loaded.model, embedding=loaded.embedding
    )
    assert read_metadata(again)["embedding"] == entry  # the typed value writes the same JSON


@pytest.mark.parametrize(
    ("embedding", "error", "match"),
    [
        ({}, CheckpointError, r"tiny.*does not say which image encoder"),
        ({"encoder": "no_such_encoder_xyz", "dim": 1280}, EncoderError, r"unknown encoder 'no_such_encoder_xyz'"),
    ],
)
def test_a_checkpoint_without_a_known_encoder_is_refused(
    tmp_path, demo_slide_file, demo_spots, embedding, error, match
):
    import json

    from napari_stem.predict import predict
    from napari_stem.values import PredictOptions
    from tiny_models import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "tiny", ["A", "B"])
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "embedding": embedding}))
    with pytest.raises(error, match=match):
        predict(demo_slide_file, demo_spots, path, PredictOptions(n_samples=2, steps=2, device="cpu"))
