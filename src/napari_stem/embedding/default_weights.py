"""Where a registered encoder's weights come from when none are given: an installed Python package,
or the Hugging Face Hub (gated models: the user's token, the local Hub cache when offline)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from napari_stem.embedding.weights import CLI_WEIGHTS_HINT, first_line
from napari_stem.errors import EncoderError, describe_path

if TYPE_CHECKING:
    from napari_stem.embedding.encoders import EncoderSpec


def default_weights_path(spec: EncoderSpec) -> Path:
    """Where the registered default weights are: inside a package, or downloaded from the Hub."""
    if spec.package_weights is not None:
        module, relative = spec.package_weights
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise EncoderError(
                f"encoder '{spec.name}' takes its weights from the Python package '{module}', which is not "
                f"installed. Fix: {spec.package_install}, or pass a weights file."
            )
        path = Path(next(iter(found.submodule_search_locations))) / relative
        if not path.exists():
            raise EncoderError(
                f"encoder '{spec.name}': the package '{module}' is installed but {describe_path(path)} is "
                f"missing; reinstall it ({spec.package_install} --force-reinstall)."
            )
        return path
    if spec.hub_repo is not None:
        return hub_download(spec)
    raise EncoderError(
        f"encoder '{spec.name}' ({spec.architecture}) has no built-in weights source; give a local weights "
        f"file (.safetensors, .pth or .bin) for that architecture; {CLI_WEIGHTS_HINT}."
    )


def hub_download(spec: EncoderSpec) -> Path:
    """The encoder's weights file from the Hugging Face Hub (or its local cache)."""
    url = f"https://huggingface.co/{spec.hub_repo}"
    fix = (
        f"Fix: download {spec.hub_file} from {url} after accepting its terms (gated model: log in with "
        f"`hf auth login` or set HF_TOKEN) and {CLI_WEIGHTS_HINT}."
    )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise EncoderError(
            f"encoder '{spec.name}' needs huggingface_hub to fetch {url} (pip install huggingface_hub). {fix}"
        ) from exc
    offline = hub_offline()
    try:
        return Path(
            hf_hub_download(
                spec.hub_repo,
                spec.hub_file,
                local_files_only=offline,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
        )
    except Exception as exc:
        if offline:
            reason = (
                "the Hugging Face Hub is switched off (HF_HUB_OFFLINE is set) and the file is not in the local cache"
            )
        else:
            reason = f"it could not be downloaded ({type(exc).__name__}: {first_line(exc)})"
        raise EncoderError(f"encoder '{spec.name}' needs {spec.hub_file} from {url}, but {reason}. {fix}") from exc


def hub_offline() -> bool:
    """True when the user switched the Hub off (read at call time, unlike huggingface_hub's constant)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - older/odd huggingface_hub
        return False
