"""roles/files/gpu_metrics.py: NVML readings in Prometheus' text format, for the node exporter's
textfile collector on GPU hosts; the NVML reader it shares with `gpu_probe.py readings`, and the
textfile it writes (whole, or not at all on a host without GPUs). Its XID counts from the kernel
log: test_gpu_xid_events.py.

No GPU here: NVML is replaced by a stand-in pynvml that answers from readings as
`gpu_probe.py readings` records them (tests/fixtures/gpu/h200-readings.json was recorded on a real
H200), and journalctl by a stand-in that serves kernel log lines by cursor: both in
tests/unit/gpu_scripts.py. The exposition text is checked by an independent parser there and,
where /usr/bin/promtool exists, by promtool."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from roles.paths import GPU_PROBE
from tests.unit.gpu_scripts import (
    FIXTURES,
    HGX_BUSES,
    NOT_RECORDED,
    NOT_RECORDED_KEYS,
    NOT_SUPPORTED,
    PER_GPU,
    P,
    eight_gpu_host,
    gpu_host,
    gpu_metrics,
    gpu_probe,
    label_sets,
    load_fake_pynvml,
    names,
    parse_exposition,
    recorded,
    recorded_h100,
    value,
)

PROMTOOL = Path(os.environ.get("PROMTOOL_UNDER_TEST", "/usr/bin/promtool"))


@pytest.fixture
def host(tmp_path):
    return gpu_host(tmp_path)


# ---- the independent parser (tests/unit/gpu_scripts.py) ------------------------------------------

@pytest.mark.parametrize("broken, why", [
    ("# TYPE a gauge\na 1\n", "sample before HELP"),
    ("# HELP a x\n# TYPE a gauge\na 1\na 2\n", "series twice"),
    ('# HELP a x\n# TYPE a gauge\na{g="0"} 1\n# HELP b x\n# TYPE b gauge\nb 1\na{g="1"} 1\n', "family split"),
    ("# HELP a x\n# TYPE a gauge\na one\n", "not a number"),
    ('# HELP a x\n# TYPE a gauge\na{g="0} 1\n', "label quote"),
    ("# HELP a x\n# TYPE a gauge\na 1", "last line not ended"),
    ("# HELP a x\n# TYPE a gauge\n# HELP a y\na 1\n", "HELP twice"),
])
def test_the_parser_rejects_broken_expositions(broken, why):
    with pytest.raises(AssertionError):
        parse_exposition(broken)


# ---- the NVML reader -----------------------------------------------------------------------------

def test_the_reader_reproduces_the_recorded_h200_readings(tmp_path, monkeypatch):
    """One reader for `readings` and gpu_metrics.py: replaying the H200's answers through the stand-in
    NVML gives back every recorded reading; those it predates come back as not supported."""
    machine = recorded()
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml(tmp_path, machine))
    again = gpu_probe.nvml_readings()
    for key in ("driver_version", "cuda_driver_version"):
        assert again[key] == machine[key]
    (gpu,) = again["gpus"]
    assert {k: gpu[k] for k in machine["gpus"][0]} == machine["gpus"][0]
    assert {k: gpu[k] for k in NOT_RECORDED} == {k: NOT_SUPPORTED for k in NOT_RECORDED}


def test_the_reader_reads_every_reading_metrics_uses(tmp_path, monkeypatch):
    machine = eight_gpu_host()
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml(tmp_path, machine))
    assert gpu_probe.nvml_readings()["gpus"] == machine["gpus"]


def test_a_gpu_nvml_cannot_open_is_not_counted(tmp_path, monkeypatch):
    machine = eight_gpu_host()
    machine["gpus"][3] = {"error": "NVMLError_GpuIsLost: GPU is lost"}
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml(tmp_path, machine))
    readings = gpu_probe.nvml_readings()
    assert readings["gpus"][3] == {"index": 3, "error": "NVMLError_GpuIsLost: GPU is lost"}
    series = parse_exposition(gpu_metrics.exposition(readings, expected_count=8))
    assert value(series, f"{P}count") == 7
    assert "3" not in {labels["gpu"] for labels in label_sets(series, f"{P}temperature_celsius")}


# ---- the exposition ------------------------------------------------------------------------------

def test_recorded_h200_readings_as_metrics():
    series = parse_exposition(gpu_metrics.exposition(recorded(), expected_count=1))
    gpu = {"gpu": "0", "uuid": "GPU-d952b138-dee3-1f00-ce7d-aa510a60f72b", "model": "NVIDIA H200"}
    assert value(series, f"{P}count") == 1 and value(series, f"{P}expected_count") == 1
    assert value(series, f"{P}nvml_up") == 1
    assert value(series, f"{P}memory_total_bytes", **gpu) == 150754820096
    assert value(series, f"{P}memory_used_bytes", **gpu) == 644939776
    assert value(series, f"{P}ecc_uncorrected_volatile_total", **gpu) == 0
    assert value(series, f"{P}ecc_uncorrected_aggregate_total", **gpu) == 0
    assert value(series, f"{P}remapped_rows_pending", **gpu) == 0
    assert value(series, f"{P}remapped_rows_failed", **gpu) == 0
    assert value(series, f"{P}pcie_link_width", **gpu) == value(series, f"{P}pcie_link_width_max", **gpu) == 16
    assert value(series, f"{P}pcie_link_generation", **gpu) == 5
    assert value(series, f"{P}pcie_link_generation_max", **gpu) == 5
    # The recording predates these readings: left out, not written as 0.
    for name in ("utilization_ratio", "temperature_celsius", "power_watts", "throttle_reasons", "throttle_active",
                 "ecc_corrected_volatile_total", "ecc_corrected_aggregate_total"):
        assert f"{P}{name}" not in names(series)
    assert not any(n.startswith(f"{P}xid") for n in names(series))  # no --state: no XID metrics


def test_the_reader_reproduces_the_recorded_h100_readings(tmp_path, monkeypatch):
    """The H100 recording has every reading gpu_metrics.py uses: replayed through the stand-in NVML,
    each comes back as recorded."""
    machine = recorded_h100()
    assert set(NOT_RECORDED_KEYS) <= machine["gpus"][0].keys()
    monkeypatch.setitem(sys.modules, "pynvml", load_fake_pynvml(tmp_path, machine))
    (gpu,) = gpu_probe.nvml_readings()["gpus"]
    assert gpu == machine["gpus"][0]


def test_the_textfile_written_on_a_real_h100_has_the_series_its_readings_give():
    """gpu_metrics.py ran on the H100 (tests/fixtures/gpu/h100-gpu-metrics.prom, written a second
    after the readings were taken): the same series, labels included, as exposition() makes of the
    recorded readings; the values that do not move on an idle GPU are equal."""
    written = parse_exposition((FIXTURES / "h100-gpu-metrics.prom").read_text())
    # It ran with --state where no journalctl exists: XIDs seeded at 0, their source reported down.
    expected = parse_exposition(gpu_metrics.exposition(recorded_h100(), expected_count=1, xids={}, xid_source_up=False))
    assert written.keys() == expected.keys()
    steady = [key for key in expected if not key[0].endswith(("power_watts", "memory_used_bytes"))]
    assert {key: written[key] for key in steady} == {key: expected[key] for key in steady}
    gpu = {"gpu": "0", "uuid": "GPU-de1276cb-eece-1273-fa67-105c18b1adcc", "model": "NVIDIA H100 80GB HBM3"}
    assert value(written, f"{P}temperature_celsius", **gpu) == 31
    assert value(written, f"{P}throttle_active", **gpu, reason="gpu_idle") == 1


def test_eight_gpu_host_as_metrics():
    text = gpu_metrics.exposition(eight_gpu_host(), expected_count=8)
    series = parse_exposition(text)
    assert value(series, f"{P}count") == 8
    for name in PER_GPU:
        for labels in label_sets(series, name):
            assert set(labels) == {"gpu", "uuid", "model"} | ({"reason"} if name.endswith("throttle_active") else set())
            assert labels["model"] == "NVIDIA H200"
    gpu = {str(i): {"gpu": str(i)} for i in range(8)}
    assert value(series, f"{P}utilization_ratio", **gpu["1"]) == pytest.approx(0.88)
    assert value(series, f"{P}power_watts", **gpu["1"]) == pytest.approx(613.25)
    assert value(series, f"{P}temperature_celsius", **gpu["6"]) == 92
    # GPU 2 has no ECC counters: no ECC series for it, while the others have theirs.
    for name in ("ecc_uncorrected_volatile_total", "ecc_uncorrected_aggregate_total", "ecc_corrected_volatile_total",
                 "ecc_corrected_aggregate_total"):
        assert sorted(labels["gpu"] for labels in label_sets(series, f"{P}{name}")) == list("0134567")
    assert value(series, f"{P}ecc_corrected_volatile_total", **gpu["7"]) == 7
    # GPU 5: a row remapping pending, none failed.
    assert [value(series, f"{P}remapped_rows_pending", **gpu[i]) for i in sorted(gpu)] == [0, 0, 0, 0, 0, 1, 0, 0]
    assert value(series, f"{P}remapped_rows_uncorrectable", **gpu["5"]) == 1
    assert all(value(series, f"{P}remapped_rows_failed", **gpu[i]) == 0 for i in gpu)
    # GPU 6: throttled by the hardware for heat.
    assert value(series, f"{P}throttle_reasons", **gpu["6"]) == 0x48
    active = {(labels["gpu"], labels["reason"]) for labels in label_sets(series, f"{P}throttle_active")
              if value(series, f"{P}throttle_active", **labels)}
    assert active == {("6", "hw_thermal_slowdown"), ("6", "hw_slowdown")}
    assert len(label_sets(series, f"{P}throttle_active")) == 8 * len(gpu_metrics.THROTTLE_REASONS)
    # Counters are typed counter, the rest gauge; each family once, before its samples.
    for name in ("ecc_uncorrected_volatile_total", "ecc_corrected_aggregate_total"):
        assert f"# TYPE {P}{name} counter\n" in text
    assert f"# TYPE {P}temperature_celsius gauge\n" in text
    assert text.count(f"# TYPE {P}throttle_active ") == 1


def test_label_values_are_escaped():
    readings = eight_gpu_host()
    readings["gpus"][0]["name"] = 'NVIDIA "H200"\\x\nnew'
    series = parse_exposition(gpu_metrics.exposition(readings, expected_count=8))
    assert label_sets(series, f"{P}memory_total_bytes")[0]["model"] == 'NVIDIA "H200"\\x\nnew'


@pytest.mark.skipif(not PROMTOOL.exists(), reason=f"{PROMTOOL} is not installed (the Makefile installs it; "
                                                  "PROMTOOL_UNDER_TEST=PATH names another)")
def test_promtool_accepts_the_exposition(tmp_path):
    state = gpu_metrics.count_xids({}, [("0000:18:00", 79), ("0000:3a:00", 31)], eight_gpu_host())
    for text in (gpu_metrics.exposition(recorded(), 1), gpu_metrics.exposition(eight_gpu_host(), 8, state)):
        done = subprocess.run([str(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True)
        # The only lint promtool has: `_count` is a histogram's suffix, and the names of the GPU count
        # and the expected count are fixed (the alert rules use them). Exit 3 is lint only; 1 would
        # be a parse error.
        allowed = {f'{P}{n} non-histogram and non-summary metrics should not have "_count" suffix'
                   for n in ("count", "expected_count")}
        problems = set((done.stdout + done.stderr).splitlines())
        assert done.returncode in (0, 3) and problems <= allowed, done.stdout + done.stderr


# ---- the script, run as the timer runs it --------------------------------------------------------

def test_the_textfile_is_replaced_whole(host):
    host.out.write_text("# stale\n")
    before = host.out.stat().st_ino
    done = host.run()
    assert done.returncode == 0, done.stderr
    assert host.out.stat().st_ino != before, "written in place: the node exporter could read half a file"
    assert stat.S_IMODE(host.out.stat().st_mode) == 0o644  # the node exporter's user reads it
    assert stat.S_IMODE(host.state.stat().st_mode) == 0o600
    assert sorted(p.name for p in host.out.parent.iterdir()) == ["vllm-fleet-gpu.prom"]
    assert sorted(p.name for p in host.state.parent.iterdir()) == ["xid-state.json"]
    assert value(host.series(), f"{P}count") == 8


# Two ways a host has no NVML: the release venv has no nvidia-ml-py, or no driver library (what
# nvidia-ml-py 13.615.71 raises on this machine, which has no NVIDIA driver).
NO_NVML = ["No module named 'pynvml'", "NVML Shared Library Not Found"]


def without_nvml(host, how):
    if how.startswith("No module"):
        (host.root / "lib" / "pynvml.py").write_text(f"raise ModuleNotFoundError({how!r})\n")
    else:
        host.machine({"nvml_error": f"NVMLError_LibraryNotFound: {how}"})


@pytest.mark.parametrize("how", NO_NVML)
def test_a_cpu_host_writes_nothing_and_does_not_fail(host, how):
    without_nvml(host, how)
    host.out.write_text("# left from when this host had GPUs\n")
    done = host.run(expected_count=0)
    assert done.returncode == 0, done.stderr
    assert not host.out.exists() and list(host.out.parent.iterdir()) == []
    assert "no NVIDIA GPU to report" in done.stderr and how in done.stderr
    assert not (host.root / "journal" / "calls").exists()


@pytest.mark.parametrize("how", NO_NVML)
def test_a_gpu_host_without_nvml_reports_zero_gpus(host, how):
    """Where the inventory expects GPUs, no NVML is a fault to alert on (a driver gone after an
    upgrade), not a CPU host: 0 GPUs of 8, so `count < expected_count` fires."""
    without_nvml(host, how)
    done = host.run()
    assert done.returncode == 0, done.stderr
    series = host.series()
    assert (value(series, f"{P}count"), value(series, f"{P}expected_count"), value(series, f"{P}nvml_up")) == (0, 8, 0)
    assert "reports 0 of 8 GPUs" in done.stderr
    assert not set(PER_GPU) & names(series)


def test_readings_still_reports_torch_and_metrics_never_loads_it(host):
    """The gate's `readings` loads torch (it checks torch's CUDA against the driver);
    gpu_metrics.py runs every scrape interval and must not pay for it, importing gpu_probe.py."""
    assert host.run().returncode == 0
    assert not (host.root / "torch-imported").exists()
    env = {**os.environ, "PYTHONPATH": str(host.root / "lib"), "FAKE_NVML_MACHINE": str(host.root / "machine.json")}
    done = subprocess.run([sys.executable, "-S", str(GPU_PROBE), "readings"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    readings = json.loads(done.stdout)
    assert (host.root / "torch-imported").exists() and "stand-in" in readings["torch"]["error"]
    assert [g["pci_bus_id"] for g in readings["gpus"]] == [f"00000000:{b}:00.0" for b in HGX_BUSES]

