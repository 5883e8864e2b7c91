"""Download HEST-1k samples from the Hugging Face Hub into the HEST layout ``prepare`` reads.

HEST-1k lives in the gated dataset repo ``MahmoodLab/hest``: per sample ``wsis/<id>.tif``,
``st/<id>.h5ad``, ``metadata/<id>.json`` and optional extras (``patches/<id>.h5``,
``tissue_seg/<id>_*``, ``cellvit_seg/<id>_*.zip`` ...), and at its root the metadata table
``HEST_v<major>_<minor>_<patch>.csv`` (one row per sample: ``id``, ``organ``, ``species``,
``st_technology``, ``patient``, ``dataset_title``, ``oncotree_code``, ...).

:func:`plan_download` reads that table (the newest version unless one is named), selects samples
by id or by metadata filters, and lists the files of the chosen parts with their sizes, from one
pinned commit. :func:`download` fetches them with ``huggingface_hub.hf_hub_download`` into the
output folder, file by file with a byte progress bar: a file already complete (same commit) is not
fetched again, so an interrupted download resumes with the first unfinished file (which starts
over: the client keeps no partial file between runs), and each file's size is checked against the
Hub's listing. The token comes from the usual places (``HF_TOKEN``, ``hf auth login``);
a missing token or unaccepted terms give one line saying what to do.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_stem.errors import DatasetError, describe_path
from napari_stem.hest import hest_sample

HEST_REPO = "MahmoodLab/hest"
#: What ``prepare`` needs.
REQUIRED_PARTS = ("wsis", "st", "metadata")
#: Folders of the HEST-1k repo that hold per-sample files.
KNOWN_PARTS = (
    "wsis",
    "st",
    "metadata",
    "patches",
    "patches_vis",
    "tissue_seg",
    "cellvit_seg",
    "xenium_seg",
    "transcripts",
    "thumbnails",
    "spatial_plots",
    "pixel_size_vis",
)
#: Metadata filters: option name → column of the HEST table.
FILTER_COLUMNS = {
    "organ": "organ",
    "species": "species",
    "technology": "st_technology",
    "patient": "patient",
    "dataset": "dataset_title",
    "oncotree": "oncotree_code",
    "disease": "disease_state",
}
_TABLE = re.compile(r"HEST_v(\d+)_(\d+)_(\d+)\.csv")


@dataclass(frozen=True)
class RemoteFile:
    path: str  # inside the repo, e.g. "wsis/TENX95.tif"
    size: int
    sample_id: str


@dataclass
class DownloadPlan:
    """What :func:`download` will fetch: samples, files with sizes, from one commit."""

    repo_id: str
    revision: str  # commit sha
    table: str  # the metadata table's file name
    sample_ids: list[str]
    parts: tuple[str, ...]
    files: list[RemoteFile]
    missing: dict[str, list[str]] = field(default_factory=dict)  # sample id → parts it lacks

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        lines = [f"{f.size:>15,d}  {f.path}" for f in self.files]
        lines.append(
            f"{len(self.files)} files, {format_bytes(self.total_bytes)}, {len(self.sample_ids)} samples "
            f"({', '.join(self.parts)}) from {self.repo_id}@{self.revision[:10]} ({self.table})"
        )
        for sample_id, parts in self.missing.items():
            lines.append(f"note: {sample_id} has no {', '.join(parts)} in the repo")
        return "\n".join(lines)


@dataclass
class DownloadResult:
    plan: DownloadPlan
    out_dir: Path
    fetched: list[str]  # repo paths downloaded by this call
    already_present: list[str]

    @property
    def fetched_bytes(self) -> int:
        sizes = {f.path: f.size for f in self.plan.files}
        return sum(sizes[p] for p in self.fetched)


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def _hub():
    from napari_stem.hub import _hub as hub

    return hub()


def _call(fn: Callable[[], Any], repo_id: str, what: str) -> Any:
    from napari_stem.hub import hub_error

    try:
        return fn()
    except DatasetError:
        raise
    except Exception as exc:  # client errors become one line
        raise hub_error(exc, repo_id, "dataset", what=what) from exc


def belongs_to(file_name: str, sample_id: str) -> bool:
    """HEST names a sample's files ``<id>.<ext>`` or ``<id>_<suffix>`` (``TENX9`` is not ``TENX95``)."""
    return file_name.startswith(sample_id) and file_name[len(sample_id) : len(sample_id) + 1] in (".", "_")


