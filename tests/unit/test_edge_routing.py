"""The edge's routing policies (nginx_routing) and the instances it keeps out (nginx_instances_down):
the upstream blocks each policy renders, the down flags in every one of them, the njs parts only
for the prefix policy, and the planner's refusals."""

from dataclasses import replace

import pytest

from roles import secrets
from roles.errors import FleetConfigError
from roles.nginx import render_conf
from roles.plan import setting_checks, settings
from roles.plan.edge import plan_fleet_edge
from roles.plan.fleet import plan_fleet
from roles.plan.routing import check_instances_down, held_down

POLICIES = ("least_conn", "session", "prefix")
LB = {"ssh_hostname": "10.9.0.11"}


@pytest.fixture
def fleet(host_data, tmp_path):
    """h1 (instances a, b; the load balancer) and h2 (instance a), with the edge planned."""
    folder = tmp_path / "secrets"
    secrets.add_client_key(folder, "alice")
    hosts = [("h1", host_data()), ("h2", host_data(ssh_hostname="10.9.0.12", vllm_instances=[{"name": "a", "port": 8001}]))]
    lb = {**LB, "nginx_secrets_dir": str(folder)}
    return replace(plan_fleet(hosts, ["h1"]), edges=plan_fleet_edge([("h1", lb)], tmp_path))


def conf_of(fleet, routing="least_conn", down=frozenset(), **data):
    return render_conf(fleet, "h1", {**LB, "nginx_routing": routing, **data}, down)


def upstream_blocks(conf: str) -> dict[str, list[str]]:
    """Each upstream block's lines (stripped, comments kept), by its name."""
    blocks = {}
    for block in conf.split("\nupstream ")[1:]:
        name, body = block.split(" {\n", 1)
        blocks[name] = [line.strip() for line in body.split("\n}", 1)[0].splitlines()]
    return blocks


def routed(conf: str, route: str = "/v1/chat/completions") -> str:
    return conf.split(f"location = {route} {{", 1)[1].split("\n    }", 1)[0]


def test_least_conn_is_the_default_and_one_upstream(fleet):
    assert settings.BY_NAME["nginx_routing"].default == "least_conn"
    conf = render_conf(fleet, "h1", LB)
    assert conf == conf_of(fleet, "least_conn")
    assert list(upstream_blocks(conf)) == ["vllm_fleet"] and "least_conn;" in upstream_blocks(conf)["vllm_fleet"]
    assert "proxy_pass http://vllm_fleet;" in routed(conf)
    for absent in ("hash ", "map $http_x_session_id", "js_", "http://$vllm_fleet_upstream", "client_body_in_single_buffer",
                   "proxy_request_buffering on;", "@vllm_fleet_routed"):
        assert absent not in conf, absent


def test_session_hashes_the_session_header_and_falls_back_to_least_conn(fleet):
    conf = conf_of(fleet, "session")
    blocks = upstream_blocks(conf)
    assert list(blocks) == ["vllm_fleet", "vllm_fleet_session"]
    assert blocks["vllm_fleet_session"][0] == "hash $http_x_session_id consistent;"
    # The same servers with the same flags and keepalive in both.
    assert blocks["vllm_fleet_session"][1:] == blocks["vllm_fleet"][2:]
    fallback = conf.split("map $http_x_session_id $vllm_fleet_upstream {", 1)[1].split("}", 1)[0]
    assert fallback.split() == ['""', "vllm_fleet;", "default", "vllm_fleet_session;"]
    for route in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        assert "proxy_pass http://$vllm_fleet_upstream;" in routed(conf, route)
    assert "proxy_pass http://vllm_fleet;" in routed(conf, "/health")
    assert "js_" not in conf and "client_body_in_single_buffer" not in conf and "proxy_request_buffering on;" not in conf


