"""The stand-in Hub (roles.lab.hub) against the real huggingface_hub: what model_info lists, what
snapshot_download fetches (and from where, with which headers), and the errors a gated repository gives.

huggingface_hub reads its paths, token settings and telemetry switch into ``huggingface_hub.constants``
at import time, so the ``isolated`` fixture patches those constants as well as the environment; it also
refuses any connection that is not to 127.0.0.1, so a test cannot reach the network (or this machine's
real Hub token) even by mistake.
"""

import hashlib
import http.client
import json
import random
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import close_session

from roles.lab.hub import StandInHub

TOKEN = "hf_standin0123456789abcdefghijklmnop"
REPO = "lab/tiny-llama-gated"
LFS_FILES = {"model.safetensors", "original/consolidated.pth"}


def model_files() -> dict[str, bytes]:
    """A small model folder's contents: JSON and text as git keeps them, weights (LFS on the Hub) as random bytes."""
    rng = random.Random(20240601)
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 128}).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}).encode(),
        "tokenizer_config.json": b'{"bos_token": "<s>", "eos_token": "</s>"}',
        "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
        "model.safetensors": rng.randbytes(100_000),
        "original/params.json": b'{"dim": 128}',
        "original/consolidated.pth": rng.randbytes(20_000),
    }


def write_model(folder: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """huggingface_hub with a home of its own, no implicit token, no telemetry, and loopback only."""
    home = tmp_path / "hf-home"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE",
                 "HF_HUB_CACHE", "HF_TOKEN_PATH", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"HF_HOME": home, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(name, str(value))
    for name, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_XET_CACHE": str(home / "xet"),
                        "HF_ASSETS_CACHE": str(home / "assets"), "HF_TOKEN_PATH": str(home / "token"),
                        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
                        "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_OFFLINE": False}.items():
        monkeypatch.setattr(constants, name, value)
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def loopback_connect(sock, address):
        if isinstance(address, tuple) and not str(address[0]).startswith("127."):
            raise AssertionError(f"a test tried to reach {address}")
        return connect(sock, address)

    def loopback_getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"a test tried to resolve {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", loopback_connect)
    monkeypatch.setattr(socket, "getaddrinfo", loopback_getaddrinfo)
    close_session()  # huggingface_hub's shared HTTP client is made again, in this environment
    yield tmp_path
    close_session()


@pytest.fixture
def hub(isolated):
    model = write_model(isolated / "model", model_files())
    with StandInHub(model, TOKEN) as running:
        yield running


def test_revision_is_a_commit_id_of_the_files_content(tmp_path):
    files = model_files()
    first = StandInHub(write_model(tmp_path / "a", files), TOKEN).revision
    again = StandInHub(write_model(tmp_path / "b", files), TOKEN).revision
    changed = StandInHub(write_model(tmp_path / "c", {**files, "config.json": b"{}"}), TOKEN).revision
    assert len(first) == 40 and int(first, 16) >= 0
    assert first == again
    assert changed != first


def test_model_info_lists_every_file_with_size_sha256_or_blob_id(hub):
    info = HfApi(endpoint=hub.url, token=TOKEN).model_info(REPO, revision=hub.revision, files_metadata=True)
    assert info.sha == hub.revision
    assert info.id == REPO and info.gated == "manual" and info.private is False
    files = model_files()
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(files)  # and no invented .gitattributes
    for name, content in files.items():
        sibling = siblings[name]
        assert sibling.size == len(content), name
        if name in LFS_FILES:
            assert sibling.lfs is not None, name
            assert sibling.lfs.sha256 == hashlib.sha256(content).hexdigest()
            assert sibling.lfs.size == len(content)
        else:
            assert sibling.lfs is None, name
            assert sibling.blob_id == git_blob_id(content)


def test_main_is_an_alias_of_the_revision(hub):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert api.model_info(REPO, revision="main").sha == hub.revision
    assert api.model_info(REPO).sha == hub.revision


def test_file_metadata_is_read_off_the_redirect_to_the_cdn_without_xet(hub):
    content = model_files()["model.safetensors"]
    url = hf_hub_url(REPO, "model.safetensors", revision=hub.revision, endpoint=hub.url)
    metadata = get_hf_file_metadata(url, token=TOKEN, endpoint=hub.url)
    assert metadata.commit_hash == hub.revision
    assert metadata.etag == hashlib.sha256(content).hexdigest()
    assert metadata.size == len(content)
    assert metadata.location.startswith(f"{hub.cdn_url}/lfs/")
    assert metadata.xet_file_data is None  # => plain HTTP, although hf_xet is installed
    assert hub.downloads("model.safetensors") == 0


