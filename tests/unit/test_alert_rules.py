"""The fleet's alert rules (roles/plan/alerts.py, templates/prometheus/vllm-fleet-rules.yml.j2):
promtool accepts them, each alert fires when it should and only then
(tests/fixtures/prometheus/rules_test.yml), thresholds come from the settings, every alert has
a severity, a summary and a runbook line, and the metric names they use are listed."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from roles.errors import FleetConfigError
from roles.plan import alerts, settings

RULES_TEST = Path(__file__).resolve().parents[1] / "fixtures" / "prometheus" / "rules_test.yml"
AREAS = ["vllm-fleet-instances", "vllm-fleet-edge", "vllm-fleet-gpus", "vllm-fleet-hosts"]
# Each one found in vLLM 0.32.0's vllm/v1/metrics/loggers.py (the wheel of the lab's release,
# inventories/releases/cpu-vllm-0.32.0.lock): counters gain _total, histograms _bucket.
VLLM_METRICS = {
    "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
    "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
}
OTHER_METRICS = {
    "up", "node_systemd_unit_state", "node_filesystem_avail_bytes", "node_filesystem_size_bytes",
    "node_timex_sync_status", "node_timex_maxerror_seconds", "nginx_up",
    "vllm_fleet_edge_responses_total", "vllm_fleet_edge_upstreams_up", "vllm_fleet_edge_upstreams_total",
    "vllm_fleet_edge_fallback_responses_total",
    "vllm_fleet_gpu_count", "vllm_fleet_gpu_expected_count", "vllm_fleet_gpu_temperature_celsius",
    "vllm_fleet_gpu_ecc_uncorrected_volatile_total", "vllm_fleet_gpu_remapped_rows_failed",
    "vllm_fleet_gpu_remapped_rows_pending", "vllm_fleet_gpu_xid_events_total",
}


def require_promtool() -> str:
    """Debian's and Ubuntu's prometheus package ships it. A missing promtool fails each test that
    needs it (called in the test, so it reads FAILED, not a fixture ERROR), and never skips it."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: `make test` (or `make unit`) installs it (apt-get install prometheus, "
                    "which ships /usr/bin/promtool).", pytrace=False)
    return found


@pytest.fixture(scope="module")
def default_rules() -> str:
    return alerts.render_rules({})


def alert_rules(rules_text: str) -> list[dict]:
    return [rule for group in yaml.safe_load(rules_text)["groups"] for rule in group["rules"]]


