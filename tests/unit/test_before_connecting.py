"""A configuration that cannot work is refused while pyinfra loads the inventory, before it
connects to any host: the hosts here do not even resolve (`.invalid` never does, RFC 2606), and
the run must stop with the field and the fix without trying them."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from roles.secrets import add_client_key
from tests.unit.test_cli import vllm_fleet

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")


def inventory(tmp_path: Path, model_dir: Path, second_host: dict | None = None, lb: list | None = None,
              **overrides) -> Path:
    data = {"vllm_release": "cpu-vllm-0.32.0", "vllm_model_path": str(model_dir),
            "vllm_instances": [{"name": "a", "port": 8001}], **overrides}
    path = tmp_path / "fleet.py"
    path.write_text(textwrap.dedent(f"""
        from roles.preflight import plan_before_connecting

        _DATA = {data!r}
        vllm = [("gpu-01.invalid", _DATA), ("gpu-02.invalid", {{**_DATA, **{second_host or {}!r}}})]
        lb = {lb or ["gpu-01.invalid"]!r}

        plan_before_connecting(globals())
    """))
    return path


def pyinfra(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYINFRA), "-y", str(path), "deploys/vllm.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYINFRA_PROGRESS": "off"})


CASES = {
    # class of mistake: (inventory changes, text the field and problem must hold, text the fix must hold)
    "misspelt setting": ({"vllm_max_modle_len": 2048}, "host gpu-01.invalid: setting `vllm_max_modle_len`",
                         "did you mean `vllm_max_model_len`?"),
    "unknown release": ({"vllm_release": "cpu-vllm-9.9.9"}, "there is no release 'cpu-vllm-9.9.9'",
                        "use one of: cpu-vllm-0.32.0"),
    "duplicate port": ({"vllm_instances": [{"name": "a", "port": 8001}, {"name": "b", "port": 8001}]},
                       "host gpu-01.invalid: vllm_instances[1].port", "give every instance on a host its own port"),
    "out of range": ({"vllm_instances": [{"name": "a", "port": 80}]}, "80 is outside the allowed range",
                     "from 1024 to 65535"),
    "load balancer only host": ({"lb": [("lb-01.invalid", {"nginx_listen_prot": 8080})]},
                                "host lb-01.invalid: setting `nginx_listen_prot`", "did you mean `nginx_listen_port`?"),
    "flag a setting owns": ({"vllm_extra_args": ["--max-model-len", "4096"]}, "--max-model-len",
                            "set `vllm_max_model_len` instead"),
    "one address, two hosts": ({"second_host": {"vllm_advertise_address": "gpu-01.invalid"}},
                               "host gpu-01.invalid's address", "vllm_advertise_address"),
    "value that reaches a shell": ({"vllm_install_dir": "/opt/vllm fleet"}, "vllm_install_dir", "absolute path"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_before_connecting(tmp_path, model_dir, case):
    overrides, field, fix = CASES[case]
    path = inventory(tmp_path, model_dir, **overrides)
    result = pyinfra(path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert field in out and fix in out, out
    assert "Traceback" not in out, out
    # Stopped while loading the inventory: pyinfra never reached its connect stage.
    assert "Loading inventory" in out and "Connecting to hosts" not in out, out
    cli = vllm_fleet("plan", str(path))
    assert cli.returncode == 2 and field in cli.stderr and fix in cli.stderr, cli.stderr


def secrets_dir(tmp_path: Path, clients: bool = True) -> Path:
    """A load balancer's nginx_secrets_dir: private, with one client (or, ``clients=False``, none yet)."""
    folder = tmp_path / "secrets"
    if clients:
        add_client_key(folder, "alice")
    else:
        folder.mkdir(mode=0o700)
    return folder


def plannable(tmp_path: Path, model_dir: Path, lb_data: dict) -> Path:
    """An inventory without a mistake in its hosts (on loopback, port 9 where nothing listens: no
    name is looked up, nothing answers); ``lb_data`` joins gpu-01.invalid's data as a load balancer."""
    # ssh goes to loopback; the advertised addresses (documentation range) are only written into nginx's
    # configuration and the firewalls' rules, which this run never reaches.
    return inventory(tmp_path, model_dir, {"ssh_hostname": "127.0.0.2", "vllm_advertise_address": "192.0.2.2"},
                     lb=[("gpu-01.invalid", lb_data)], ssh_hostname="127.0.0.1", ssh_port=9,
                     vllm_advertise_address="192.0.2.1")


def test_a_plannable_inventory_goes_on_to_connect(tmp_path, model_dir):
    """The control case: the same inventory without a mistake, its load balancer given its
    secrets folder, reaches pyinfra's connect stage."""
    path = plannable(tmp_path, model_dir, {"nginx_secrets_dir": str(secrets_dir(tmp_path))})
    result = pyinfra(path)
    out = result.stdout + result.stderr
    assert "Connecting to hosts" in out, out
    assert result.returncode != 0, out  # nothing answers on 127.0.0.1:9


