"""A stand-in for the Hugging Face Hub, for tests: a small local HTTP server that speaks the part of the Hub's
API that huggingface_hub (2.5) and the fleet's stdlib downloader use, serving a folder of model files as one
pinned revision of a gated repository.

What it answers, and why (each answer is what huggingface_hub's own code keys on):

- a request for the repository without ``Authorization: Bearer <token>``, or with another token: 401 with
  ``X-Error-Code: GatedRepo`` and the Hub's message, which ``hf_raise_for_status`` raises as GatedRepoError. (The
  real Hub shows a gated repo's model_info to anyone and gates only its files; this one gates every request.)
- an unknown repository, revision or file: ``X-Error-Code`` RepoNotFound, RevisionNotFound or EntryNotFound, which
  become RepositoryNotFoundError, RevisionNotFoundError and (Remote)EntryNotFoundError.
- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model_info; with ``blobs=true``
  (``files_metadata=True``) each sibling's ``size``, ``blobId`` and, for LFS files, ``lfs: {sha256, size,
  pointerSize}``. ``GET /api/models/{repo}/tree/{rev}[/{path}]``: list_repo_tree, which snapshot_download uses.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a regular file is answered in place, ``ETag`` its git blob id;
  an LFS file is answered 302 with ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size`` to a second server on
  another port, i.e. another origin, as the Hub sends to its CDN with a presigned URL. huggingface_hub reads the
  metadata off that redirect and drops the Authorization header for the other origin; the CDN answers 400 to any
  Authorization header, as S3 does, so a client that would leak the token there fails loudly.
- no ``X-Xet-Hash``/``X-Xet-Refresh-Route`` headers and no ``xetHash`` in the tree: huggingface_hub then
  downloads over plain HTTP, even with hf_xet installed.
- ``Range`` on file GETs (huggingface_hub resumes an interrupted download with one).

The revision is one commit id derived from the files' content; ``main`` is its alias. Which files are LFS
follows the Hub's default ``.gitattributes`` patterns, plus any file over 10 MB (the Hub refuses larger git
blobs). No ``.gitattributes`` is invented: the real Hub lists one, but nothing huggingface_hub does needs it.
The token is never logged; the server logs nothing at all.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple, Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

# The Hub's default .gitattributes (what a new repository gets), matched against the file's name, and the
# patterns the fleet's models use; `saved_model/**/*` is left out (a folder rule).
LFS_PATTERNS = ("*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib",
                "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet",
                "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar.*", "*.tar",
                "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*")
LFS_THRESHOLD = 10 * 1024 * 1024
LAST_MODIFIED = "2024-06-01T00:00:00.000Z"
CHUNK = 1024 * 1024
SETTLE_S = 10  # how long the bookkeeping waits for requests still being answered

API_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)"
                      r"(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<rest>/.*)?)?$")
RESOLVE_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+|[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
CDN_PATH = re.compile(r"^/lfs/(?P<sha256>[0-9a-f]{64})$")
# What S3 answers to a presigned URL fetched with an Authorization header as well.
S3_TWO_AUTHS = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidArgument</Code><Message>Only one auth'
                b" mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the"
                b" Authorization header should be specified</Message></Error>")


class HubRequest(NamedTuple):
    """One request either server answered. ``authorized``: on the hub, whether it carried the token; on the CDN
    (paths under ``/lfs/``), whether it carried any Authorization header at all (which the CDN refuses)."""

    method: str
    path: str
    authorized: bool
    status: int


@dataclass(frozen=True)
class HubFile:
    path: str  # relative to the repository's root, with "/"
    source: Path
    size: int
    sha256: str
    blob_id: str  # git's object id: of the content, or for an LFS file of its pointer
    lfs: bool
    pointer_size: int  # size of the LFS pointer that git stores in the file's place (0 for regular files)

    def sibling(self, blobs: bool) -> dict:
        """As model_info lists it; sizes, ids and LFS only with ``blobs=true``."""
        entry: dict = {"rfilename": self.path}
        if blobs:
            entry.update(size=self.size, blobId=self.blob_id)
            if self.lfs:
                entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    name = path.rsplit("/", 1)[-1]
    return size > LFS_THRESHOLD or any(fnmatch.fnmatchcase(name, pattern) for pattern in LFS_PATTERNS)


def read_hub_file(root: Path, source: Path) -> HubFile:
    """A file's sizes and ids, read in chunks (weights may be large)."""
    path = source.relative_to(root).as_posix()
    sha256, size = hashlib.sha256(), 0
    with source.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            sha256.update(chunk)
            size += len(chunk)
    if is_lfs(path, size):
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256.hexdigest()}\nsize {size}\n"
        return HubFile(path, source, size, sha256.hexdigest(), git_blob_id(pointer.encode()), True, len(pointer))
    return HubFile(path, source, size, sha256.hexdigest(), git_blob_id(source.read_bytes()), False, 0)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one range ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` asks for, as (first, last); None for the whole
    file (no header, or several ranges, which a server may ignore). ValueError when it cannot be satisfied."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        raise ValueError(header)
    if not first:
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ValueError(header)
    return start, end


class StandInHub:
    """The Hub (and its CDN) on two ports of ``address``, serving ``model_dir`` as the one revision of the gated
    ``repo_id``. A context manager; ``url`` is the endpoint to give huggingface_hub, known once started."""

    def __init__(self, model_dir: Path, token: str, repo_id: str = "lab/tiny-llama-gated",
                 address: str = "127.0.0.1", port: int = 0):
        self.repo_id = repo_id
        self.address = address
        self._port = port
        self._token = token
        self._signing_key = secrets.token_bytes(32)  # signs the CDN's URLs, as a presigned URL is
        root = Path(model_dir)
        sources = sorted(p for p in root.rglob("*") if p.is_file())
        self.files: dict[str, HubFile] = {f.path: f for f in (read_hub_file(root, p) for p in sources)}
        manifest = "".join(f"{f.path}\0{f.blob_id}\0{f.size}\n" for f in self.files.values())
        self.revision = hashlib.sha1(f"stand-in hub\0{repo_id}\0{manifest}".encode()).hexdigest()
        # Guards the log and counts; a request is "in flight" from the moment a handler takes it until it is
        # logged, so that a reader who already has a response waits for its entry (the server logs a download
        # only after its last byte went out, when the client may already be reading it).
        self._lock = threading.Condition()
        self._in_flight = 0
        self._requests: list[HubRequest] = []
        self._downloads: dict[str, int] = {}
        self._servers: list[ThreadingHTTPServer] = []

    def __repr__(self) -> str:  # without the token
        return f"StandInHub({self.repo_id!r}, revision={self.revision!r}, files={len(self.files)})"

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> Self:
        if self._servers:
            return self
        for port, handler in ((self._port, HubHandler), (0, CdnHandler)):
            server = ThreadingHTTPServer((self.address, port), handler)
            server.daemon_threads = True
            server.hub = self  # type: ignore[attr-defined]
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"stand-in-hub-{handler.__name__}", daemon=True).start()
        return self

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._origin(0)

    @property
    def cdn_url(self) -> str:
        return self._origin(1)

    def _origin(self, index: int) -> str:
        if not self._servers:
            raise RuntimeError("the stand-in hub is not started")
        return f"http://{self.address}:{self._servers[index].server_address[1]}"

    # --- bookkeeping -------------------------------------------------------------------------------------------
    @property
    def requests(self) -> list[HubRequest]:
        """A copy of every request answered so far, in order."""
        with self._lock:
            self._lock.wait_for(lambda: not self._in_flight, timeout=SETTLE_S)
            return list(self._requests)

    def downloads(self, path: str) -> int:
        """How many GETs delivered the whole of the file ``path`` (from the hub, or the CDN for an LFS file)."""
        with self._lock:
            self._lock.wait_for(lambda: not self._in_flight, timeout=SETTLE_S)
            return self._downloads.get(path, 0)

    def _taken(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def _record(self, request: HubRequest, downloaded: str | None = None) -> None:
        with self._lock:
            self._requests.append(request)
            if downloaded is not None:
                self._downloads[downloaded] = self._downloads.get(downloaded, 0) + 1

    # --- what the hub knows ------------------------------------------------------------------------------------
    def authorized(self, header: str | None) -> bool:
        return hmac.compare_digest((header or "").encode(), f"Bearer {self._token}".encode())

    def knows_revision(self, revision: str) -> bool:
        return revision in (self.revision, "main")

    def model_info(self, blobs: bool, expand: list[str]) -> dict:
        info = {"_id": self.revision[:24], "id": self.repo_id, "modelId": self.repo_id,
                "author": self.repo_id.split("/")[0], "sha": self.revision, "lastModified": LAST_MODIFIED,
                "createdAt": LAST_MODIFIED, "private": False, "gated": "manual", "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "usedStorage": sum(f.size for f in self.files.values()),
                "siblings": [f.sibling(blobs) for f in self.files.values()]}
        if expand:  # as the Hub does: only what was asked for, and the ids
            info = {key: value for key, value in info.items() if key in ("_id", "id", *expand)}
        return info

    def tree(self, folder: str, recursive: bool) -> list[dict] | None:
        """list_repo_tree's entries under ``folder`` ("" for the root), folders first; None if no such folder."""
        folders = sorted({parent for path in self.files for parent in _parents(path)})
        if folder and folder not in folders:
            return None
        prefix = f"{folder}/" if folder else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix):])

        entries = [{"type": "directory", "oid": self._tree_id(name), "size": 0, "path": name}
                   for name in folders if wanted(name)]
        return entries + [f.tree_entry() for f in self.files.values() if wanted(f.path)]

    def _tree_id(self, folder: str) -> str:
        inside = "".join(f"{f.path}\0{f.blob_id}\n" for f in self.files.values() if f.path.startswith(f"{folder}/"))
        return hashlib.sha1(f"tree\0{inside}".encode()).hexdigest()

    def cdn_location(self, hub_file: HubFile) -> str:
        """A presigned URL of the file on the CDN: its sha256, its repository path (for `downloads`), a signature."""
        query = f"path={quote(hub_file.path, safe='')}&sig={self._signature(hub_file.sha256, hub_file.path)}"
        return f"{self.cdn_url}/lfs/{hub_file.sha256}?{query}"

    def cdn_file(self, sha256: str, path: str, signature: str) -> HubFile | None:
        hub_file = self.files.get(path)
        if hub_file is None or hub_file.sha256 != sha256 or not hub_file.lfs:
            return None
        return hub_file if hmac.compare_digest(signature, self._signature(sha256, path)) else None

    def _signature(self, sha256: str, path: str) -> str:
        return hmac.new(self._signing_key, f"{sha256}\0{path}".encode(), hashlib.sha256).hexdigest()


def gated_message(repo: str, endpoint: str, authorization: str | None) -> str:
    """The Hub's words for a gated repository, to a caller without a token and to one with another token."""
    if authorization is None:
        return (f"Access to model {repo} is restricted. You must have access to it and be authenticated to access"
                " it. Please log in.")
    return (f"Access to model {repo} is restricted and you are not in the authorized list. Visit {endpoint}/{repo}"
            " to ask for access.")


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


class _Handler(BaseHTTPRequestHandler):
    """What both servers share: HTTP/1.1 with a length on every answer, silence, and the request log."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle kept-alive connection's thread ends after this

    @property
    def hub(self) -> StandInHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:  # the hub logs nothing (and so never the token)
        pass

    def answer(self, status: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.record(status)

    def record(self, status: int, downloaded: str | None = None) -> None:
        self.hub._record(HubRequest(self.command, urlsplit(self.path).path, self.is_authorized(), status), downloaded)

    def is_authorized(self) -> bool:
        raise NotImplementedError

    def route(self) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self.hub._taken()
        try:
            self.route()
        finally:
            self.hub._done()

    do_HEAD = do_GET

    def send_file(self, hub_file: HubFile, headers: dict) -> None:
        """The file, or the one range asked for (206), or 416; counted as a download only when a GET delivered
        all of it."""
        try:
            span = byte_range(self.headers.get("Range"), hub_file.size)
        except ValueError:
            return self.answer(416, {**headers, "Content-Range": f"bytes */{hub_file.size}"})
        start, end = span if span is not None else (0, hub_file.size - 1)
        status = 206 if span is not None else 200
        self.send_response(status)
        for name, value in {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}.items():
            self.send_header(name, str(value))
        if span is not None:
            self.send_header("Content-Range", f"bytes {start}-{end}/{hub_file.size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "HEAD":
            return self.record(status)
        try:
            _copy(hub_file.source, start, end - start + 1, self.wfile)
        except (BrokenPipeError, ConnectionResetError):  # the client went away: not a download
            self.close_connection = True
            return self.record(status)
        self.record(status, hub_file.path if status == 200 else None)


def _copy(source: Path, start: int, length: int, sink) -> None:
    with source.open("rb") as stream:
        stream.seek(start)
        while length > 0 and (chunk := stream.read(min(CHUNK, length))):
            sink.write(chunk)
            length -= len(chunk)


class HubHandler(_Handler):
    def is_authorized(self) -> bool:
        return self.hub.authorized(self.headers.get("Authorization"))

    def route(self) -> None:
        url = urlsplit(self.path)
        if match := RESOLVE_PATH.match(url.path):
            return self.resolve(match["repo"], unquote(match["rev"]), unquote(match["path"]))
        if (match := API_PATH.match(url.path)) and self.command == "GET":
            return self.api(match, parse_qs(url.query))
        self.answer(404, {"Content-Type": "application/json"}, b'{"error":"Sorry, we can\'t find the page."}')

    def refuse(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        """An error as the Hub sends it: X-Error-Code (what huggingface_hub maps to an exception), X-Error-Message
        and a JSON body."""
        body = json.dumps({"error": message}).encode()
        self.answer(status, {**(headers or {}), "Content-Type": "application/json; charset=utf-8",
                             "X-Error-Code": code, "X-Error-Message": message}, body)

    def gate(self, repo: str, revision: str | None) -> bool:
        """Answers, and says so, when the repository, the caller's token or the revision is not right."""
        hub = self.hub
        if repo != hub.repo_id:  # the Hub answers 401 when it cannot tell a missing repo from a hidden one
            self.refuse(404 if self.is_authorized() else 401, "RepoNotFound", "Repository not found")
        elif not self.is_authorized():
            self.refuse(401, "GatedRepo", gated_message(repo, hub.url, self.headers.get("Authorization")))
        elif revision is not None and not hub.knows_revision(revision):
            self.refuse(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        else:
            return False
        return True

    def api(self, match: re.Match, query: dict) -> None:
        revision = unquote(match["rev"]) if match["rev"] else "main"
        if self.gate(match["repo"], revision):
            return
        if match["kind"] == "tree":
            folder = unquote(match["rest"] or "/").strip("/")
            entries = self.hub.tree(folder, query.get("recursive", ["false"])[0].lower() == "true")
            if entries is None:
                return self.refuse(404, "EntryNotFound", f"{folder} does not exist on \"{revision}\"")
            return self.json(entries)
        if match["rest"]:
            return self.answer(404, {"Content-Type": "application/json"}, b'{"error":"Not Found"}')
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        self.json(self.hub.model_info(blobs, query.get("expand", []) + query.get("expand[]", [])))

    def json(self, payload) -> None:
        self.answer(200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(payload).encode())

    def resolve(self, repo: str, revision: str, path: str) -> None:
        if self.gate(repo, revision):
            return
        hub = self.hub
        commit = {"X-Repo-Commit": hub.revision}
        hub_file = hub.files.get(path)
        if hub_file is None:
            return self.refuse(404, "EntryNotFound", "Entry not found", commit)
        if not hub_file.lfs:
            return self.send_file(hub_file, {**commit, "ETag": f'"{hub_file.blob_id}"'})
        location = hub.cdn_location(hub_file)
        self.answer(302, {**commit, "ETag": f'"{hub_file.blob_id}"', "X-Linked-Etag": f'"{hub_file.sha256}"',
                          "X-Linked-Size": hub_file.size, "Location": location,
                          "Content-Type": "text/plain; charset=utf-8"}, f"Found. Redirecting to {location}".encode())


class CdnHandler(_Handler):
    """The CDN: the bytes of LFS files, for a presigned URL and without any Authorization header."""

    def is_authorized(self) -> bool:
        return self.headers.get("Authorization") is not None

    def route(self) -> None:
        url = urlsplit(self.path)
        if self.is_authorized():
            return self.answer(400, {"Content-Type": "application/xml"}, S3_TWO_AUTHS)
        match, query = CDN_PATH.match(url.path), parse_qs(url.query)
        hub_file = match and self.hub.cdn_file(match["sha256"], query.get("path", [""])[0],
                                               query.get("sig", [""])[0])
        if not hub_file:
            return self.answer(403, {"Content-Type": "application/xml"},
                               b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>")
        name = quote(hub_file.path.rsplit("/", 1)[-1])
        self.send_file(hub_file, {"ETag": f'"{hub_file.sha256}"',
                                  "Content-Disposition": f"inline; filename*=UTF-8''{name}; filename=\"{name}\";"})
