"""`vllm-fleet bench` on the lab, as an operator runs it from this checkout: the pinned release's
`vllm bench serve` (installed offline from its wheelhouse on the first run) against the edge and
one instance, the JSON and PNG it writes, a --compare of two saved runs, and --overhead, which
holds the other instances down while it measures and deploys the edge back after.

Bounded: 8 requests per point, two points per run (the lab is two cores shared by three
instances). Traffic goes only to the lab's own hosts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from matplotlib import image

from roles import cli, secrets
from tests.lab.labkit import REPO, bring_up_lab, ssh

pytestmark = pytest.mark.lab

BENCH_TIMEOUT_S = 1800  # the first run installs the release into the bench venv (about 4 minutes)


@pytest.fixture(scope="module")
def lab():
    return bring_up_lab()


def bench(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "roles.cli", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=BENCH_TIMEOUT_S)
    print(done.stdout[-3000:], done.stderr[-2000:])
    return done


def saved(folder) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


def check_png(path, panels_wide: int = 600) -> None:
    pixels = image.imread(path)
    assert pixels.shape[1] >= panels_wide and pixels.std() > 0  # drawn, not blank


def test_bench_writes_its_json_and_png_and_compare_plots_two_runs(lab, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert bench("inventories/lab.py", "--concurrency", "1,2", "--num-prompts", "8", "--label", "edge",
                 "--out", str(first)).returncode == 0
    assert bench("inventories/lab.py", "--concurrency", "1,2", "--num-prompts", "8", "--target", "edge,direct",
                 "--direct", "lab2:a", "--dataset", "shared-prefix", "--label", "edge and lab2:a",
                 "--out", str(second)).returncode == 0
    record = saved(first)
    assert (record["release"], record["hosts"], record["instances"], record["routing"]) == \
        ("cpu-vllm-0.32.0", 2, 3, "prefix")
    assert [(p["target"], p["value"], p["result"]["completed"], p["result"]["failed"]) for p in record["points"]] == \
        [("edge prefix", 1, 8, 0), ("edge prefix", 2, 8, 0)]
    assert {p["target"] for p in saved(second)["points"]} == {"edge prefix", "direct lab2:a"}
    for folder in (first, second):
        check_png(next(folder.glob("*.png")))
        text = next(folder.glob("*.json")).read_text()
        keys = [k.reveal() for k in secrets.load_clients(cli.lab_secrets())["lab"].keys]
        keys.append(secrets.fleet_key(cli.lab_secrets(), "internal").reveal())
        assert not [k for k in keys if k in text]
    compared = bench("--compare", str(next(first.glob("*.json"))), str(next(second.glob("*.json"))),
                     "--out", str(tmp_path / "compare.png"))
    assert compared.returncode == 0 and "run 'edge'" in compared.stdout and "run 'edge and lab2:a'" in compared.stdout
    check_png(tmp_path / "compare.png")


def test_overhead_measures_one_instance_alone_behind_the_edge_then_puts_the_edge_back(lab, tmp_path):
    lb = lab["hosts"][0]["name"]
    done = bench("inventories/lab.py", "--overhead", "lab1:a", "--concurrency", "2", "--num-prompts", "8",
                 "--repeat", "2", "--out", str(tmp_path))
    assert done.returncode == 0
    overhead = saved(tmp_path)["overhead"]["2"]
    assert overhead["requests"] == {"direct": 16, "edge": 16} and overhead["failed"] == {"direct": 0, "edge": 0}
    assert overhead["throughput_ratio"] > 0 and "LB overhead on lab1:a" in done.stdout
    # Put back: no instance is held down any more.
    assert "nginx_instances_down" not in ssh(lb, "cat /etc/nginx/conf.d/vllm-fleet.conf")