def select_samples(
    table: Any, sample_ids: Sequence[str] | None = None, filters: Mapping[str, str | Sequence[str]] | None = None
) -> list[str]:
    """Sample ids of the metadata ``table`` (a DataFrame) matching ids and every filter.

    Filters are option names of :data:`FILTER_COLUMNS` (or column names) → one value or several
    (any of them matches), compared case-insensitively.
    """
    if "id" not in table.columns:
        raise DatasetError("the HEST metadata table has no 'id' column.")
    selected = table
    for name, values in (filters or {}).items():
        if values in (None, "", [], ()):
            continue
        column = FILTER_COLUMNS.get(name, name)
        if column not in table.columns:
            raise DatasetError(
                f"the HEST metadata table has no column '{column}' (filter {name}); columns: {', '.join(map(str, table.columns))}."
            )
        wanted = {str(v).strip().lower() for v in ([values] if isinstance(values, str) else values)}
        matches = selected[column].astype(str).str.strip().str.lower().isin(wanted)
        if not matches.any():
            known = sorted(table[column].dropna().astype(str).unique())
            raise DatasetError(
                f"no HEST sample has {column} = {', '.join(sorted(wanted))}; values in the table: "
                f"{', '.join(known[:25])}{' ...' if len(known) > 25 else ''}."
            )
        selected = selected[matches]
    ids = [str(i) for i in selected["id"]]
    if sample_ids:
        known_ids = {str(i) for i in table["id"]}
        unknown = [i for i in sample_ids if i not in known_ids]
        if unknown:
            raise DatasetError(f"sample ids not in the HEST metadata table: {', '.join(unknown)}.")
        ids = [i for i in sample_ids if i in set(ids)]
    if not ids:
        raise DatasetError("no HEST sample matches both the ids and the filters given.")
    return ids


def plan_download(
    sample_ids: Sequence[str] | None = None,
    *,
    filters: Mapping[str, str | Sequence[str]] | None = None,
    parts: Iterable[str] = REQUIRED_PARTS,
    repo_id: str = HEST_REPO,
    revision: str | None = None,
    table: str | None = None,
    cache_dir: str | Path | None = None,
) -> DownloadPlan:
    """Choose samples and list their files; nothing is written but the cached metadata table."""
    import pandas as pd

    parts = tuple(dict.fromkeys(parts))
    unknown_parts = [p for p in parts if p not in KNOWN_PARTS]
    if unknown_parts:
        raise DatasetError(f"unknown HEST parts {', '.join(unknown_parts)}; known: {', '.join(KNOWN_PARTS)}.")
    if not sample_ids and not any(v not in (None, "", [], ()) for v in (filters or {}).values()):
        raise DatasetError(
            "choose samples: give ids (--ids) or metadata filters (--organ, --species, --technology, "
            "--patient, --dataset ...); HEST-1k as a whole is over 1 TB."
        )
    hub = _hub()
    api = hub.HfApi()
    info = _call(lambda: api.dataset_info(repo_id, revision=revision), repo_id, f"HEST-1k ({repo_id})")
    commit = str(info.sha)
    root_files = [
        f.path
        for f in _call(
            lambda: list(api.list_repo_tree(repo_id, repo_type="dataset", revision=commit)), repo_id, "listing HEST-1k"
        )
        if hasattr(f, "size")
    ]
    if table is None:
        tables = sorted(
            (tuple(int(x) for x in m.groups()), name) for name in root_files if (m := _TABLE.fullmatch(name))
        )
        if not tables:
            raise DatasetError(
                f"{repo_id} holds no HEST_v*.csv metadata table at its root (found {', '.join(root_files[:8])})."
            )
        table = tables[-1][1]
    elif table not in root_files:
        raise DatasetError(
            f"{repo_id} has no metadata table {table} (tables: {', '.join(f for f in root_files if _TABLE.fullmatch(f))})."
        )
    table_path = _call(
        lambda: hub.hf_hub_download(repo_id, table, repo_type="dataset", revision=commit, cache_dir=cache_dir),
        repo_id,
        f"metadata table {table}",
    )
    ids = select_samples(pd.read_csv(table_path), sample_ids, filters)

    files: list[RemoteFile] = []
    have: dict[str, set[str]] = {i: set() for i in ids}
    for part in parts:
        entries = _call(
            lambda part=part: list(
                api.list_repo_tree(repo_id, path_in_repo=part, recursive=True, repo_type="dataset", revision=commit)
            ),
            repo_id,
            f"listing {part}/",
        )
        for entry in entries:
            if not hasattr(entry, "size") or entry.size is None:
                continue  # a folder
            name = entry.path.rsplit("/", 1)[-1]
            owner = next((i for i in ids if belongs_to(name, i)), None)
            if owner is not None:
                files.append(RemoteFile(entry.path, int(entry.size), owner))
                have[owner].add(part)
    order = {sample_id: index for index, sample_id in enumerate(ids)}
    files.sort(key=lambda f: (order[f.sample_id], parts.index(f.path.split("/", 1)[0]), f.path))
    missing = {i: [p for p in parts if p not in have[i]] for i in ids if len(have[i]) < len(parts)}
    return DownloadPlan(
        repo_id=repo_id, revision=commit, table=table, sample_ids=ids, parts=parts, files=files, missing=missing
    )


