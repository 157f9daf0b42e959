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