def test_snapshot_download_fetches_each_file_once_and_the_cdn_never_sees_the_token(hub, isolated):
    out = isolated / "out"
    folder = snapshot_download(REPO, revision=hub.revision, endpoint=hub.url, token=TOKEN, local_dir=out)
    assert Path(folder) == out.resolve()
    files = model_files()
    for name, content in files.items():
        assert (out / name).read_bytes() == content, name
        assert hub.downloads(name) == 1, name
    cdn = [r for r in hub.requests if r.path.startswith("/lfs/")]
    assert {r.method for r in cdn} == {"GET"} and len(cdn) == len(LFS_FILES)
    assert not any(r.authorized for r in cdn)  # no Authorization header at all
    assert all(r.status == 200 for r in cdn)
    assert all(r.authorized for r in hub.requests if not r.path.startswith("/lfs/"))


def test_snapshot_download_of_main_into_the_isolated_cache(hub, isolated):
    folder = Path(snapshot_download(REPO, endpoint=hub.url, token=TOKEN))
    assert folder == isolated / "hf-home" / "hub" / "models--lab--tiny-llama-gated" / "snapshots" / hub.revision
    for name, content in model_files().items():
        assert (folder / name).read_bytes() == content, name
        assert hub.downloads(name) == 1, name


@pytest.mark.parametrize(("token", "words"), [(None, "Please log in"), ("hf_wrong0123456789", "authorized list")])
def test_without_the_token_the_repository_is_gated(hub, isolated, token, words):
    # "Please log in" also shows that no token of this machine was sent in the token's place
    with pytest.raises(GatedRepoError, match=words):
        HfApi(endpoint=hub.url, token=token).model_info(REPO, revision=hub.revision, files_metadata=True)
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO, "config.json", revision=hub.revision, endpoint=hub.url, token=token,
                        local_dir=isolated / "out")
    assert hub.requests and all(r.status == 401 and not r.authorized for r in hub.requests)
    assert hub.downloads("config.json") == 0


def test_unknown_revision_repository_and_file(hub, isolated):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="v9", endpoint=hub.url, token=TOKEN, local_dir=isolated / "a")
    with pytest.raises(RepositoryNotFoundError) as caught:
        api.model_info("lab/no-such-model", revision=hub.revision)
    assert not isinstance(caught.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError) as caught:
        hf_hub_download("lab/no-such-model", "config.json", endpoint=hub.url, token=TOKEN, local_dir=isolated / "b")
    assert not isinstance(caught.value, GatedRepoError)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "no-such-file.json", revision=hub.revision, endpoint=hub.url, token=TOKEN,
                        local_dir=isolated / "c")


def lfs_location(hub: StandInHub, name: str) -> str:
    """Where the hub redirects an authorized GET of an LFS file (read off the 302, not followed)."""
    address = urlsplit(hub.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    connection.request("GET", f"/{REPO}/resolve/{hub.revision}/{name}", headers={"Authorization": f"Bearer {TOKEN}"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 302
    return response.headers["Location"]


def test_the_cdn_refuses_any_authorization_header(hub):
    location = lfs_location(hub, "original/consolidated.pth")
    assert location.startswith(f"{hub.cdn_url}/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(location, headers={"Authorization": "Bearer anything"}))
    assert refused.value.code == 400
    assert b"Only one auth mechanism allowed" in refused.value.read()
    assert hub.downloads("original/consolidated.pth") == 0
    with urllib.request.urlopen(location, timeout=10) as response:
        assert response.read() == model_files()["original/consolidated.pth"]
    assert hub.downloads("original/consolidated.pth") == 1


def test_a_stdlib_client_must_not_carry_the_token_over_the_redirect(hub):
    url = f"{hub.url}/{REPO}/resolve/{hub.revision}/model.safetensors"
    leaky = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})  # urllib keeps it on redirects
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(leaky, timeout=10)
    assert refused.value.code == 400
    careful = urllib.request.Request(url)
    careful.add_unredirected_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(careful, timeout=10) as response:
        assert response.read() == model_files()["model.safetensors"]
    assert hub.downloads("model.safetensors") == 1


def test_a_range_is_served_and_not_counted_as_a_download(hub):
    address = urlsplit(hub.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    connection.request("GET", f"/{REPO}/resolve/main/original/params.json",
                       headers={"Authorization": f"Bearer {TOKEN}", "Range": "bytes=2-6"})
    response = connection.getresponse()
    assert response.status == 206
    assert response.read() == model_files()["original/params.json"][2:7]
    assert response.headers["Content-Range"] == f"bytes 2-6/{len(model_files()['original/params.json'])}"
    connection.close()
    assert hub.downloads("original/params.json") == 0
