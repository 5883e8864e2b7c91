"""Publish a napari-stem checkpoint to the Hugging Face Hub: a model card and an upload.

Above both :mod:`napari_stem.hub` (references, errors) and :mod:`napari_stem.stem.checkpoint` (which
resolves ``hf-hub:`` references through the former), so neither imports the other back.
:func:`push_checkpoint` writes the card (genes, encoder, patch mode, training data, metrics from an
evaluation report, intended use) beside ``config.json`` and ``weights.safetensors`` and uploads the
folder with ``HfApi.upload_folder``; training state is never uploaded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from napari_stem.hub import _REPO_ID, CARD_FILE, CHECKPOINT_FILES, CONFIG_FILE, WEIGHTS_FILE, HubError, _hub, hub_error
from napari_stem.stem.checkpoint import read_metadata
from napari_stem.values import EmbeddingSpec


def model_card(metadata: dict, repo_id: str, report: dict | None = None) -> str:
    """A Hub model card (``README.md``) for a checkpoint's config, with metrics from ``report``.

    ``report`` is ``stem-train evaluate``'s ``report.json``; without it the card says the model is
    unevaluated rather than inventing numbers.
    """
    genes = [str(g) for g in metadata.get("genes", [])]
    architecture = metadata.get("architecture", {})
    embedding = EmbeddingSpec.from_dict(metadata.get("embedding"))
    provenance = metadata.get("provenance", {})
    patch = embedding.patch
    encoder = "unknown" if embedding.encoder is None else embedding.encoder
    dim = architecture.get("cond_dim", "?") if embedding.dim is None else embedding.dim
    front = {
        "library_name": "napari-stem",
        "tags": ["napari-stem", "spatial-transcriptomics", "histology", "diffusion"],
    }
    lines = [
        "---",
        *(f"{key}: {json.dumps(value)}" for key, value in front.items()),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        "A [napari-stem](https://github.com/napari-stem/napari-stem) checkpoint of **Stem** (Zhu et al., ICLR 2025): a "
        "conditional diffusion model that predicts Visium-style spot expression, with its uncertainty, from H&E "
        "patch embeddings.",
        "",
        "## Use",
        "",
        "```bash",
        'pip install "napari-stem[hub]"',
        f"stem-train predict my_slide.svs --checkpoint hf-hub:{repo_id} --out my_slide.h5ad",
        "```",
        "",
        f"or type `hf-hub:{repo_id}` into the *checkpoint* field of the napari widget. Only `{CONFIG_FILE}` and "
        f"`{WEIGHTS_FILE}` are downloaded; nothing is unpickled.",
        "",
        "## Model",
        "",
        f"- genes: {len(genes)} ({', '.join(genes[:20])}{', ...' if len(genes) > 20 else ''}); full ordered list in `{CONFIG_FILE}`",
        f"- target: {metadata.get('target_transform', 'log2p1')} of counts",
        f"- image encoder: `{encoder}` ({dim}-dim embeddings); its weights are not part of this repo",
        f"- patches: {patch.get('mode', 'hest')} mode" + (f", {patch['size_um']} µm" if "size_um" in patch else ""),
        "- architecture: " + ", ".join(f"{k} {v}" for k, v in architecture.items()),
        "",
        "## Training data",
        "",
    ]
    if provenance:
        for key in (
            "trainer",
            "source",
            "steps",
            "data",
            "data_dir",
            "train_slides",
            "held_out_slides",
            "gene_selection",
            "napari_stem_version",
        ):
            if provenance.get(key) not in (None, "", []):
                lines.append(f"- {key.replace('_', ' ')}: {_provenance_value(key, provenance[key])}")
    else:
        lines.append("- not recorded in the checkpoint")
    lines += ["", "## Evaluation", ""]
    if report:
        lines += _report_lines(report)
    else:
        lines.append(
            "Not evaluated: push with `--report evaluation/report.json` (from `stem-train evaluate`) to add metrics."
        )
    lines += [
        "",
        "## Intended use",
        "",
        "Research on spatial transcriptomics and histology. Predictions are model outputs, not measurements; "
        "the per-spot variance and intervals say how unsure the model is, and they are only as good as its "
        "calibration on slides like yours (check it with `stem-train evaluate` on a measured slide). Not for "
        "diagnosis or any clinical decision. Data licences of the training slides (e.g. HEST-1k: CC BY-NC-SA "
        "4.0) may restrict use.",
        "",
    ]
    return "\n".join(lines)


def _provenance_value(key: str, value: Any) -> str:
    if key == "data_dir":
        return Path(str(value)).name  # the folder's name, not the uploader's file system
    if key == "gene_selection" and isinstance(value, dict):
        parts = [str(value.get("method", "?"))]
        if "n_requested" in value:
            parts.append(f"{value['n_requested']} genes")
        if "slides" in value:
            parts.append(f"chosen on {len(value['slides'])} slides")
        if "includes_held_out" in value:
            parts.append("held-out slides included" if value["includes_held_out"] else "held-out slides excluded")
        return ", ".join(parts)
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _report_lines(report: dict) -> list[str]:
    def number(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = []
    if report.get("truth"):
        lines.append(
            f"On `{Path(str(report['truth'])).name}` ({report.get('n_spots', '?')} spots, {report.get('n_genes', '?')} genes):"
        )
        lines.append("")
    panel = report.get("fixed_panel_pcc") or {}
    if isinstance(panel, dict) and "mean" in panel:
        lines.append(f"- fixed-panel mean PCC: {number(panel['mean'])}")
    for section in ("reference_metrics", "calibration"):
        values = report.get(section) or {}
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    lines.append(f"- {key.replace('_', ' ')}: {number(value)}")
    if report.get("intervals_verdict"):
        lines.append(f"- written intervals: {report['intervals_verdict']}")
    return lines or ["(the report holds no metrics)"]


def push_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    *,
    report: str | Path | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload a checkpoint folder's config, weights and a fresh model card to ``repo_id``; returns its URL.

    Training state (``training_state.pt``, a pickle of optimiser state) is never uploaded.
    """
    if not _REPO_ID.fullmatch(repo_id):
        raise HubError(f"'{repo_id}' is not a Hub repo id; write owner/name.")
    folder = Path(checkpoint)
    metadata = read_metadata(folder)  # a missing or damaged checkpoint is named before any upload
    folder = folder.parent if folder.is_file() else folder
    report_data = None
    if report is not None:
        try:
            report_data = json.loads(Path(report).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise HubError(f"cannot read the evaluation report '{report}': {exc}") from exc
    hub = _hub()
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="napari-stem-push-") as staging:
        staging = Path(staging)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(folder / name, staging / name)
        (staging / CARD_FILE).write_text(model_card(metadata, repo_id, report_data), encoding="utf-8")
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(staging),
                repo_type="model",
                revision=revision,
                commit_message=commit_message or f"napari-stem checkpoint ({len(metadata.get('genes', []))} genes)",
                allow_patterns=list(CHECKPOINT_FILES),
            )
        except Exception as exc:
            raise hub_error(exc, repo_id, "model", what=f"push to {repo_id}") from exc
    return f"https://huggingface.co/{repo_id}"
