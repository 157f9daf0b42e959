"""The layering that the folders show is enforced by import-linter (contracts in pyproject.toml):
the real tree keeps every contract, and each kind of violation breaks the contract that guards it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # lint-imports puts its working directory first on sys.path: it analyses the tree it runs in.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


VIOLATIONS = {
    # file to append to: (the import, the contract it breaks, the offending module named in the report)
    "pyinfra in the planner": ("roles/plan/capacity.py", "import pyinfra",
                               "The planner, releases and the bottom layer never import pyinfra", "roles.plan.capacity"),
    "pyinfra through the bottom layer": ("roles/errors.py", "from pyinfra.api.exceptions import PyinfraError",
                                         "The planner, releases and the bottom layer never import pyinfra",
                                         "roles.errors"),
    "release importing the planner": ("roles/release/lock.py", "import roles.plan.settings",
                                      "Layers: plan above release above errors and common", "roles.release.lock"),
    "a host script importing the project": ("roles/files/fleet_probe.py", "import roles.errors",
                                            "Scripts copied to hosts import nothing of the project",
                                            "roles.files.fleet_probe"),
    "a role importing the lab": ("roles/vllm.py", "import roles.lab.config",
                                 "Only the CLI imports the lab", "roles.vllm"),
}


@pytest.mark.parametrize("case", VIOLATIONS)
def test_a_violation_breaks_its_contract(tmp_path, case):
    path, statement, contract, module = VIOLATIONS[case]
    shutil.copytree(REPO / "roles", tmp_path / "roles", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / path, "a") as f:
        f.write(f"\n{statement}  # deliberate violation\n")
    result = lint_imports(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    broken = out.split("Broken contracts", 1)[1]
    assert contract in broken and module in broken, out