def run_promtool(promtool: str, *args: str, cwd: Path) -> str:
    result = subprocess.run([promtool, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


# ---- (a) promtool check rules ---------------------------------------------------------------------

def test_promtool_accepts_the_rules_rendered_with_the_defaults(tmp_path, default_rules):
    promtool = require_promtool()
    (tmp_path / alerts.RULES_FILE_NAME).write_text(default_rules)
    output = run_promtool(promtool, "check", "rules", alerts.RULES_FILE_NAME, cwd=tmp_path)
    assert f"SUCCESS: {len(alert_rules(default_rules))} rules found" in output, output


def test_promtool_accepts_the_rules_rendered_with_other_settings(tmp_path):
    promtool = require_promtool()
    rules = alerts.render_rules({"monitor_kv_cache_usage_max": 0.5, "monitor_scrape_interval": 90,
                                 "monitor_ttft_p95_max_s": 0.75, "vllm_data_dir": "/srv/vllm"})
    (tmp_path / alerts.RULES_FILE_NAME).write_text(rules)
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", alerts.RULES_FILE_NAME, cwd=tmp_path)


# ---- (b) promtool test rules ----------------------------------------------------------------------

def without_annotations(rules_text: str) -> str:
    """The rules less their annotations: promtool compares annotations too, and their wording is
    tested below, not in the fixture's firing cases."""
    document = yaml.safe_load(rules_text)
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return yaml.safe_dump(document, sort_keys=False)


def test_each_alert_fires_when_it_should_and_only_then(tmp_path, default_rules):
    promtool = require_promtool()
    # promtool reads rule_files relative to the test file: both go into one folder.
    (tmp_path / alerts.RULES_FILE_NAME).write_text(without_annotations(default_rules))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    output = run_promtool(promtool, "test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert "SUCCESS" in output, output


def test_the_fixture_has_a_firing_and_a_quiet_case_for_every_alert(default_rules):
    cases = [case for test in yaml.safe_load(RULES_TEST.read_text())["tests"] for case in test["alert_rule_test"]]
    names = {rule["alert"] for rule in alert_rules(default_rules)}
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"
    assert {case["alertname"] for case in cases} <= names, "the fixture tests alerts that do not exist"


def test_annotations_expand_with_the_alerts_labels(tmp_path, default_rules):
    promtool = require_promtool()
    labels = {"job": "vllm", "instance": "cpu1:8001", "host": "cpu1", "instance_name": "a", "model": "tiny",
              "release": "r1"}
    rule = next(rule for rule in alert_rules(default_rules) if rule["alert"] == "VllmInstanceDown")
    expected = {key: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
                for key, text in rule["annotations"].items()}
    assert "systemctl status vllm@a`" in expected["runbook"] and "/health" in expected["runbook"]
    series = "up{" + ", ".join(f'{key}="{value}"' for key, value in labels.items()) + "}"
    test = {"rule_files": [alerts.RULES_FILE_NAME], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": series, "values": "0x5"}],
        "alert_rule_test": [{"eval_time": "2m", "alertname": "VllmInstanceDown", "exp_alerts": [
            {"exp_labels": {**labels, "severity": "critical"}, "exp_annotations": expected}]}]}]}
    (tmp_path / alerts.RULES_FILE_NAME).write_text(default_rules)
    (tmp_path / "annotations_test.yml").write_text(yaml.safe_dump(test))
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", "annotations_test.yml", cwd=tmp_path)


# ---- (c) thresholds come from the settings ----------------------------------------------------------

def expression_of(rules_text: str, alert: str) -> str:
    return " ".join(next(rule["expr"] for rule in alert_rules(rules_text) if rule["alert"] == alert).split())


THRESHOLDS = {
    # setting: (a value no default has, the alert whose expression holds it)
    "monitor_queue_waiting_max": (37, "VllmQueueDepthHigh"),
    "monitor_kv_cache_usage_max": (0.5, "VllmKvCacheFull"),
    "monitor_ttft_p95_max_s": (3.25, "VllmTtftP95AboveSlo"),
    "monitor_itl_p95_max_s": (0.125, "VllmItlP95AboveSlo"),
    "monitor_lb_5xx_ratio_max": (0.02, "EdgeErrorRatioHigh"),
    "monitor_fallback_share_max": (0.5, "EdgeFallbackShareHigh"),
    "monitor_gpu_temperature_max_c": (77, "GpuTemperatureHigh"),
    "monitor_disk_free_min": (0.15, "ModelCacheDiskFilling"),
}


def test_every_threshold_setting_is_tested():
    assert set(THRESHOLDS) == set(alerts.THRESHOLD_SETTINGS)


@pytest.mark.parametrize("name", THRESHOLDS)
def test_a_threshold_renders_from_its_setting(default_rules, name):
    value, alert = THRESHOLDS[name]
    default = settings.BY_NAME[name].default
    assert expression_of(default_rules, alert).endswith(f"> {default}" if "min" not in name else f"< {default}")
    rendered = expression_of(alerts.render_rules({name: value}), alert)
    assert rendered.endswith(f"> {value}" if "min" not in name else f"< {value}"), rendered


def test_the_kv_cache_threshold_of_0_5_is_in_the_rules():
    rules = alerts.render_rules({"monitor_kv_cache_usage_max": 0.5})
    assert "vllm:kv_cache_usage_perc" in rules and "> 0.5\n" in rules


def test_rates_span_four_scrapes_when_scrapes_are_far_apart():
    assert alerts.rate_window(15) == "5m" and alerts.rate_window(75) == "5m"
    assert alerts.rate_window(90) == "6m" and alerts.rate_window(100) == "400s"
    rules = alerts.render_rules({"monitor_scrape_interval": 120})
    assert "[8m]" in expression_of(rules, "VllmPreempting") and "[5m]" not in rules


def test_the_model_cache_disk_is_the_mount_nearest_to_vllm_data_dir():
    assert alerts.mountpoints_holding("/var/lib/vllm-fleet") == ["/var/lib/vllm-fleet", "/var/lib", "/var", "/"]
    assert alerts.mountpoints_holding("/") == ["/"]
    expr = expression_of(alerts.render_rules({"vllm_data_dir": "/srv/vllm"}), "ModelCacheDiskFilling")
    # Each mount point twice: available bytes over size.
    assert re.findall(r'mountpoint="([^"]*)"', expr)[::2] == ["/srv/vllm", "/srv", "/"]


@pytest.mark.parametrize("data, field", [
    ({"monitor_kv_cache_usage_max": 1.5}, "monitor_kv_cache_usage_max"),
    ({"monitor_queue_waiting_max": "ten"}, "monitor_queue_waiting_max"),
    ({"monitor_gpu_temperature_max_c": True}, "monitor_gpu_temperature_max_c"),
    ({"monitor_scrape_interval": 0}, "monitor_scrape_interval"),
    ({"vllm_data_dir": 'relative"path'}, "vllm_data_dir"),
])
def test_a_bad_setting_is_refused_naming_it(data, field):
    with pytest.raises(FleetConfigError) as refused:
        alerts.render_rules(data, host_name="mon1")
    assert field in refused.value.field and "mon1" in refused.value.field


# ---- (d) every alert has a severity, a summary and a runbook line -----------------------------------

def test_one_group_per_area(default_rules):
    assert [group["name"] for group in yaml.safe_load(default_rules)["groups"]] == AREAS


def test_every_alert_has_a_severity_a_summary_and_a_runbook_line(default_rules):
    rules = alert_rules(default_rules)
    assert len(rules) >= 17
    assert len({rule["alert"] for rule in rules}) == len(rules), "alert names repeat"
    for rule in rules:
        where = rule["alert"]
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, where
        assert rule["labels"]["severity"] in ("critical", "warning"), where
        assert set(rule["annotations"]) == {"summary", "runbook"}, where
        for key, text in rule["annotations"].items():
            assert text.strip() and "\n" not in text, f"{where}: {key} is not one line"
        assert len(rule["annotations"]["runbook"]) > 100, f"{where}: the runbook says too little"


def test_the_fixed_for_durations(default_rules):
    durations = {rule["alert"]: rule["for"] for rule in alert_rules(default_rules)}
    assert durations["VllmInstanceDown"] == "1m" and durations["HostDown"] == "2m"
    assert durations["VllmQueueDepthHigh"] == durations["VllmKvCacheFull"] == durations["EdgeErrorRatioHigh"] == "5m"
    assert durations["VllmPreempting"] == durations["VllmTtftP95AboveSlo"] == durations["VllmItlP95AboveSlo"] == "10m"


def test_gpu_rules_read_only_gpu_series_and_never_absent(default_rules):
    for rule in alert_rules(default_rules):
        assert "absent(" not in rule["expr"], rule["alert"]
        if rule["alert"].startswith("Gpu"):
            assert all(name.startswith("vllm_fleet_gpu_") for name in alerts.expression_metrics(rule["expr"]))


def test_the_critical_xids_include_the_usual_set(default_rules):
    assert {48, 63, 64, 74, 79, 92, 94, 95} <= set(alerts.CRITICAL_XIDS)
    assert not {13, 31, 43, 45} & set(alerts.CRITICAL_XIDS), "application faults are not the GPU's"
    assert 'xid=~"48|61|62|63|64|74|79|92|94|95|119|120|140|154"' in expression_of(default_rules, "GpuCriticalXid")


# ---- (e) the metric names the rules use ---------------------------------------------------------

def test_metric_names_of_the_rules(default_rules):
    assert alerts.metric_names(default_rules) == VLLM_METRICS | OTHER_METRICS


def test_metric_names_leave_out_what_recording_rules_create():
    rules = yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "instance:vllm_waiting:sum", "expr": "sum by (host) (vllm:num_requests_waiting)"},
        {"alert": "A", "expr": "instance:vllm_waiting:sum > 3"}]}]})
    assert alerts.metric_names(rules) == {"vllm:num_requests_waiting"}
    assert alerts.rule_expressions(rules)[1] == ("A", "instance:vllm_waiting:sum > 3")


