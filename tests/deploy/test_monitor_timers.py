"""The fleet's own textfile scripts deployed with the monitoring, against simulated hosts: the load
balancer runs edge_metrics.py for its upstreams, an NVIDIA host gpu_metrics.py with its release's
python, each a sandboxed oneshot service started by a timer every scrape interval, proven once in
its sandbox when it changed; CPU hosts get no GPU timer, hosts that are no load balancer no edge
timer, and a second run changes nothing. The commands are read by the scripts' own argument
parsers: a flag or value they would refuse fails here, and each script runs, as its unit runs it,
from exactly the host scripts the deploy installed."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from roles import monitor, paths, site
from roles.files import edge_metrics
from tests.deploy.fakehost import changed, fleet_plan, plan
from tests.deploy.script_args import parsed_args
from tests.deploy.simhost import UNIT_DIR, debian, ubuntu
from tests.deploy.test_monitor_deploy import Fleet, changed_ops, commands_of
from tests.deploy.test_nvidia import gpu_host, h200_data
from tests.unit.gpu_scripts import gpu_metrics

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")

EDGE, GPU = monitor.EDGE_METRICS_UNIT, monitor.GPU_METRICS_UNIT


def unit(sim, name: str) -> dict[str, list[str]]:
    """Every assignment of a unit file on the simulated host, by key, in order."""
    settings: dict[str, list[str]] = {}
    for line in sim.files[f"{UNIT_DIR}/{name}"]["lines"]:
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def exec_start(sim, name: str) -> list[str]:
    [command] = unit(sim, f"{name}.service")["ExecStart"]
    return shlex.split(command)


def in_order(run: list[str], expected: list[str]) -> bool:
    """Whether ``expected`` are commands of ``run``, in this order (others between them)."""
    rest = iter(run)
    return all(command in rest for command in expected)


def run_as_installed(sim, script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``script`` (its path on the host) run with ``python -I``, as its unit runs it, from a folder
    holding exactly the host scripts the deploy installed on ``sim``: a sibling it imports that
    no role installed beside it fails here."""
    folder = tmp_path / "host-scripts"
    folder.mkdir()
    for path, installed in sim.files.items():
        if Path(path).parent == Path(paths.HOST_SCRIPTS_DIR):
            (folder / Path(path).name).write_text("\n".join(installed["lines"]) + "\n")
    return subprocess.run([sys.executable, "-I", str(folder / Path(script).name), *args], capture_output=True,
                          text=True, timeout=60)


def assert_timer(sim, name: str, interval: int) -> None:
    timer = unit(sim, f"{name}.timer")
    assert timer["OnBootSec"] == timer["OnUnitActiveSec"] == [f"{interval}s"] and timer["AccuracySec"] == ["1s"]
    assert timer["WantedBy"] == ["timers.target"]
    assert f"{name}.timer" in sim.running & sim.enabled
    service = unit(sim, f"{name}.service")
    assert service["Type"] == ["oneshot"] and service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == [monitor.TEXTFILE_DIR] and service["CapabilityBoundingSet"] == [""]
    # Run once by the deploy, then by its timer; never left "running".
    assert sim.oneshots == [f"{name}.service"] and f"{name}.service" not in sim.running | sim.enabled


# ---- the load balancer's edge timer -------------------------------------------------------------

