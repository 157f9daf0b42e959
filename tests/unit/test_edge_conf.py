"""The edge's nginx configuration, rendered from a planned fleet and its secrets folder: upstreams,
the route allowlist behind client keys, per-client limits, TLS, and the root-only secrets part."""

import json
from dataclasses import replace

import pytest

from roles import secrets
from roles.errors import FleetConfigError
from roles.nginx import SMOKE_CLIENT, limit_classes, edge_clients, render_conf, render_secrets
from roles.plan.edge import plan_fleet_edge
from roles.plan.fleet import plan_fleet


@pytest.fixture
def secrets_dir(tmp_path):
    directory = tmp_path / "secrets"
    secrets.add_client_key(directory, "alice")
    secrets.add_client_key(directory, "bob")
    return directory


@pytest.fixture
def fleet_of(secrets_dir):
    """A planned fleet with its edge: vLLM hosts given as (name, data), h1 the load balancer."""
    def make(hosts, lb_data=None):
        lb = {"ssh_hostname": "10.9.0.11", "nginx_secrets_dir": str(secrets_dir), **(lb_data or {})}
        return replace(plan_fleet(hosts, ["h1"]), edges=plan_fleet_edge([("h1", lb)], secrets_dir.parent))
    return make


def conf_of(fleet, data=None, down=frozenset()):
    return render_conf(fleet, "h1", {"ssh_hostname": "10.9.0.11", **(data or {})}, down)


def test_nginx_config_lists_every_instance_and_is_streaming_safe(host_data, fleet_of):
    fleet = fleet_of([("h1", host_data()), ("h2", host_data(ssh_hostname="10.9.0.12",
                                                            vllm_instances=[{"name": "a", "port": 8001}]))])
    conf = conf_of(fleet, {"nginx_read_timeout": 1200, "nginx_keepalive": 32})
    servers = [line.split()[1] for line in conf.splitlines() if line.strip().startswith("server 10.")]
    assert servers == ["10.9.0.11:8001", "10.9.0.11:8002", "10.9.0.12:8001"]
    for directive in ("least_conn;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                      "proxy_buffering off;", "proxy_read_timeout 1200s;", "keepalive 32;",
                      "proxy_next_upstream error timeout"):
        assert directive in conf
    assert " down" not in conf


def test_nginx_config_marks_restarting_instances_down_and_nothing_else(host_data, fleet_of):
    fleet = fleet_of([("h1", host_data())])
    conf = conf_of(fleet, down={"10.9.0.11:8002"})
    servers = [line.strip() for line in conf.splitlines() if line.strip().startswith("server 10.")]
    assert servers == ["server 10.9.0.11:8001 max_fails=1 fail_timeout=10s;",
                       "server 10.9.0.11:8002 max_fails=1 fail_timeout=10s down;  # restarting"]
    assert conf.replace(" down;  # restarting", ";") == conf_of(fleet)


def test_ipv6_instances_are_bracketed_for_nginx_and_the_drain(host_data, fleet_of):
    fleet = fleet_of([("h1", host_data(ssh_hostname="fd00::11"))])
    conf = conf_of(fleet, down={"[fd00::11]:8002"})
    servers = [line.split()[1:] for line in conf.splitlines() if line.strip().startswith("server [")]
    assert servers == [["[fd00::11]:8001", "max_fails=1", "fail_timeout=10s;"],
                       ["[fd00::11]:8002", "max_fails=1", "fail_timeout=10s", "down;", "#", "restarting"]]


def locations(conf: str) -> dict[str, str]:
    """Each exact-match location's body, by path."""
    return {block.split()[0]: block.split("{", 1)[1].split("\n    }", 1)[0]
            for block in conf.split("location = ")[1:]}


def test_the_edge_forwards_only_the_allowlist_and_only_with_a_key(host_data, fleet_of):
    conf = conf_of(fleet_of([("h1", host_data())]))
    routes = locations(conf)
    assert list(routes) == ["/v1/models", "/v1/completions", "/v1/chat/completions", "/health"]
    for route in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        assert 'if ($vllm_fleet_client = "") {\n            return 401;' in routes[route]
    assert "return 401" not in routes["/health"] and "proxy_pass http://vllm_fleet;" in routes["/health"]
    # Everything else is answered by nginx itself, in OpenAI's error shape.
    catch_all = conf.split("location / {", 1)[1].split("}", 1)[0]
    assert catch_all.split() == ["return", "404;"] and "error_page 404 @not_found;" in conf
    assert conf.count("proxy_pass") == 4
    for name, status, code in (("not_found", 404, "not_found"), ("unauthorized", 401, "invalid_api_key"),
                               ("too_many", 429, "rate_limit_exceeded")):
        block = conf.split(f"location @{name} {{", 1)[1].split("\n    }", 1)[0]
        body = block.split(f"return {status} '", 1)[1].rsplit("\\n';", 1)[0]
        assert json.loads(body)["error"]["code"] == code
    assert "add_header Retry-After 1 always;" in conf.split("location @too_many {", 1)[1].split("}", 1)[0]


