"""The fallback provider deployed on a simulated load balancer: its key reaches the host only in
root-only files and in no command; the provider is probed with that key before nginx is given it,
and a provider that refuses it stops the host before nginx changes; a second run changes nothing;
turning the fallback off removes what it installed."""

import pytest
from pyinfra.api import StringCommand

from roles import paths, secrets
from roles.plan.fallback import FALLBACK_KEY_FILE
from tests.deploy.test_edge_deploy import LB, Edge, commands_of, ops_of, short

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")

KEY = "sk-provider-0123456789abcdef"
FALLBACK = {**LB, "nginx_fallback": "failover", "nginx_fallback_url": "https://api.example.com/v1",
            "nginx_fallback_model": "meta/llama-3.3-70b"}
FILES = (paths.NGINX_FALLBACK_JS, paths.PROVIDER_PROBE_PATH, paths.FALLBACK_KEY)


@pytest.fixture
def edge(host_data, tmp_path):
    edge = Edge(host_data, tmp_path, FALLBACK)
    secrets.write_private(edge.secrets / FALLBACK_KEY_FILE, f"{KEY}\n".encode())
    return edge


def test_the_key_is_probed_from_a_root_only_file_before_nginx_has_it(edge):
    timeline = edge.deploy()
    lb = edge.sims["lb1"]
    assert lb.files[paths.FALLBACK_KEY]["mode"] == 600 and lb.files[paths.FALLBACK_KEY]["lines"] == [KEY]
    assert f'    default "Bearer {KEY}";' in lb.files[paths.NGINX_SECRETS_CONF]["lines"]
    assert {"libnginx-mod-http-js", "ca-certificates"} <= set(lb.packages)
    probe, smoked = lb.provider_probes  # before nginx has the key, and in the smoke test
    assert smoked == probe
    assert probe[probe.index("--models-url") + 1] == "https://api.example.com/v1/models"
    assert probe[probe.index("--ca") + 1] == paths.SYSTEM_CA_BUNDLE
    # Probed after its key file is in place and before secrets.conf (nginx's copy) is written.
    names = [short(op) for op in ops_of(timeline, "lb1")]
    assert names.index("Install the fallback provider's key") < names.index(
        "Check the fallback provider from this load balancer") < names.index(
        "Install the client keys, the instances' internal key and the provider's")
    for name, op in timeline:
        strings = op.commands + [c.get_raw_value() for c in op.raw if isinstance(c, StringCommand)]
        assert not [c for c in strings if KEY in c], f"the provider's key in a command of {name}: {op.name}"
    sysctl = lb.files[paths.KEEPALIVE_SYSCTL]["lines"]
    assert "net.ipv4.tcp_keepalive_time = 15" in sysctl and f"sysctl -q -p {paths.KEEPALIVE_SYSCTL}" in \
        commands_of(timeline, "lb1")
    assert [(name, op.name) for name, op in edge.deploy() if op.commands] == []


def test_a_provider_refusing_the_key_fails_the_host_before_nginx_changes(edge):
    edge.sims["lb1"].provider = {"ok": False, "reachable": True, "problem": "the provider refused its key: HTTP 401"}
    ops = ops_of(edge.deploy(), "lb1")
    names = [short(op) for op in ops]
    check = names.index("Check the fallback provider from this load balancer")
    # A failing command: pyinfra stops the host there, before secrets.conf and the configuration.
    [command] = ops[check].commands
    assert command.endswith("exit 1") and "the provider refused its key: HTTP 401" in command and KEY not in command
    assert check < names.index("Install the client keys, the instances' internal key and the provider's") \
        < names.index("Render the fleet's edge")


def test_an_unreachable_provider_is_said_and_the_deploy_goes_on(edge):
    edge.sims["lb1"].provider = {"ok": False, "reachable": False, "problem": "https://api.example.com/v1/models "
                                 "could not be reached: timed out"}
    edge.deploy()
    assert "@vllm_fleet_fallback" in "\n".join(edge.sims["lb1"].files[paths.NGINX_CONF]["lines"])


def test_turning_the_fallback_off_removes_what_it_installed(edge):
    edge.deploy()
    edge.data["lb1"] = LB
    edge.deploy()
    lb = edge.sims["lb1"]
    assert not [path for path in FILES if path in lb.files]
    assert not [line for line in lb.files[paths.NGINX_SECRETS_CONF]["lines"] if KEY in line]
