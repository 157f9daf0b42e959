"""`vllm-fleet`, the one CLI: every subcommand is listed, and a bad argument to any of them is
refused with the field, the problem and the fix, exit code 2 and no traceback. None of these
cases touches the lab or a host: each is refused before its command runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_FLEET = Path(sys.executable).with_name("vllm-fleet")
SUBCOMMANDS = ("plan", "bench", "settings", "gpus", "howto", "release", "lab")


def vllm_fleet(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VLLM_FLEET), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_options_are_never_abbreviated():
    from roles.cli import parser

    with pytest.raises(Exception, match="unrecognized arguments: --keep"):
        parser().parse_args(["lab", "down", "--keep"])


def test_help_lists_every_subcommand():
    result = vllm_fleet("--help")
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("positional arguments:", 1)[1]
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in listed, result.stdout
    lab = vllm_fleet("lab", "--help").stdout
    release = vllm_fleet("release", "--help").stdout
    assert all(action in lab for action in ("up", "down", "status", "model")), lab
    assert "{lock,wheelhouse,show,metrics}" in release, release


def bad_inventory(tmp_path: Path) -> str:
    inventory = tmp_path / "inventory.py"
    inventory.write_text('vllm = [("h1", {"vllm_release": "cpu-vllm-0.32.0", "vllm_max_modle_len": 2048})]\n'
                         'lb = ["h1"]\n')
    return str(inventory)


# subcommand: (arguments, environment, text the field or problem must contain, text the fix must contain)
REFUSALS = {
    "plan: no such file": (["plan", "inventories/nope.py"], {}, "inventories/nope.py is not a file", "inventory file"),
    "plan: a misspelt setting": ([bad_inventory], {}, "vllm_max_modle_len", "did you mean `vllm_max_model_len`?"),
    "settings: unknown name": (["settings", "vllm_max_modle_len"], {}, "is not a vllm-fleet setting",
                               "did you mean `vllm_max_model_len`?"),
    "gpus: unknown type": (["gpus", "h100"], {}, "is not a known GPU type", "vllm_gpu_types"),
    "howto: an extra argument": (["howto", "now"], {}, "unrecognized arguments: now", "--help"),
    "release show: unknown release": (["release", "show", "cpu-vllm-9"], {}, "there is no release 'cpu-vllm-9'",
                                      "cpu-vllm-0.32.0"),
    "release lock: unknown release": (["release", "lock", "cpu-vllm-9"], {}, "there is no release", "use one of"),
    "release wheelhouse: unknown release": (["release", "wheelhouse", "nope"], {}, "there is no release", "use one of"),
    "release: unknown action": (["release", "publish", "cpu-vllm-0.32.0"], {}, "invalid choice: 'publish'",
                                "vllm-fleet release --help"),
    "lab up: no hosts": (["lab", "up", "--hosts", "0"], {}, "0 hosts is not a lab", "give 1 or more"),
    "lab up: not a number": (["lab", "up", "--hosts", "two"], {}, "invalid int value: 'two'", "vllm-fleet lab up --help"),
    # Never a prefix of a real option here: argparse's abbreviations would run the real command.
    "lab down: unknown option": (["lab", "down", "--force"], {}, "unrecognized arguments: --force", "--help"),
    "lab model: no destination": (["lab", "model"], {}, "the following arguments are required: dest",
                                  "vllm-fleet lab model --help"),
    "lab: unknown action": (["lab", "reboot"], {}, "invalid choice: 'reboot'", "vllm-fleet lab --help"),
    "lab status: a public subnet": (["lab", "status"], {"VLLM_FLEET_LAB_SUBNET": "8.8.8.0/24"},
                                    "VLLM_FLEET_LAB_SUBNET", "a free private network"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal_names_field_problem_and_fix(tmp_path, case):
    args, env, problem, fix = REFUSALS[case]
    args = [a(tmp_path) if callable(a) else a for a in args]
    if args[0] != "plan" and args[0].endswith(".py"):
        args = ["plan", *args]
    result = vllm_fleet(*args, **env)
    err = result.stderr
    assert result.returncode == 2, err
    assert "Traceback" not in err and result.stdout == "", err
    lines = err.splitlines()
    assert lines[0].startswith("refused: ") and lines[1].startswith("  problem: ") and lines[2].startswith("  fix: "), err
    assert problem in err and fix in lines[2], err
