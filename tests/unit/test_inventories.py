"""Every inventory in inventories/ plans without error, as `vllm-fleet plan` runs it (no host is
contacted). The lab's inventory needs the running lab, so tests/lab plans it."""


import pytest

from tests.unit.test_cli import REPO, vllm_fleet

NEEDS_THE_LAB = {"lab.py"}
INVENTORIES = sorted(p.name for p in (REPO / "inventories").glob("*.py"))


def test_every_inventory_is_planned_somewhere():
    assert NEEDS_THE_LAB <= set(INVENTORIES) and len(INVENTORIES) > len(NEEDS_THE_LAB)


@pytest.mark.parametrize("inventory", [name for name in INVENTORIES if name not in NEEDS_THE_LAB])
def test_inventory_plans(inventory):
    result = vllm_fleet("plan", f"inventories/{inventory}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("host ") and "refused" not in result.stdout, result.stdout


def test_prod_plans_its_edge_and_firewalls_once_its_secrets_exist(tmp_path):
    """What a deploy of prod.py plans besides capacity: its secrets folder (gitignored, absent
    here) stands in a scratch one. The instances' firewalls let in the load balancer by its IP."""
    import runpy

    from roles.plan.fleet import plan_fleet, with_edge_and_firewalls
    from roles.preflight import capacity_only
    from roles.secrets import add_client_key

    with capacity_only():
        prod = runpy.run_path(str(REPO / "inventories" / "prod.py"))
    secrets = tmp_path / "secrets"
    add_client_key(secrets, "alice")
    lb = [(name, {**data, "nginx_secrets_dir": str(secrets)}) for name, data in prod["lb"]]
    fleet = with_edge_and_firewalls(plan_fleet(prod["vllm"], [name for name, _ in lb], base_dir=REPO), lb,
                                    [*prod["vllm"], *lb], REPO)
    assert [client.name for client in fleet.edge("lb-01.internal").clients] == ["alice"]
    assert fleet.edge("lb-01.internal").server_name == "api.example.com"
    assert fleet.firewall("gpu-01.internal").sources_v4 == ("10.0.0.10",)
    assert fleet.firewall("gpu-01.internal").instance_ports == (8001, 8002)
    assert fleet.firewall("lb-01.internal").open_tcp == (80, 443)
