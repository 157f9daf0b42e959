"""The units of the fleet's textfile scripts (roles/monitor.py, templates/prometheus/textfile-exporter.*):
the GPU variant keeps the NVIDIA devices and the journal, the edge variant nginx's logs and the
network to the instances; both write the textfile directory and their own state only, as root
without any capability; the timers follow the scrape interval. Where this machine's
systemd-analyze can score a unit file offline, it finds no unknown setting and a low exposure."""

import shlex

import pytest

from roles import monitor, paths
from roles.plan.fleet import HostPlan
from tests.unit.systemd_units import offline_exposure, service

EXPOSURE_TARGET = 2.0


class _Plan:
    """What gpu_metrics_units reads of a HostPlan."""

    def __init__(self, **data):
        self.data = {"vllm_install_dir": "/opt/vllm-fleet", "vllm_gpu_count": 8, "monitor_scrape_interval": 15,
                     **data}

    get = HostPlan.get


def units():
    return {"gpu": monitor.gpu_metrics_units(_Plan()),
            "edge": monitor.edge_metrics_units(["10.9.0.11:8001", "[fd00::1]:8002"], 15)}


def test_the_gpu_unit_keeps_the_nvidia_devices_and_no_network():
    unit = service(units()["gpu"][0])
    assert "PrivateDevices" not in unit and unit["DevicePolicy"] == ["closed"]
    assert set(unit["DeviceAllow"]) == {"char-nvidiactl rw", "char-nvidia rw", "char-nvidia-uvm rw", "char-nvidia-caps r"}
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX"] and unit["PrivateNetwork"] == ["yes"]
    # NVML reads /proc/driver/nvidia; journalctl reads the journal's files, which ProtectKernelLogs leaves.
    assert "ProcSubset" not in unit and "SupplementaryGroups" not in unit
    assert unit["StateDirectory"] == ["vllm-fleet/gpu-metrics"]


def test_the_edge_unit_reads_nginx_logs_and_reaches_the_instances():
    unit = service(units()["edge"][0])
    assert unit["PrivateDevices"] == ["yes"] and "DeviceAllow" not in unit
    assert unit["SupplementaryGroups"] == ["adm"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"] and "PrivateNetwork" not in unit
    assert unit["MemoryDenyWriteExecute"] == ["yes"] and unit["ProcSubset"] == ["pid"]
    assert unit["StateDirectory"] == ["vllm-fleet/edge-metrics"]


@pytest.mark.parametrize("kind", ["gpu", "edge"])
def test_both_write_only_the_textfile_directory_and_their_state_as_root_without_capabilities(kind):
    unit = service(units()[kind][0])
    assert unit["Type"] == ["oneshot"] and "User" not in unit
    assert unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == [monitor.TEXTFILE_DIR] and unit["StateDirectoryMode"] == ["0700"]
    # Each script's --state is in its StateDirectory= (kept writable by systemd), its --out in the textfile directory.
    argv = shlex.split(unit["ExecStart"][0])
    state, out = argv[argv.index("--state") + 1], argv[argv.index("--out") + 1]
    assert state.startswith(f"/var/lib/{unit['StateDirectory'][0]}/")
    assert out.startswith(f"{monitor.TEXTFILE_DIR}/") and out.endswith(".prom")
    assert int(unit["TimeoutStartSec"][0]) <= 300


def test_the_edge_command_names_every_upstream_and_escapes_systemd_specifiers():
    service_text, _ = monitor.edge_metrics_units(["10.9.0.11:8001", "[fe80::1%eth0]:8002"], 15)
    [command] = service(service_text)["ExecStart"]
    assert "%%eth0" in command and "%eth0" not in command.replace("%%", "")
    argv = shlex.split(command.replace("%%", "%"))
    assert argv[:3] == ["/usr/bin/python3", "-I", paths.EDGE_METRICS_PATH]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--upstream"] == ["10.9.0.11:8001", "[fe80::1%eth0]:8002"]


@pytest.mark.parametrize("interval", [5, 15, 300])
def test_the_timers_follow_the_scrape_interval(interval):
    for _, timer in (monitor.gpu_metrics_units(_Plan(monitor_scrape_interval=interval)),
                     monitor.edge_metrics_units(["10.9.0.11:8001"], interval)):
        lines = timer.splitlines()
        assert f"OnBootSec={interval}s" in lines and f"OnUnitActiveSec={interval}s" in lines
        assert "AccuracySec=1s" in lines and "WantedBy=timers.target" in lines


@pytest.mark.parametrize("kind", ["gpu", "edge"])
def test_the_units_render_clean(kind):
    for text in units()[kind]:
        assert "{%" not in text and "{{" not in text and "\n\n\n" not in text and text.endswith("\n")


@pytest.mark.parametrize("kind", ["gpu", "edge"])
def test_exposure_is_within_the_target(kind, tmp_path):
    name = {"gpu": monitor.GPU_METRICS_UNIT, "edge": monitor.EDGE_METRICS_UNIT}[kind]
    unit_file = tmp_path / f"{name}.service"
    unit_file.write_text(units()[kind][0])
    exposure, report = offline_exposure(unit_file)
    assert exposure <= EXPOSURE_TARGET, report
