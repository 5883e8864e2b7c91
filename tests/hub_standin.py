"""A local stand-in for the Hugging Face Hub's HTTP API, for offline tests.

``huggingface_hub`` itself runs unchanged against it (``hf_hub_download``, ``snapshot_download``,
``HfApi.list_repo_tree`` / ``repo_info``): only its endpoint is pointed at a local HTTP server that
serves folders as repositories. It answers the routes those calls use:

* ``GET /api/{models,datasets}/<repo>/revision/<rev>`` — repo info with the commit sha;
* ``GET /api/{models,datasets}/<repo>/tree/<rev>[/<path>]`` — file listing with sizes and sha256;
* ``HEAD``/``GET /[datasets/]<repo>/resolve/<rev>/<path>`` — file metadata and bytes, with ``Range``.

Gated repositories answer 401 without a token and 403 with a token that has not accepted the
terms, both with ``X-Error-Code: GatedRepo`` as the Hub does. ``cut_once[path] = n`` sends only
``n`` bytes of that file the first time and drops the connection; ``fail[path] = k`` answers 500 to
the next ``k`` downloads of it. Every request is logged as ``(method, path, range header)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class StandinRepo:
    folder: Path
    repo_type: str = "model"
    gated: bool = False
    accepted_tokens: set = field(default_factory=set)
    commit: str = COMMIT

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


class HubStandin:
    """Serve repositories from local folders on 127.0.0.1; use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], StandinRepo] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.cut_once: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, folder: Path, repo_type: str = "model", **kwargs) -> StandinRepo:
        repo = StandinRepo(Path(folder), repo_type, **kwargs)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandin:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                standin._handle(self, head=True)

            def do_GET(self) -> None:
                standin._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, path_suffix: str) -> list[tuple[str, str, str | None]]:
        """Logged GETs of files ending in ``path_suffix``."""
        return [
            entry
            for entry in self.log
            if entry[0] == "GET" and "/resolve/" in entry[1] and entry[1].endswith(path_suffix)
        ]

    # ---------------------------------------------------------------- routing
    def _handle(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.log.append(("HEAD" if head else "GET", path, handler.headers.get("Range")))
        if match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._api(handler, match[1][:-1], match[2], lambda repo: self._info(match[2], repo))
        if match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._api(handler, match[1][:-1], match[2], lambda repo: self._tree(repo, (match[4] or "/")[1:]))
        if match := re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(handler, "dataset" if match[1] else "model", match[2], match[4], head)
        self._error(handler, 404, "RepoNotFound", "not found")

    def _repo_or_error(self, handler, repo_type: str, repo_id: str) -> StandinRepo | None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(handler, 404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if repo.gated:
            auth = handler.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip() or None
            if token is None:
                self._error(handler, 401, "GatedRepo", "Access to this repo is restricted; you must be authenticated.")
                return None
            if token not in repo.accepted_tokens:
                self._error(
                    handler,
                    403,
                    "GatedRepo",
                    "Access to this repo is restricted; your request is awaiting review or the terms are not accepted.",
                )
                return None
        return repo

    def _api(self, handler, repo_type: str, repo_id: str, body) -> None:
        repo = self._repo_or_error(handler, repo_type, repo_id)
        if repo is None:
            return
        data = json.dumps(body(repo)).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _info(self, repo_id: str, repo: StandinRepo) -> dict:
        siblings = [{"rfilename": p.relative_to(repo.folder).as_posix()} for p in repo.files()]
        return {
            "id": repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "auto" if repo.gated else False,
            "siblings": siblings,
            "tags": [],
        }

    def _tree(self, repo: StandinRepo, sub: str) -> list[dict]:
        base = repo.folder / sub if sub else repo.folder
        entries = []
        for p in repo.files():
            if base != repo.folder and base not in p.parents:
                continue
            data = p.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            entries.append(
                {
                    "type": "file",
                    "path": p.relative_to(repo.folder).as_posix(),
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                    "lfs": {"oid": sha, "size": len(data), "pointerSize": 134},
                }
            )
        return entries

    def _resolve(self, handler, repo_type: str, repo_id: str, file_path: str, head: bool) -> None:
        repo = self._repo_or_error(handler, repo_type, repo_id)
        if repo is None:
            return
        file = repo.folder / file_path
        if not file.is_file():
            return self._error(handler, 404, "EntryNotFound", f"{file_path} does not exist")
        if not head and self.fail.get(file_path, 0) > 0:
            self.fail[file_path] -= 1
            return self._error(handler, 500, None, "internal error")
        data = file.read_bytes()
        start = 0
        range_header = handler.headers.get("Range")
        if range_header and not head and (m := re.fullmatch(r"bytes=(\d+)-", range_header)):
            start = int(m[1])
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", repo.commit)
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if head:
            return
        body = data[start:]
        cut = self.cut_once.pop(file_path, None)
        if cut is not None and cut < len(body):
            handler.wfile.write(body[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        handler.wfile.write(body)

    def _error(self, handler, status: int, code: str | None, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        handler.send_response(status)
        if code:
            handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def point_hub_at(monkeypatch, endpoint: str, cache_dir: Path, token: str | None = None) -> None:
    """Point ``huggingface_hub`` (already imported) at ``endpoint`` with an empty cache and ``token``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HOME", str(cache_dir.parent / "hf_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache_dir.parent / "hf_home" / "token"), raising=False)
    monkeypatch.setattr(
        constants, "HF_STORED_TOKENS_PATH", str(cache_dir.parent / "hf_home" / "stored_tokens"), raising=False
    )
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
