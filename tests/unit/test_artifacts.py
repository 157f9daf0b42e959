"""The artifact fetcher (roles/files/artifacts.py), run as the hosts run it, against real HTTP servers
on loopback that record what they were asked: files fetched and verified byte for byte, files already
here kept without a request, a changed, short or missing file refused with no partial file left, a
token that reaches its own origin only and is gone from disk after the run, manifests that would
write outside the folder, an interrupted run, and the verify and unlisted commands."""

import functools
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from roles.files import artifacts

SCRIPT = Path(artifacts.__file__)
TOKEN = "hf_FleetTestToken0123456789abcdef"
WHEEL = "torch-2.13.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl"


class Server(ThreadingHTTPServer):
    """Serves a folder on 127.0.0.1 and records every request (method, path, headers). It can be told to want a
    token, to answer 400 to any Authorization header (as presigned CDN URLs do), to redirect a path, to fail with
    the Authorization header in its reason phrase, or to stall halfway through a file."""

    daemon_threads = True

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[dict] = []
        self.token = None
        self.no_authorization = False
        self.redirects: dict[str, str] = {}
        self.fail_with = None
        self.stall: dict[str, threading.Event] = {}
        super().__init__(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def gets(self) -> list[dict]:
        return [request for request in self.requests if request["method"] == "GET"]


class Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append({"method": "GET", "path": self.path,
                                "headers": {name.lower(): value for name, value in self.headers.items()}})
        authorization = self.headers.get("Authorization")
        if server.no_authorization and authorization is not None:
            return self.send_error(400, "Only one auth mechanism allowed")
        if server.token and authorization != f"Bearer {server.token}":
            return self.send_error(401)
        if server.fail_with:
            return self.send_error(server.fail_with, f"no good: {authorization}")
        if self.path in server.redirects:
            self.send_response(302)
            self.send_header("Location", server.redirects[self.path])
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if self.path in server.stall:
            return self.send_half(server.stall[self.path])
        return super().do_GET()

    def send_half(self, release: threading.Event):
        data = (self.server.root / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        release.wait(20)


@pytest.fixture
def serve(tmp_path):
    """Starts servers, each on its own port (its own origin), serving tmp_path/<name>."""
    servers = []

    def start(name: str = "origin") -> Server:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        servers.append(Server(root))
        return servers[-1]

    yield start
    for server in servers:
        for release in server.stall.values():
            release.set()
        server.shutdown()
        server.server_close()


def put(root: Path, path: str, data: bytes) -> bytes:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_bytes(data)
    return data


def entry(path: str, data: bytes, kind: str = "sha256") -> dict:
    if kind == "sha256":
        return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"path": path, "size": len(data), "git_sha1": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}


def manifest(tmp_path: Path, entries: list[dict], name: str = "manifest.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"files": entries}))
    return path


def run(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def fetch(base_url: str, manifest_file: Path, dest: Path, *more) -> subprocess.CompletedProcess:
    return run("fetch", "--base-url", base_url, "--manifest", manifest_file, "--dest", dest, *more)


def summary(result: subprocess.CompletedProcess) -> dict:
    last = result.stdout.splitlines()[-1]
    assert last.startswith("FETCHED "), result.stdout + result.stderr
    return json.loads(last.removeprefix("FETCHED "))


def partials(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".partial")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def release(serve, tmp_path):
    """An origin serving five files under /cache/r1 (sha256 and git_sha1, nested, a "+" in a name, one of
    3 MB), and their manifest."""
    server = serve()
    root = server.root / "cache" / "r1"
    files = {
        "config.json": (put(root, "config.json", b'{"model_type": "llama"}\n'), "sha256"),
        "tokenizer.json": (put(root, "tokenizer.json", b'{"version": "1.0"}' * 100), "git_sha1"),
        "sub/dir/f.bin": (put(root, "sub/dir/f.bin", os.urandom(3000)), "sha256"),
        WHEEL: (put(root, WHEEL, os.urandom(4000)), "sha256"),
        "model.safetensors": (put(root, "model.safetensors", os.urandom(3 * 1024 * 1024 + 5)), "sha256"),
    }
    listed = manifest(tmp_path, [entry(path, data, kind) for path, (data, kind) in files.items()])
    return server, f"{server.url}/cache/r1", {path: data for path, (data, _) in files.items()}, listed


def test_fetches_every_file_byte_for_byte(release, tmp_path):
    server, base, files, listed = release
    result = fetch(base + "/", listed, tmp_path / "dest")
    assert result.returncode == 0, result.stderr
    for path, data in files.items():
        assert (tmp_path / "dest" / path).read_bytes() == data
    assert summary(result)["fetched"] == 5 and summary(result)["kept"] == 0
    assert summary(result)["bytes"] == sum(len(data) for data in files.values())
    assert isinstance(summary(result)["seconds"], float)
    total = sum(len(data) for data in files.values()) / 1e6
    assert result.stderr.splitlines()[0] == (f"fetch: 5 files, {total:.1f} MB listed; 0 already here (verified), "
                                             f"5 to fetch ({total:.1f} MB) from {base}/")
    assert sorted(line.split()[1] for line in result.stderr.splitlines()[1:]) == [f"[{i}/5]" for i in range(1, 6)]
    assert f"/cache/r1/{WHEEL.replace('+', '%2B')}" in [request["path"] for request in server.gets()]
    assert {request["headers"]["user-agent"] for request in server.gets()} == {"vllm-fleet-artifacts/1"}
    assert partials(tmp_path / "dest") == []


def test_a_second_fetch_keeps_everything_without_a_request(release, tmp_path):
    server, base, files, listed = release
    assert fetch(base, listed, tmp_path / "dest").returncode == 0
    server.requests.clear()
    result = fetch(base, listed, tmp_path / "dest")
    assert result.returncode == 0, result.stderr
    assert summary(result) | {"seconds": 0} == {"fetched": 0, "kept": 5, "bytes": 0, "seconds": 0}
    assert server.gets() == []
    assert "5 already here (verified), 0 to fetch" in result.stderr


@pytest.mark.parametrize("path, kind", [("config.json", "sha256"), ("tokenizer.json", "git_sha1")])
def test_a_changed_byte_is_refused_and_no_partial_file_stays(release, tmp_path, path, kind):
    server, base, files, listed = release
    changed = bytearray(files[path])
    changed[3] ^= 0x01
    (server.root / "cache" / "r1" / path).write_bytes(changed)
    result = fetch(base, listed, tmp_path / "dest")
    assert result.returncode == 1
    expected, actual = entry(path, files[path], kind)[kind], entry(path, bytes(changed), kind)[kind]
    assert f"{path}: {kind} mismatch: expected {expected}, got {actual} (from {base}/{path})" in result.stderr
    assert "FETCHED" not in result.stdout
    assert not (tmp_path / "dest" / path).exists()
    assert partials(tmp_path / "dest") == []
    for other, data in files.items():
        if other != path:
            assert (tmp_path / "dest" / other).read_bytes() == data


@pytest.mark.parametrize("served", [b"0123456789" * 2, b"01234"])
def test_a_file_of_another_size_is_refused(serve, tmp_path, served):
    server = serve()
    put(server.root, "weights.bin", served)
    listed = manifest(tmp_path, [entry("weights.bin", b"0123456789")])
    result = fetch(server.url, listed, tmp_path / "dest")
    assert result.returncode == 1
    assert f"weights.bin: size mismatch: expected 10 bytes, got {len(served)}" in result.stderr
    assert list((tmp_path / "dest").rglob("*")) == []


def test_a_file_the_server_does_not_have(serve, tmp_path):
    server = serve()
    listed = manifest(tmp_path, [entry("config.json", put(server.root, "config.json", b"{}")),
                                 entry("absent.bin", b"x")])
    result = fetch(server.url, listed, tmp_path / "dest")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"absent.bin: {server.url}/absent.bin: HTTP 404: not found"
    assert (tmp_path / "dest" / "config.json").read_bytes() == b"{}"


def test_a_server_that_is_not_there(tmp_path):
    port = free_port()
    result = fetch(f"http://127.0.0.1:{port}/cache", manifest(tmp_path, [entry("a.bin", b"a")]), tmp_path / "dest")
    assert result.returncode == 1
    assert f"a.bin: cannot reach http://127.0.0.1:{port}: connection refused" in result.stderr


def test_a_corrupt_file_already_here_is_fetched_again(release, tmp_path):
    server, base, files, listed = release
    dest = tmp_path / "dest"
    put(dest, "config.json", files["config.json"])
    put(dest, "sub/dir/f.bin", bytes(len(files["sub/dir/f.bin"])))  # the right size, the wrong bytes
    result = fetch(base, listed, dest)
    assert result.returncode == 0, result.stderr
    assert (summary(result)["fetched"], summary(result)["kept"]) == (4, 1)
    assert (dest / "sub/dir/f.bin").read_bytes() == files["sub/dir/f.bin"]
    assert "/cache/r1/config.json" not in [request["path"] for request in server.gets()]


def test_the_token_reaches_its_origin_only(serve, tmp_path):
    origin, cdn = serve("origin"), serve("cdn")
    origin.token, cdn.no_authorization = TOKEN, True
    direct, lfs, moved = put(origin.root, "config.json", b"{}"), os.urandom(5000), put(origin.root, "v2/t.json", b"[]")
    put(cdn.root, "blobs/abc", lfs)
    origin.redirects = {"/model.safetensors": f"{cdn.url}/blobs/abc?X-Amz-Signature=s1",
                        "/tokenizer.json": "/v2/t.json"}
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    listed = manifest(tmp_path, [entry("config.json", direct), entry("model.safetensors", lfs),
                                 entry("tokenizer.json", moved)])
    result = fetch(origin.url, listed, tmp_path / "dest", "--token-file", token_file)
    assert result.returncode == 0, result.stderr
    assert not token_file.exists()
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == lfs
    assert (tmp_path / "dest" / "tokenizer.json").read_bytes() == b"[]"
    assert sorted(request["path"] for request in origin.gets()) == [
        "/config.json", "/model.safetensors", "/tokenizer.json", "/v2/t.json"]
    assert {request["headers"].get("authorization") for request in origin.gets()} == {f"Bearer {TOKEN}"}
    assert [request["headers"].get("authorization") for request in cdn.gets()] == [None]
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize("code, words", [(401, "HTTP 401: refused (a gated or private repository needs a valid token)"),
                                         (500, "HTTP 500: no good: Bearer <token>")])
def test_the_token_never_shows_in_an_error(serve, tmp_path, code, words):
    server = serve()
    if code == 401:
        server.token = "another-token"
    else:
        server.fail_with = code  # its reason phrase quotes the Authorization header it got
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    listed = manifest(tmp_path, [entry("a.bin", b"a")])
    result = fetch(server.url, listed, tmp_path / "dest", "--token-file", token_file)
    assert result.returncode == 1
    assert f"a.bin: {server.url}/a.bin: {words}" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert not token_file.exists()


def test_the_token_file_is_removed_even_when_the_manifest_is_refused(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    result = fetch("http://127.0.0.1:9/", manifest(tmp_path, [entry("../x", b"x")]), tmp_path / "dest",
                   "--token-file", token_file)
    assert result.returncode == 2
    assert not token_file.exists()
    assert TOKEN not in result.stderr


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a//b", "sub/../../x", "a\\b", "a\0b", "./a", ""])
def test_a_path_that_could_leave_the_folder_is_refused(serve, tmp_path, path):
    server = serve()
    put(server.root, "ok.bin", b"ok")
    listed = manifest(tmp_path, [entry("ok.bin", b"ok"), entry(path, b"x")])
    result = fetch(server.url, listed, tmp_path / "dest")
    assert result.returncode == 2
    assert f"refusing the path {path!r}" in result.stderr
    assert not (tmp_path / "dest").exists()
    assert server.requests == []


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_fetch_leaves_no_partial_file(serve, tmp_path, signum, code):
    server = serve()
    data = put(server.root, "big.bin", os.urandom(200_000))
    server.stall["/big.bin"] = threading.Event()
    env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    args = ["fetch", "--base-url", server.url, "--manifest", manifest(tmp_path, [entry("big.bin", data)]),
            "--dest", tmp_path / "dest"]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not partials(tmp_path / "dest") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partials(tmp_path / "dest"), "the download never started"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == code, stderr
    assert partials(tmp_path / "dest") == []
    assert not (tmp_path / "dest" / "big.bin").exists()


def test_a_large_download_says_how_far_it_has_got(release, tmp_path, monkeypatch, capsys):
    server, base, files, listed = release
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(artifacts, "PROGRESS_EVERY_S", 0.0)
    assert artifacts.main(["fetch", "--base-url", base, "--manifest", str(listed), "--dest", str(tmp_path / "d")]) == 0
    said = capsys.readouterr().err
    assert re.search(r"^fetch: model\.safetensors [1-9]\d?% \([\d.]+ of 3\.1 MB\)$", said, re.MULTILINE), said


def test_git_sha1_is_the_blob_id_git_gives():
    hasher = artifacts.Entry("hello.txt", 6, "git_sha1", "").hasher()
    hasher.update(b"hello\n")
    assert hasher.hexdigest() == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object of "hello\n"


def test_verify(tmp_path):
    folder = tmp_path / "model"
    good = [entry("config.json", put(folder, "config.json", b"{}")),
            entry("tokenizer.json", put(folder, "tokenizer.json", b"[1, 2]"), "git_sha1"),
            entry("sub/w.bin", put(folder, "sub/w.bin", b"w" * 2000))]
    result = run("verify", "--manifest", manifest(tmp_path, good), "--dir", folder)
    assert (result.returncode, result.stdout, result.stderr) == (0, "verified 3 files, 0.0 MB\n", "")
    (folder / "config.json").write_bytes(b"[]")
    (folder / "tokenizer.json").write_bytes(b"[1, 2, 3]")
    (folder / "sub/w.bin").unlink()
    result = run("verify", "--manifest", manifest(tmp_path, good), "--dir", folder)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"config.json: sha256 mismatch: expected {good[0]['sha256']}, got {hashlib.sha256(b'[]').hexdigest()}",
        "tokenizer.json: size mismatch: expected 6 bytes, got 9",
        "sub/w.bin: missing"]


def test_unlisted_names_the_files_no_manifest_keeps(tmp_path):
    store = tmp_path / "wheels"
    for name in ("a-1.whl", "b-1.whl", "c-1.whl", "d-1.whl", ".partial-x.whl"):
        put(store, name, b"w")
    (store / "sub").mkdir()
    first = manifest(tmp_path, [entry("a-1.whl", b"w")], "r1.json")
    second = manifest(tmp_path, [entry("b-1.whl", b"w"), entry("sub/d-1.whl", b"w")], "r2.json")
    result = run("unlisted", "--dir", store, "--manifest", first, "--manifest", second)
    assert (result.returncode, result.stdout) == (0, "c-1.whl\nd-1.whl\n")
    result = run("unlisted", "--dir", tmp_path / "nowhere", "--manifest", first)
    assert (result.returncode, result.stdout) == (0, "")
    result = run("unlisted", "--dir", store, "--manifest", first, "--manifest", tmp_path / "absent.json")
    assert result.returncode == 2
    assert "absent.json" in result.stderr