def test_prefix_reads_the_body_in_memory_before_it_chooses_the_instance(fleet):
    conf = conf_of(fleet, "prefix", nginx_prefix_chars=256, nginx_client_max_body_size="8m")
    blocks = upstream_blocks(conf)
    assert list(blocks) == ["vllm_fleet", "vllm_fleet_prefix"]
    assert blocks["vllm_fleet_prefix"][0] == "hash $vllm_fleet_prefix_key consistent;"
    assert blocks["vllm_fleet_prefix"][1:] == blocks["vllm_fleet"][2:]
    assert "js_import vllm_fleet from /etc/nginx/vllm-fleet/prefix_key.js;" in conf
    assert "js_set $vllm_fleet_prefix_key vllm_fleet.prefixKey;" in conf
    assert "map $vllm_fleet_prefix_key $vllm_fleet_upstream {" in conf
    # The body whole in memory, the key's length for the JS function.
    for directive in ("client_max_body_size 8m;", "client_body_buffer_size 8m;", "client_body_in_single_buffer on;",
                      "set $vllm_fleet_prefix_chars 256;"):
        assert directive in conf, directive
    # The routed locations read the body (njs), then choose the upstream in the named location.
    for route in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        assert 'if ($vllm_fleet_client = "") {' in routed(conf, route)
        assert "js_content vllm_fleet.route;" in routed(conf, route) and "proxy_pass" not in routed(conf, route)
    named = conf.split("location @vllm_fleet_routed {", 1)[1].split("}", 1)[0]
    assert named.split() == ["proxy_request_buffering", "on;", "proxy_pass", "http://$vllm_fleet_upstream;"]
    assert "proxy_pass http://vllm_fleet;" in routed(conf, "/health")
    # Responses still stream, and failover is as before.
    assert "proxy_buffering off;" in conf and "proxy_next_upstream error timeout http_502 http_503;" in conf


@pytest.mark.parametrize("routing", POLICIES)
def test_every_upstream_block_marks_restarting_and_held_instances_down(fleet, routing):
    conf = conf_of(fleet, routing, down={"10.9.0.11:8002"}, nginx_instances_down=["h2:a"])
    blocks = upstream_blocks(conf)
    assert len(blocks) == (1 if routing == "least_conn" else 2)
    for lines in blocks.values():
        servers = [line for line in lines if line.startswith("server ")]
        assert servers == ["server 10.9.0.11:8001 max_fails=1 fail_timeout=10s;",
                           "server 10.9.0.11:8002 max_fails=1 fail_timeout=10s down;  # restarting",
                           "server 10.9.0.12:8001 max_fails=1 fail_timeout=10s down;  # nginx_instances_down"]
        assert not [line for line in lines if line.startswith("keepalive")]  # nginx_keepalive = 0: none kept


def test_held_instances_stay_down_when_the_rollout_puts_its_own_back(fleet):
    # The rolling update's put-back renders with only the broken instances down: h2:a stays out.
    put_back = conf_of(fleet, "session", down=frozenset(), nginx_instances_down=["h2:a"])
    assert put_back.count("server 10.9.0.12:8001 max_fails=1 fail_timeout=10s down;") == 2
    assert " down;" not in put_back.replace("server 10.9.0.12:8001 max_fails=1 fail_timeout=10s down;", "")
    assert held_down(fleet, {"nginx_instances_down": ["h1:b", "h2:a"]}) == {"10.9.0.11:8002", "10.9.0.12:8001"}
    assert held_down(fleet, {}) == frozenset()


def test_instances_down_must_name_instances_of_the_fleet(fleet):
    with pytest.raises(FleetConfigError) as error:
        check_instances_down(fleet, [("h1", {"nginx_instances_down": ["h1:a", "h3:a"]})])
    assert error.value.field == "host h1: `nginx_instances_down`[1]"
    assert "'h3:a' is not an instance of the fleet" in error.value.problem
    assert error.value.fix == "name instances as HOST:INSTANCE, one of h1:a, h1:b, h2:a."


def test_instances_down_may_not_take_every_instance_out(fleet):
    check_instances_down(fleet, [("h1", {"nginx_instances_down": ["h1:a", "h1:b"]})])
    with pytest.raises(FleetConfigError, match="marks every instance of the fleet down: the edge would answer 503"):
        check_instances_down(fleet, [("h1", {"nginx_instances_down": ["h1:a", "h1:b", "h2:a"]})])


@pytest.mark.parametrize("data, problem", [
    ({"nginx_routing": "random"}, "'random' is not one of least_conn, session, prefix."),
    ({"nginx_prefix_chars": 8}, "8 is outside the allowed range (at least 16)."),
    ({"nginx_instances_down": "h1:a"}, "expected a list, got 'h1:a'."),
])
def test_the_settings_refuse_other_values(data, problem):
    with pytest.raises(FleetConfigError) as error:
        setting_checks.check_host_data("lb1", data)
    assert error.value.problem == problem and error.value.field == f"host lb1: `{next(iter(data))}`"