def download(
    out_dir: str | Path,
    sample_ids: Sequence[str] | None = None,
    *,
    filters: Mapping[str, str | Sequence[str]] | None = None,
    parts: Iterable[str] = REQUIRED_PARTS,
    repo_id: str = HEST_REPO,
    revision: str | None = None,
    table: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
    plan: DownloadPlan | None = None,
) -> DownloadResult:
    """Fetch HEST-1k samples into ``out_dir`` (``wsis/``, ``st/``, ``metadata/`` ...); see the module docstring.

    ``dry_run`` returns the plan without writing. Samples lacking one of wsis/st/metadata are refused
    before anything is fetched when those parts are asked for (``prepare`` could not read them).
    """
    out_dir = Path(out_dir)
    if plan is None:
        plan = plan_download(sample_ids, filters=filters, parts=parts, repo_id=repo_id, revision=revision, table=table)
    incomplete = {i: p for i, p in plan.missing.items() if set(p) & set(REQUIRED_PARTS)}
    if incomplete:
        listing = "; ".join(f"{i}: no {', '.join(p)}" for i, p in incomplete.items())
        raise DatasetError(f"these samples lack files prepare needs ({listing}); leave them out of the selection.")
    if dry_run:
        return DownloadResult(plan, out_dir, [], [])
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{describe_path(out_dir)} is a file; give a folder for the HEST data.")
    out_dir.mkdir(parents=True, exist_ok=True)
    present = [f for f in plan.files if _complete(out_dir, f, plan.revision)]
    needed = sum(f.size for f in plan.files) - sum(f.size for f in present)
    free = shutil.disk_usage(out_dir).free
    if needed > free:
        raise DatasetError(
            f"{format_bytes(needed)} still to download but only {format_bytes(free)} free on "
            f"{describe_path(out_dir)}; free some space or choose another folder."
        )
    hub = _hub()
    from tqdm.auto import tqdm

    fetched, already = [], [f.path for f in present]
    bar = tqdm(
        total=plan.total_bytes,
        initial=sum(f.size for f in present),
        unit="B",
        unit_scale=True,
        desc="HEST-1k",
        disable=not progress,
    )
    try:
        for remote in plan.files:
            if remote.path in already:
                continue
            bar.set_postfix_str(remote.path, refresh=False)
            local = _call(
                lambda remote=remote: hub.hf_hub_download(
                    plan.repo_id, remote.path, repo_type="dataset", revision=plan.revision, local_dir=out_dir
                ),
                plan.repo_id,
                f"downloading {remote.path}",
            )
            size = Path(local).stat().st_size
            if size != remote.size:
                Path(local).unlink(missing_ok=True)
                raise DatasetError(
                    f"{remote.path} arrived with {size:,d} bytes, the Hub lists {remote.size:,d}; it was "
                    "removed. Run the download again."
                )
            fetched.append(remote.path)
            bar.update(remote.size)
    finally:
        bar.close()
    _unzip_segmentations(out_dir, plan)
    if set(REQUIRED_PARTS) <= set(plan.parts):
        for sample_id in plan.sample_ids:
            hest_sample(out_dir, sample_id)  # the layout prepare reads, or a DatasetError naming the gap
    return DownloadResult(plan, out_dir, fetched, already)


def _complete(out_dir: Path, remote: RemoteFile, commit: str) -> bool:
    """Already downloaded: right size and recorded by the Hub client at this commit (at another
    commit the client compares the file's hash with the Hub's and fetches it only if it changed)."""
    local = out_dir / remote.path
    if not local.is_file() or local.stat().st_size != remote.size:
        return False
    record = out_dir / ".cache" / "huggingface" / "download" / f"{remote.path}.metadata"
    try:
        return record.read_text(encoding="utf-8").split("\n", 1)[0].strip() == commit
    except OSError:
        return False


def _unzip_segmentations(out_dir: Path, plan: DownloadPlan) -> None:
    """HEST ships cell segmentations zipped; unpack them beside the zip (kept, so a rerun skips it)."""
    for remote in plan.files:
        if remote.path.endswith(".zip") and remote.path.split("/", 1)[0] in ("cellvit_seg", "xenium_seg"):
            archive = out_dir / remote.path
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.infolist():
                    target = (archive.parent / member.filename).resolve()
                    if archive.parent.resolve() not in target.parents:
                        raise DatasetError(
                            f"{remote.path} holds a path outside its folder ({member.filename}); not unpacked."
                        )
                    if not target.exists():
                        zipped.extract(member, archive.parent)