@pytest.mark.parametrize("text", ["groups: [", "just text", "groups: [{name: g, rules: [{alert: A}]}]"])
def test_a_file_that_is_no_rules_file_is_refused(text):
    with pytest.raises(FleetConfigError):
        alerts.metric_names(text)


@pytest.mark.parametrize("expr, names", [
    ('up{job="vllm"} == 0', {"up"}),
    (("histogram_quantile(0.95, sum by (model, le) (rate(vllm:time_to_first_token_seconds_bucket"
      '{job="vllm", le!="+Inf"}[5m])))'), {"vllm:time_to_first_token_seconds_bucket"}),
    ("sum without (engine, instance) (rate(vllm:num_preemptions_total[5m:1m] offset 1h))",
     {"vllm:num_preemptions_total"}),
    ("a / on (host) group_left (model, release) b", {"a", "b"}),
    ("a * ignoring(gpu) group_right b", {"a", "b"}),
    ("vllm_fleet_gpu_count<vllm_fleet_gpu_expected_count", {"vllm_fleet_gpu_count", "vllm_fleet_gpu_expected_count"}),
    ('{__name__="vllm:prompt_tokens_total", job="vllm"}', {"vllm:prompt_tokens_total"}),
    ('{"vllm:generation_tokens_total", le="1"}', {"vllm:generation_tokens_total"}),
    ('count_values("version", build_info)', {"build_info"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)")', {"up"}),
    ("x > bool 1 and y unless z or w", {"x", "y", "z", "w"}),
    ("sum(foo @ end()) by (le)", {"foo"}),
    ("time() - node_boot_time_seconds", {"node_boot_time_seconds"}),
    ("max_over_time(x[1h30m]) > 1e-05 and -Inf < y", {"x", "y"}),
    ("topk(3, x) or quantile(0.9, y) or count(z) or absent(w)", {"x", "y", "z", "w"}),
    ("x # the comment names y{}\n + z", {"x", "z"}),
    ("# only a comment\nvector(1) + scalar(0x1f)", set()),
    ('rate(vllm_fleet_edge_responses_total{status=~"5..", host!~"lb(1|2)"}[5m])',
     {"vllm_fleet_edge_responses_total"}),
    ("SUM BY (le) (x) AND NaN", {"x"}),
])
def test_expression_metrics(expr, names):
    assert alerts.expression_metrics(expr) == names


@pytest.mark.parametrize("expr", ["sum(x", "x)", 'x{a="b"', "rate(x[5m)", "x ; y"])
def test_an_expression_that_is_no_promql_is_refused(expr):
    with pytest.raises(FleetConfigError) as refused:
        alerts.expression_metrics(expr)
    assert expr in refused.value.field
