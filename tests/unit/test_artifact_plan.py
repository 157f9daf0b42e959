"""The artifact cache's plan (roles/plan/artifacts.py) and where a run's artifacts come from: which
host serves the cache and to whom, what is refused before any host is touched (a second cache host,
a cache or fleet host known only by name, a taken port, a run that leaves the cache out), what the
host firewall and the real nft make of it, and which files of a hub snapshot are worth fetching."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from roles import firewall
from roles.artifact_sources import wanted
from roles.common import ArtifactFile
from roles.errors import FleetConfigError
from roles.plan import setting_checks
from roles.plan.fleet import check_run_limit, plan_fleet, with_artifact_cache, with_edge_and_firewalls
from tests.deploy.fakehost import session_secrets_dir

LB = ("lb1", {"ssh_hostname": "10.9.0.2"})


def planned(host_data, lb=LB, cache_group=(), more=(), **h1):
    """h1 (vLLM), h2 (vLLM) and the load balancer lb1 (with ``lb``'s data), planned as a deploy does."""
    vllm = [("h1", host_data(**h1)), ("h2", host_data(ssh_hostname="10.9.0.12"))]
    lb = (lb[0], {"nginx_secrets_dir": str(session_secrets_dir()), **lb[1]})
    everyone = [*vllm, lb, *more]
    for name, data in everyone:
        setting_checks.check_host_data(name, data)
    plan = with_artifact_cache(plan_fleet(vllm, [lb[0]]), everyone, cache_group)
    return with_edge_and_firewalls(plan, [lb], everyone, Path.cwd())


def refusal(host_data, **kwargs) -> FleetConfigError:
    with pytest.raises(FleetConfigError) as refused:
        planned(host_data, **kwargs)
    return refused.value


def test_the_first_load_balancer_serves_the_fleets_own_hosts(host_data):
    cache = planned(host_data).cache
    assert (cache.host, cache.url, cache.root) == ("lb1", "http://10.9.0.2:8480", "/var/lib/vllm-fleet/cache")
    assert cache.allow_from == ("10.9.0.11", "10.9.0.12", "10.9.0.2")
    assert cache.wheels_url == "http://10.9.0.2:8480/wheels/"
    assert cache.model_url("tiny-0123") == "http://10.9.0.2:8480/models/tiny-0123/"


def test_the_cache_group_names_another_host_and_its_settings_apply(host_data):
    store = ("store1", {"ssh_hostname": "fd00::7", "cache_port": 9000, "cache_dir": "/srv/cache",
                        "cache_allow_from": ["10.9.0.0/24", "fd00::/64"]})
    plan = planned(host_data, cache_group=["store1"], more=[store])
    cache = plan.cache
    assert (cache.host, cache.url, cache.root, cache.allow_from) == \
        ("store1", "http://[fd00::7]:9000", "/srv/cache", ("10.9.0.0/24", "fd00::/64"))
    store_rules = firewall.render_rules(plan.firewall("store1"))
    assert 'ip saddr { 10.9.0.0/24 } tcp dport 9000 accept comment "artifact cache' in store_rules
    assert 'ip6 saddr { fd00::/64 } tcp dport 9000 accept comment "artifact cache' in store_rules
    assert "9000" not in firewall.render_rules(plan.firewall("lb1"))


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft is installed by `make test`")
def test_nft_accepts_the_cache_rule(host_data, tmp_path):
    rules = tmp_path / "rules.nft"
    rules.write_text(firewall.render_rules(planned(host_data).firewall("lb1")))
    checked = subprocess.run(["unshare", "-rn", "nft", "-c", "-f", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_two_cache_hosts_are_refused(host_data):
    error = refusal(host_data, cache_group=["lb1", "h2"])
    assert error.field == "inventory group `cache`" and "has 2 hosts (lb1, h2)" in error.problem


def test_a_cache_host_known_by_name_is_refused(host_data):
    error = refusal(host_data, lb=("lb1", {"ssh_hostname": "lb1.internal"}))
    assert error.field == "host lb1 (the artifact cache): `vllm_advertise_address`"
    assert "'lb1.internal', a name" in error.problem and "set vllm_advertise_address on lb1" in error.fix


def test_a_fleet_host_known_by_name_needs_cache_allow_from(host_data):
    error = refusal(host_data, ssh_hostname="gpu-01.internal", vllm_advertise_address=None)
    assert error.field == "host h1: `vllm_advertise_address`"
    assert "cache_allow_from on lb1" in error.fix
    allowed = planned(host_data, lb=("lb1", {**LB[1], "cache_allow_from": ["10.9.0.0/24"]}),
                      ssh_hostname="gpu-01.internal")
    assert allowed.cache.allow_from == ("10.9.0.0/24",)


def test_a_cache_port_something_else_listens_on_is_refused(host_data):
    on_h1 = refusal(host_data, cache_group=["h1"], cache_port=8001)
    assert on_h1.field == "host h1 (the artifact cache): `cache_port`"
    assert "is 8001, where instance a listens on this host" in on_h1.problem
    for port, taken_by in ((9100, "the node exporter"), (443, "nginx (nginx_listen_port)")):
        on_lb = refusal(host_data, lb=("lb1", {**LB[1], "cache_port": port}))
        assert f"is {port}, where {taken_by} listens on this host" in on_lb.problem


def test_a_fleet_that_pulls_nothing_has_no_cache(host_data, tmp_path):
    index = _index_release(tmp_path)
    hub = dict(vllm_model_path=None, vllm_model_id="acme/chat-7b", vllm_model_revision="0" * 40,
               vllm_model_config=str(Path(__file__).parents[1] / "fixtures/models/tiny-llama/config.json"),
               vllm_hub_download="hosts", vllm_releases_dir=str(index))
    vllm = [("h1", host_data(**hub))]
    plan = with_artifact_cache(plan_fleet(vllm, ["h1"]), vllm, ())
    assert plan.cache is None
    # A pushed model still goes through the cache, even when the release comes from the index.
    local = [("h1", host_data(vllm_releases_dir=str(index)))]
    assert with_artifact_cache(plan_fleet(local, ["h1"]), local, ()).cache.host == "h1"


def _index_release(tmp_path: Path) -> Path:
    import hashlib

    releases = tmp_path / "releases"
    shutil.copytree(Path(__file__).resolve().parents[2] / "inventories" / "releases", releases)
    manifest = releases / "cpu-vllm-0.32.0.yml"
    old = hashlib.sha256(manifest.read_bytes()).hexdigest()
    manifest.write_text(manifest.read_text() + "  host_index_url: https://pypi.example.internal/simple\n")
    lock = releases / "cpu-vllm-0.32.0.lock"
    lock.write_text(lock.read_text().replace(old, hashlib.sha256(manifest.read_bytes()).hexdigest()))
    return releases


def test_hub_download_must_be_one_place_for_the_fleet(host_data):
    with pytest.raises(FleetConfigError) as refused:
        vllm = [("h1", host_data(vllm_hub_download="control")), ("h2", host_data(ssh_hostname="10.9.0.12"))]
        with_artifact_cache(plan_fleet(vllm, ["h1"]), vllm, ())
    assert refused.value.field == "vllm_hub_download" and "['cache', 'control']" in refused.value.problem


def test_a_run_limited_to_instance_hosts_must_include_the_cache(host_data):
    plan_store = planned(host_data, cache_group=["store1"], more=[("store1", {"ssh_hostname": "10.9.0.30"})])
    with pytest.raises(FleetConfigError) as refused:
        check_run_limit(plan_store, ["h2", "lb1"])
    assert "not the artifact cache store1" in refused.value.problem and "`--limit store1`" in refused.value.fix
    check_run_limit(plan_store, ["h2", "lb1", "store1"])


def test_a_snapshot_skips_what_vllm_never_reads_beside_safetensors():
    files = tuple(ArtifactFile(p, 1, git_sha1="0" * 40) for p in (
        ".gitattributes", "README.md", "config.json", "model-00001-of-00002.safetensors", "pytorch_model.bin",
        "original/consolidated.00.pth", "original/params.json", "tokenizer.json"))
    assert [f.path for f in wanted(files)] == ["README.md", "config.json", "model-00001-of-00002.safetensors",
                                                "tokenizer.json"]
    # Without safetensors the other formats are the weights: kept.
    bin_only = tuple(f for f in files if not f.path.endswith(".safetensors"))
    assert "pytorch_model.bin" in [f.path for f in wanted(bin_only)]
