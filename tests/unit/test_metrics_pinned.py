"""Metric names pinned to releases: every vLLM metric the alert rules use must be one the release
exposes (captured from a lab instance into inventories/releases/NAME.metrics), or the plan is
refused naming the metric, the file and the release."""

import shutil
from pathlib import Path

import pytest

from roles.errors import FleetConfigError
from roles.plan import alerts
from roles.plan.metrics import check_release_metrics, exposed_names
from roles.release.metrics import release_metrics

REPO = Path(__file__).resolve().parents[2]
RELEASES = REPO / "inventories" / "releases"
RULES = f"templates/prometheus/{alerts.RULES_TEMPLATE}"


def rule_metrics() -> set[str]:
    return alerts.metric_names(alerts.render_rules({}))


@pytest.mark.parametrize("release", sorted(p.stem for p in RELEASES.glob("cpu-*.yml")))
def test_the_rules_use_only_metrics_each_lab_release_exposes(release):
    used = {n for n in rule_metrics() if n.startswith("vllm:")}
    assert used and used <= release_metrics(release, RELEASES)
    check_release_metrics(release, RELEASES, {RULES: rule_metrics()})


def test_a_renamed_metric_is_refused_naming_it_the_file_and_the_release(tmp_path):
    releases = tmp_path / "releases"
    shutil.copytree(RELEASES, releases)
    listed = releases / "cpu-vllm-0.32.0.metrics"
    listed.write_text(listed.read_text().replace("vllm:kv_cache_usage_perc\n", "vllm:kv_cache_usage_ratio\n"))
    with pytest.raises(FleetConfigError) as error:
        check_release_metrics("cpu-vllm-0.32.0", releases, {RULES: rule_metrics()})
    e = error.value
    assert e.field == "release cpu-vllm-0.32.0: metric vllm:kv_cache_usage_perc"
    assert f"{RULES} uses vllm:kv_cache_usage_perc" in e.problem and "does not expose" in e.problem
    assert "cpu-vllm-0.32.0.metrics" in e.fix


def test_a_release_without_a_capture_is_refused(tmp_path):
    with pytest.raises(FleetConfigError, match="has no list of the metrics it exposes"):
        check_release_metrics("cpu-vllm-0.32.0", tmp_path, {RULES: rule_metrics()})


def test_names_outside_vllm_are_not_pinned_to_the_release(tmp_path):
    (tmp_path / "r.metrics").write_text("# comment\nvllm:num_requests_waiting\n")
    check_release_metrics("r", tmp_path, {"f": {"node_load1", "up", "vllm_fleet_gpu_count", "vllm:num_requests_waiting"}})


def test_exposed_names_reads_the_text_format():
    page = ('# HELP vllm:num_requests_running Number of requests.\n# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
            'vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="m"} 1.0\nup 1\n')
    assert exposed_names(page) == {"vllm:num_requests_running", "vllm:e2e_request_latency_seconds_bucket", "up"}


def test_a_monitored_fleet_on_a_release_lacking_a_metric_is_refused_before_any_host(host_data, tmp_path):
    from tests.deploy.fakehost import fleet_plan

    releases = tmp_path / "releases"
    shutil.copytree(RELEASES, releases)
    data = host_data(vllm_releases_dir=str(releases))
    assert fleet_plan([("h1", data)], ["h1"], monitor_hosts=["h1"]).monitoring is not None
    listed = releases / "cpu-vllm-0.32.0.metrics"
    listed.write_text(listed.read_text().replace("vllm:num_requests_waiting\n", ""))
    with pytest.raises(FleetConfigError, match="metric vllm:num_requests_waiting"):
        fleet_plan([("h1", data)], ["h1"], monitor_hosts=["h1"])
    fleet_plan([("h1", data)], ["h1"])  # without monitoring, nothing uses it