def test_a_task_route_is_added_and_others_are_refused(host_data, fleet_of):
    conf = conf_of(fleet_of([("h1", host_data())]), {"nginx_task_routes": ["/v1/embeddings"]})
    assert list(locations(conf))[-2:] == ["/v1/embeddings", "/health"]
    with pytest.raises(FleetConfigError, match=r"nginx_task_routes.*one of vLLM's OpenAI task routes: /v1/embeddings"):
        plan_fleet([("h1", host_data(nginx_task_routes=["/pause"]))], ["h1"])


def test_tls_only_with_modern_protocols_and_no_plain_http_unless_asked(host_data, fleet_of):
    fleet = fleet_of([("h1", host_data())])
    conf = conf_of(fleet)
    assert "listen 443 ssl default_server;" in conf and "ssl_protocols TLSv1.2 TLSv1.3;" in conf
    assert "return 308" not in conf and conf.count("listen ") == 2
    redirect = conf_of(fleet, {"nginx_http_redirect_port": 80, "nginx_server_name": "api.example.com"})
    assert "listen 80;" in redirect and "return 308 https://api.example.com$request_uri;" in redirect
    other_port = conf_of(fleet, {"nginx_http_redirect_port": 8080, "nginx_listen_port": 8443})
    assert "return 308 https://10.9.0.11:8443$request_uri;" in other_port


def test_the_client_key_never_reaches_an_instance_nor_the_log(host_data, fleet_of, secrets_dir):
    fleet = fleet_of([("h1", host_data())])
    conf = conf_of(fleet)
    assert "proxy_set_header Authorization $vllm_fleet_upstream_authorization;" in conf
    log_format = conf.split("log_format", 1)[1].split(";", 1)[0]
    assert "client=$vllm_fleet_client" in log_format and "http_authorization" not in log_format
    # No key is in the world-readable part; every one is in the root-only part.
    keys = [k.reveal() for c in edge_clients(fleet.edge("h1"), {}) for k in c.keys]
    internal = secrets.fleet_key(secrets_dir, "internal").reveal()
    assert len(keys) == 3 and not any(k in conf for k in [*keys, internal])
    private = render_secrets(fleet.edge("h1"), {})
    assert all(f'"Bearer {k}" ' in private for k in keys)
    assert f'default "Bearer {internal}";' in private and internal not in keys


def test_each_client_is_limited_in_its_own_class(host_data, fleet_of, secrets_dir):
    text = (secrets_dir / "clients.toml").read_text().replace("[clients.bob]", "[clients.bob]\nrate = 2\nconcurrency = 1")
    (secrets_dir / "clients.toml").write_text(text)
    fleet = fleet_of([("h1", host_data())], {"nginx_client_rate": 5, "nginx_client_burst": 7})
    rates, conns = limit_classes(edge_clients(fleet.edge("h1"), {"nginx_client_rate": 5, "nginx_client_burst": 7}))
    assert [(c.rate, c.burst, c.clients) for c in rates] == [(2, 7, ("bob",)), (5, 7, ("alice", SMOKE_CLIENT))]
    assert [(c.concurrency, c.clients) for c in conns] == [(1, ("bob",)), (16, ("alice", SMOKE_CLIENT))]
    conf = conf_of(fleet, {"nginx_client_rate": 5, "nginx_client_burst": 7})
    assert "limit_req_zone $vllm_fleet_rate_1 zone=vllm_fleet_rate_1:1m rate=2r/s;" in conf
    assert "limit_req zone=vllm_fleet_rate_2 burst=7 nodelay;" in conf
    assert "limit_conn vllm_fleet_conn_1 1;" in conf and "limit_req_status 429;" in conf
    rate_1 = conf.split("map $vllm_fleet_client $vllm_fleet_rate_1 {", 1)[1].split("}", 1)[0]
    assert rate_1.split() == ['default', '"";', "bob", "bob;"]


def test_a_client_without_burst_gets_no_burst_clause(host_data, fleet_of, secrets_dir):
    text = (secrets_dir / "clients.toml").read_text().replace("[clients.bob]", "[clients.bob]\nrate = 1\nburst = 0")
    (secrets_dir / "clients.toml").write_text(text)
    conf = conf_of(fleet_of([("h1", host_data())]))
    limits = [line.strip() for line in conf.splitlines() if line.strip().startswith("limit_req zone=")]
    # nginx refuses "burst=0".
    assert limits == ["limit_req zone=vllm_fleet_rate_1;", "limit_req zone=vllm_fleet_rate_2 burst=20 nodelay;"]