def test_the_load_balancer_runs_edge_metrics_for_every_upstream(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    timeline = fleet.deploy()
    h1 = fleet.sims["h1"]
    argv = exec_start(h1, EDGE)
    assert argv[:3] == ["/usr/bin/python3", "-I", paths.EDGE_METRICS_PATH]
    args = parsed_args(edge_metrics.main, argv[3:])
    assert args.upstream == ["10.9.0.11:8001", "10.9.0.11:8002", "10.9.0.12:8001", "10.9.0.12:8002"]
    assert (args.log, args.out, args.state) == ("/var/log/nginx/vllm-fleet.access.log",
                                               f"{monitor.TEXTFILE_DIR}/vllm-fleet-edge.prom",
                                               "/var/lib/vllm-fleet/edge-metrics/state.json")
    # The log's group, and its own state folder (kept writable by systemd).
    service = unit(h1, f"{EDGE}.service")
    assert service["SupplementaryGroups"] == ["adm"] and service["StateDirectory"] == ["vllm-fleet/edge-metrics"]
    assert service["PrivateDevices"] == ["yes"] and "DeviceAllow" not in service
    assert_timer(h1, EDGE, 15)
    script, module = h1.files[paths.EDGE_METRICS_PATH], h1.files[paths.TEXTFILE_PATH]
    assert script["mode"] == 755 and script["lines"] == paths.EDGE_METRICS.read_text().splitlines()
    assert module["mode"] == 644 and module["lines"] == paths.TEXTFILE.read_text().splitlines()
    # The script and the module it imports, then the units, loaded, proven once, then the timer.
    run = commands_of(timeline, "h1")
    order = [f"upload {paths.EDGE_METRICS} -> {paths.EDGE_METRICS_PATH}",
             f"upload {paths.TEXTFILE} -> {paths.TEXTFILE_PATH}",
             f"upload <generated> -> {UNIT_DIR}/{EDGE}.service", f"upload <generated> -> {UNIT_DIR}/{EDGE}.timer",
             "systemctl daemon-reload", f"systemctl start {EDGE}.service", f"systemctl start {EDGE}.timer",
             f"systemctl enable {EDGE}.timer"]
    assert in_order(run, order)
    # After nginx and the node exporter's textfile folder are there.
    assert run.index("systemctl reload nginx.service") < run.index(f"systemctl start {EDGE}.service")
    # What was installed is all it needs: no upstream answers here, and no log is there.
    out = tmp_path / "edge.prom"
    done = run_as_installed(h1, paths.EDGE_METRICS_PATH, tmp_path, "--log", str(tmp_path / "no.log"), "--out", str(out),
                            "--state", str(tmp_path / "state.json"), "--upstream", "127.0.0.1:9", "--timeout", "0.5")
    assert done.returncode == 0, done.stderr
    assert "vllm_fleet_edge_log_up 0" in out.read_text().splitlines()


def test_hosts_that_are_no_load_balancer_and_cpu_hosts_get_no_timer_of_either(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    h1, h2 = fleet.sims["h1"], fleet.sims["h2"]
    assert not [f for f in h2.files if "metrics" in f and f.startswith(("/etc/systemd", paths.HOST_SCRIPTS_DIR))]
    assert paths.TEXTFILE_PATH not in h2.files
    assert not [f for f in h1.files if GPU in f or f == paths.GPU_METRICS_PATH]
    assert h2.oneshots == [] and not [u for u in h2.running | h2.enabled if "metrics" in u]


def test_without_a_monitor_group_there_is_no_timer(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path, monitor_hosts=())
    fleet.deploy()
    for sim in fleet.sims.values():
        assert not [f for f in sim.files if "metrics" in f], sorted(sim.files)


def test_a_second_run_leaves_the_timers_alone(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    assert [(name, op.name) for name, op in fleet.deploy() if op.commands] == []
    assert fleet.sims["h1"].oneshots == [f"{EDGE}.service"]


def test_a_new_instance_is_probed_and_the_unit_proven_again_without_restarting_the_timer(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    fleet.data["h2"]["vllm_instances"] = [*fleet.data["h2"]["vllm_instances"], {"name": "c", "port": 8003}]
    timeline = fleet.deploy()
    h1 = fleet.sims["h1"]
    assert parsed_args(edge_metrics.main, exec_start(h1, EDGE)[3:]).upstream[-1] == "10.9.0.12:8003"
    ops = [op for op in changed_ops(timeline, "h1") if "metrics" in op.lower()]
    assert ops == [f"Unit {EDGE}.service", f"Run {EDGE}.service once (proves it in its sandbox)"]
    assert h1.oneshots == [f"{EDGE}.service"] * 2


def test_a_new_scrape_interval_reschedules_the_timer(host_data, tmp_path):
    fleet = Fleet(host_data, tmp_path)
    fleet.deploy()
    fleet.data["h1"]["monitor_scrape_interval"] = 30
    timeline = fleet.deploy()
    assert changed_ops(timeline, "h1") == [f"Unit {EDGE}.timer", "Reload systemd units",
                                           f"Restart {EDGE}.timer on its new schedule"]
    assert_timer(fleet.sims["h1"], EDGE, 30)


# ---- an NVIDIA host's GPU timer ------------------------------------------------------------------

@pytest.fixture
def gpu_data(host_data, nvidia_releases):
    """An onboarded H200 host's data, as tests/deploy/test_nvidia.py gives it."""
    return lambda **overrides: h200_data(host_data, nvidia_releases, **overrides)


def deploy_gpu_host(data, sim):
    fleet = fleet_plan([("g1", data)], [("lb", {"ssh_hostname": "10.9.0.2"})], monitor_hosts=["g1"])
    return plan(site.serve, fleet, host_name="g1", host_data=data, sim=sim)


@pytest.mark.parametrize("distro", [debian(12), ubuntu(22, 4)])
def test_an_nvidia_host_runs_gpu_metrics_with_its_release_python(gpu_data, distro, tmp_path):
    sim = gpu_host(distro, loaded="580.159.04", nouveau_loaded=False)
    data = gpu_data(vllm_gpu_count=1, monitor_scrape_interval=20)
    ops = deploy_gpu_host(data, sim)
    argv = exec_start(sim, GPU)
    assert argv == ["/opt/vllm-fleet/current/bin/python", "-I", paths.GPU_METRICS_PATH,
                    "--out", f"{monitor.TEXTFILE_DIR}/vllm-fleet-gpu.prom", "--expected-count", "1",
                    "--state", "/var/lib/vllm-fleet/gpu-metrics/xid-state.json"]
    args = parsed_args(gpu_metrics.main, argv[3:])
    assert (args.expected_count, args.state) == (1, "/var/lib/vllm-fleet/gpu-metrics/xid-state.json")
    service = unit(sim, f"{GPU}.service")
    # The GPUs' devices and nothing else: no private /dev, which has no /dev/nvidia*.
    assert "PrivateDevices" not in service and service["DevicePolicy"] == ["closed"]
    assert set(service["DeviceAllow"]) == {"char-nvidiactl rw", "char-nvidia rw", "char-nvidia-uvm rw", "char-nvidia-caps r"}
    assert service["StateDirectory"] == ["vllm-fleet/gpu-metrics"] and service["PrivateNetwork"] == ["yes"]
    assert_timer(sim, GPU, 20)
    # The script and the modules it imports (installed with the GPU checks) and the release link it
    # runs through are there first.
    run = [c for op in ops for c in op.commands]
    for local, remote in ((paths.GPU_METRICS, paths.GPU_METRICS_PATH), (paths.GPU_PROBE, paths.GPU_PROBE_PATH),
                          (paths.TEXTFILE, paths.TEXTFILE_PATH)):
        assert run.index(f"upload {local} -> {remote}") < run.index(f"systemctl start {GPU}.service")
    # What was installed is all it needs: without NVML here, it reports 0 of the GPUs expected.
    out = tmp_path / "gpu.prom"
    done = run_as_installed(sim, paths.GPU_METRICS_PATH, tmp_path, "--out", str(out), "--expected-count", "1")
    assert done.returncode == 0 and "reports 0 of 1 GPUs" in done.stderr, done.stderr
    assert "vllm_fleet_gpu_count 0" in out.read_text().splitlines()
    assert sim.links["/opt/vllm-fleet/current"].startswith("/opt/vllm-fleet/venvs/")
    link = next(c for c in run if c.endswith("mv -T /opt/vllm-fleet/current.new /opt/vllm-fleet/current"))
    assert run.index(link) < run.index(f"systemctl start {GPU}.service")
    # Not a load balancer: no edge timer.
    assert f"{UNIT_DIR}/{EDGE}.service" not in sim.files
    assert [(op.name, op.commands) for op in changed(deploy_gpu_host(data, sim))] == []


def test_the_gpu_count_the_metrics_expect_is_the_inventorys(gpu_data):
    for count, expected in ((8, "8"), (None, "1")):
        data = gpu_data(vllm_gpu_count=count, vllm_instances=[{"name": "a", "port": 8001}])
        host_plan = fleet_plan([("g1", data)], [("lb", {"ssh_hostname": "10.9.0.2"})]).host("g1")
        service, _ = monitor.gpu_metrics_units(host_plan)
        [command] = [line.split("=", 1)[1] for line in service.splitlines() if line.startswith("ExecStart=")]
        argv = shlex.split(command)
        assert argv[argv.index("--expected-count") + 1] == expected
