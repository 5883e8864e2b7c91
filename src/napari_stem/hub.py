"""napari-stem checkpoints on the Hugging Face Hub: ``hf-hub:owner/name[@revision]``.

A napari-stem checkpoint (``config.json`` + ``weights.safetensors``) is a natural Hub model repo.
:func:`resolve_checkpoint` turns a ``hf-hub:`` reference into a local folder in the Hub cache
(``$HF_HUB_CACHE``, as timm and transformers cache their weights) and leaves local paths alone;
:mod:`napari_stem.stem.checkpoint` calls it, so every place that takes a checkpoint path (``stem-train
predict``/``evaluate``-side tools, the widget's checkpoint field) accepts a reference too.

Only ``config.json``, ``weights.safetensors`` and the model card are ever fetched: a repo that holds
pickles (``*.bin``, ``*.pt``) instead is refused, never unpickled. Publishing a checkpoint (model
card, upload) is :mod:`napari_stem.hub_publish`.

``huggingface_hub`` is an optional dependency (``pip install "napari-stem[hub]"``), imported only
when a reference is resolved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from napari_stem.errors import CheckpointError, StemError

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"  # same names as napari_stem.stem.checkpoint (not imported: it imports us)
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "README.md"
#: What a Hub checkpoint is made of; nothing else is downloaded.
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

_resolved: dict[tuple[str, str | None], Path] = {}


class HubError(StemError):
    """The Hub cannot give what was asked: no token, terms not accepted, no such repo, offline."""


def is_hub_reference(value: Any) -> bool:
    return isinstance(value, (str, Path)) and str(value).startswith(HUB_PREFIX)


def parse_hub_reference(value: str | Path) -> tuple[str, str | None]:
    """``hf-hub:owner/name@rev`` → ``("owner/name", "rev")`` (revision None: the default branch)."""
    text = str(value)[len(HUB_PREFIX) :] if is_hub_reference(value) else str(value)
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise CheckpointError(
            f"'{value}' is not a Hub reference: write hf-hub:owner/name or hf-hub:owner/name@revision."
        )
    return repo_id, revision or None


def _hub():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise HubError(
            'the Hugging Face Hub client is not installed: pip install "napari-stem[hub]" '
            "(or pip install huggingface_hub)."
        ) from exc
    return huggingface_hub


def resolve_checkpoint(value: str | Path) -> Path:
    """A local checkpoint folder for ``value``: a path as is, a ``hf-hub:`` reference downloaded.

    The download goes to the Hub cache and is reused (offline too, once cached); only
    :data:`CHECKPOINT_FILES` are fetched.
    """
    if not is_hub_reference(value):
        return Path(value)
    repo_id, revision = parse_hub_reference(value)
    key = (repo_id, revision)
    if key in _resolved and (_resolved[key] / CONFIG_FILE).is_file():
        return _resolved[key]
    hub = _hub()
    try:
        folder = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(CHECKPOINT_FILES)))
    except Exception as exc:  # every client error becomes one line naming the repo
        raise hub_error(exc, repo_id, "model", what=f"checkpoint {value}") from exc
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(_not_a_checkpoint_message(value, repo_id, revision, missing))
    _resolved[key] = folder
    return folder


#: Weights files an encoder reference may name or default to, safest first; pickles are loaded by the
#: encoder's tensors-only loader (``torch.load(weights_only=True)``), never as code.
ENCODER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_weights_file(value: str | Path) -> Path:
    """A local encoder weights file for ``value``: a path as is, or ``hf-hub:owner/name[@rev][/file]``
    downloaded to the Hub cache (default file: ``model.safetensors``, else ``pytorch_model.bin``)."""
    if not is_hub_reference(value):
        return Path(value)
    text = str(value)[len(HUB_PREFIX) :]
    owner, _, rest = text.partition("/")
    name, _, filename = rest.partition("/")
    repo_id, revision = parse_hub_reference(f"{owner}/{name}")
    hub = _hub()
    candidates = [filename] if filename else list(ENCODER_WEIGHT_FILES)
    last: BaseException | None = None
    for candidate in candidates:
        try:
            return Path(hub.hf_hub_download(repo_id, candidate, revision=revision))
        except hub.errors.EntryNotFoundError as exc:  # try the next default name
            last = exc
            if isinstance(exc, hub.errors.LocalEntryNotFoundError):
                break
        except Exception as exc:
            raise hub_error(exc, repo_id, "model", what=f"encoder weights {value}") from exc
    raise hub_error(last, repo_id, "model", what=f"encoder weights {value} (looked for {', '.join(candidates)})")


def _not_a_checkpoint_message(value: Any, repo_id: str, revision: str | None, missing: list[str]) -> str:
    """Say what the repo holds instead (pickles are named as refused), when the listing is reachable."""
    holds = ""
    try:
        files = _hub().HfApi().list_repo_files(repo_id, revision=revision)
        pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            holds = (
                f" It holds pickled weights ({', '.join(pickles[:3])}), which napari-stem never loads from the Hub: "
                "they can run code. Ask its owner for a napari-stem checkpoint (stem-train push), or convert "
                "a reference checkpoint you trust locally with stem-train import-reference."
            )
        else:
            holds = f" It holds {', '.join(files[:5]) or 'no files'}."
    except Exception:  # the listing only improves the message
        pass
    return (
        f"Hub repo '{repo_id}' ({value}) is not a napari-stem checkpoint: no {' or '.join(missing)}; a napari-stem "
        f"checkpoint on the Hub is {CONFIG_FILE} + {WEIGHTS_FILE}.{holds}"
    )


def hub_error(exc: BaseException, repo_id: str, repo_type: str = "model", *, what: str | None = None) -> StemError:
    """One line for a failed Hub call: no token, terms not accepted, no such repo/revision/file, offline."""
    hub = _hub()
    errors = hub.errors
    what = what or f"{repo_type} {repo_id}"
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    if isinstance(exc, errors.GatedRepoError):
        if hub.get_token() is None:
            return HubError(
                f"{what}: '{repo_id}' is gated and no Hugging Face token is set. Accept its terms at {page}, "
                "create a read token (Settings → Access tokens), then run 'hf auth login' or set HF_TOKEN."
            )
        return HubError(
            f"{what}: your Hugging Face token has no access to the gated repo '{repo_id}'. Accept its terms "
            f"at {page} with the account of that token (access can take a moment), or log in with another "
            "token ('hf auth login' / HF_TOKEN)."
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return HubError(
            f"{what}: revision not found in '{repo_id}'; check the name after '@' ({page}/tree/main lists branches)."
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        token_hint = "" if hub.get_token() else " If it is private, log in first ('hf auth login' or HF_TOKEN)."
        return HubError(f"{what}: no {repo_type} repo '{repo_id}' on the Hub (or it is private).{token_hint}")
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return HubError(
            f"{what}: the Hub cannot be reached and nothing is cached for '{repo_id}'; connect once "
            "(or copy the checkpoint folder here and give its path)."
        )
    if isinstance(exc, errors.EntryNotFoundError):
        return HubError(f"{what}: a file is missing in '{repo_id}': {exc}")
    if isinstance(exc, errors.HfHubHTTPError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return HubError(f"{what}: the Hub answered an error ({first}); try again later.")
    if isinstance(exc, StemError):
        return exc
    if isinstance(exc, OSError):
        return HubError(f"{what}: {exc}")
    return HubError(f"{what}: {type(exc).__name__}: {exc}")