@pytest.mark.parametrize("case", ["no nginx_secrets_dir", "no clients.toml"])
def test_a_deploy_without_the_edge_secrets_is_refused_but_its_capacity_still_plans(tmp_path, model_dir, case):
    """A deploy needs the edge's clients before it connects; `vllm-fleet plan` plans capacity only,
    so it works before any client key is written."""
    if case == "no nginx_secrets_dir":
        lb_data, problem = {}, "is unset: the edge needs its clients' keys"
    else:
        lb_data = {"nginx_secrets_dir": str(secrets_dir(tmp_path, clients=False))}
        problem = f"{tmp_path / 'secrets' / 'clients.toml'} does not exist: the edge would let no client in"
    path = plannable(tmp_path, model_dir, lb_data)
    result = pyinfra(path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "host gpu-01.invalid: `nginx_secrets_dir`" in out and problem in out, out
    assert "vllm-fleet keys add" in out and "Traceback" not in out, out
    assert "Loading inventory" in out and "Connecting to hosts" not in out, out
    # Nothing was generated for a deploy that never started.
    assert not [p for p in tmp_path.rglob("*.key")], list(tmp_path.rglob("*"))

    cli = vllm_fleet("plan", str(path))
    assert cli.returncode == 0, cli.stderr
    rows = [line.split()[:2] for line in cli.stdout.splitlines() if line.startswith("gpu-")]
    assert "KV tokens" in cli.stdout and rows == [["gpu-01.invalid", "a"], ["gpu-02.invalid", "a"]], cli.stdout


def edge_case(tmp_path: Path, case: str) -> dict:
    """The load balancer's data for one of the edge's bad inputs the issue names."""
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.unit.test_edge import certificate, private_file

    folder = tmp_path / "secrets"
    keys = {"a key shorter than 32 characters": ('["vf-short"]', '["vf-' + "b" * 40 + '"]'),
            "two clients with one key": ('["vf-' + "a" * 40 + '"]', '["vf-' + "a" * 40 + '"]')}
    alice, bob = keys.get(case, ('["vf-' + "a" * 40 + '"]', '["vf-' + "b" * 40 + '"]'))
    private_file(folder / "clients.toml", f"[clients.alice]\nkeys = {alice}\n[clients.bob]\nkeys = {bob}\n")
    data = {"nginx_secrets_dir": str(folder), "nginx_server_name": "edge.example.com"}
    now = datetime.now(UTC)
    if case == "a certificate whose key does not match":
        cert, key = certificate(tmp_path, ["edge.example.com"], valid_from=now - timedelta(days=1),
                                valid_to=now + timedelta(days=90), key=ec.generate_private_key(ec.SECP256R1()))
    elif case == "an expired certificate":
        cert, key = certificate(tmp_path, ["edge.example.com"], valid_from=now - timedelta(days=400),
                                valid_to=now - timedelta(days=1))
    else:
        return {**data, "nginx_client_rate": 0} if case == "a rate limit of 0" else data
    return {**data, "nginx_tls_certificate": str(cert), "nginx_tls_key": str(key)}


EDGE_CASES = {
    "a key shorter than 32 characters": ("clients.toml: client alice: keys[0]", "shorter than 32",
                                         "vllm-fleet keys new"),
    "two clients with one key": ("clients.toml: client bob: keys[0]", "is the same key as client alice's",
                                 "vllm-fleet keys add"),
    "a certificate whose key does not match": ("host gpu-01.invalid: `nginx_tls_key`", "is not the key of", "the private key the "),
    "an expired certificate": ("host gpu-01.invalid: `nginx_tls_certificate`", "expired on", "renew it"),
    "a rate limit of 0": ("host gpu-01.invalid: `nginx_client_rate`", "0 is outside the allowed range", "at least 1"),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_bad_edge_input_is_refused_before_connecting(tmp_path, model_dir, case):
    field, problem, fix = EDGE_CASES[case]
    result = pyinfra(plannable(tmp_path, model_dir, edge_case(tmp_path, case)))
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    # Named by the load balancer's setting, or by the clients file and the client.
    assert field in out and problem in out and fix in out and "Traceback" not in out, out
    assert "Loading inventory" in out and "Connecting to hosts" not in out, out
    assert "vf-short" not in out and "vf-" + "a" * 40 not in out, "a refusal never shows a key"


def test_a_grafana_host_without_grafanas_repository_is_refused_before_connecting(tmp_path, model_dir):
    path = plannable(tmp_path, model_dir, {"nginx_secrets_dir": str(secrets_dir(tmp_path))})
    path.write_text(path.read_text().replace("plan_before_connecting(globals())", textwrap.dedent("""\
        monitor = ["gpu-02.invalid"]
        grafana = ["gpu-02.invalid"]

        plan_before_connecting(globals())""")))
    result = pyinfra(path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "host gpu-02.invalid: `grafana_repo_url`" in out and "is not set" in out, out
    assert "mirror.example.internal/grafana" in out and "Traceback" not in out, out
    assert "Loading inventory" in out and "Connecting to hosts" not in out, out
