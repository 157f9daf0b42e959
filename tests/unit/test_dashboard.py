"""The fleet's Grafana dashboard (dashboards/vllm-fleet.json, roles/plan/dashboard.py) and its
provisioning files: the JSON is a dashboard whose panels all have a datasource and queries,
every query is PromQL (promtool parses it), and every vLLM metric it reads is one each lab
release exposes, so a rename in a new release fails the plan naming the metric, the dashboard
and the release."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from roles.errors import FleetConfigError
from roles.plan import dashboard
from roles.plan.alerts import expression_metrics
from roles.plan.metrics import check_release_metrics
from roles.plan.monitoring import PROMETHEUS_ADDRESS
from roles.release.metrics import VLLM_PREFIX, release_metrics
from tests.unit.test_alert_rules import require_promtool

REPO = Path(__file__).resolve().parents[2]
RELEASES = REPO / "inventories" / "releases"
PROVISIONING = REPO / "dashboards" / "provisioning"
DATASOURCE_UID = "${datasource}"
# What the overview must show (issue 12): requests, errors, TTFT/ITL/E2E, running/waiting, KV
# cache, prefix cache, tokens, GPUs and releases; each is read by at least one panel.
EXPECTED_METRICS = {
    "vllm:request_success_total", "vllm_fleet_edge_responses_total", "nginx_up", "nginx_http_requests_total",
    "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm_fleet_gpu_utilization_ratio",
    "vllm_fleet_gpu_memory_used_bytes", "vllm_fleet_gpu_memory_total_bytes", "vllm_fleet_gpu_temperature_celsius",
    "up",
}


@pytest.fixture(scope="module")
def model() -> dict:
    return dashboard.load_dashboard()


def query_panels(model: dict) -> list[dict]:
    return [panel for panel in dashboard.panels(model) if panel.get("type") != "row"]


def test_the_dashboard_is_json_with_a_datasource_variable_and_host_and_model_variables():
    model = json.loads(dashboard.DASHBOARD.read_text())
    assert dashboard.DASHBOARD_NAME == "dashboards/vllm-fleet.json"
    assert model["uid"] == "vllm-fleet" and model["schemaVersion"] >= 36
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("host", "model"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == DATASOURCE_UID
        assert variables[name]["query"]["query"].startswith("label_values(")
    assert [title for title, _ in dashboard.variable_expressions(model)] == ["variable host", "variable model"]


def test_every_panel_has_the_datasource_variable_a_place_and_at_least_one_query(model):
    panels = query_panels(model)
    assert len(panels) >= 20
    ids = [panel["id"] for panel in dashboard.panels(model)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID and target["expr"].strip(), panel["title"]
        place = panel["gridPos"]
        assert place["w"] > 0 and place["h"] > 0 and place["x"] + place["w"] <= 24, panel["title"]


def test_per_instance_and_per_host_series_are_told_apart_by_their_legends(model):
    for panel in query_panels(model):
        if panel["type"] != "timeseries":
            continue
        for target in panel["targets"]:
            legend = target.get("legendFormat", "")
            assert legend, f"{panel['title']}: {target['expr']}"
            if "by (host, instance_name" in target["expr"]:
                assert "{{host}}" in legend and "{{instance_name}}" in legend, panel["title"]
            elif "job=\"node\"" in target["expr"] or "by (host" in target["expr"]:
                assert "{{host}}" in legend, panel["title"]


def test_panel_expressions_find_the_panels_of_collapsed_rows(model):
    titles = {title for title, _ in dashboard.panel_expressions(model)}
    gpu_row = next(p for p in model["panels"] if p["type"] == "row" and p["title"].startswith("GPUs"))
    assert gpu_row["collapsed"] and gpu_row["panels"]
    assert {p["title"] for p in gpu_row["panels"]} <= titles
    nested = {"panels": [
        {"type": "stat", "title": "top", "targets": [{"expr": "up"}]},
        {"type": "row", "title": "r", "collapsed": True, "panels": [
            {"type": "timeseries", "title": "inner", "targets": [{"expr": "vllm:num_requests_running"},
                                                                  {"expr": "  "}, {"refId": "B"}]}]}]}
    assert dashboard.panel_expressions(nested) == [("top", "up"), ("inner", "vllm:num_requests_running")]
    assert dashboard.metric_names(nested) == {"up", "vllm:num_requests_running"}


def test_every_expression_parses_and_reads_a_metric(model):
    expressions = dashboard.panel_expressions(model) + dashboard.variable_expressions(model)
    assert len(expressions) >= 30
    for title, expr in expressions:
        substituted = dashboard.substitute_variables(expr)
        assert "$" not in substituted and "[[" not in substituted, (title, substituted)
        assert expression_metrics(substituted), (title, expr)
    assert EXPECTED_METRICS <= dashboard.metric_names(model)


def test_grafana_variables_are_replaced_by_values_of_their_kind():
    expr = ('rate(x{host=~"$host", model=~"${model}", i=~"${instance:regex}", o=~"[[old]]"}[$__rate_interval]) '
            '+ rate(y[${__interval}]) + z offset $__range')
    assert dashboard.substitute_variables(expr) == (
        'rate(x{host=~".*", model=~".*", i=~".*", o=~".*"}[5m]) + rate(y[1m]) + z offset 1h')
    # label_replace's $1 is not a variable
    assert dashboard.substitute_variables('label_replace(up, "a", "$1", "b", "(.*)")') == \
        'label_replace(up, "a", "$1", "b", "(.*)")'
    assert dashboard.metric_names({"panels": [{"title": "t", "targets": [{"expr": expr}]}]}) == {"x", "y", "z"}


def test_a_query_that_is_not_promql_is_refused_naming_the_panel():
    broken = {"panels": [{"title": "Broken", "targets": [{"expr": "sum(rate(vllm:num_requests_running[5m])"}]}]}
    with pytest.raises(FleetConfigError, match="dashboards/vllm-fleet.json, panel 'Broken'"):
        dashboard.metric_names(broken)


def test_a_file_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(FleetConfigError, match="cannot be read as JSON"):
        dashboard.load_dashboard(tmp_path / "d.json")


# ---- pinned to the releases -----------------------------------------------------------------------

@pytest.mark.parametrize("release", sorted(p.stem for p in RELEASES.glob("cpu-*.yml")))
def test_the_dashboard_uses_only_vllm_metrics_each_lab_release_exposes(model, release):
    names = dashboard.metric_names(model)
    used = {n for n in names if n.startswith(VLLM_PREFIX)}
    assert len(used) >= 12 and used <= release_metrics(release, RELEASES), used - release_metrics(release, RELEASES)
    check_release_metrics(release, RELEASES, {dashboard.DASHBOARD_NAME: names})


def test_a_renamed_metric_is_refused_naming_it_the_dashboard_and_the_release(model, tmp_path):
    releases = tmp_path / "releases"
    shutil.copytree(RELEASES, releases)
    listed = releases / "cpu-vllm-0.32.0.metrics"
    listed.write_text(listed.read_text().replace("vllm:kv_cache_usage_perc\n", "vllm:kv_cache_usage_ratio\n"))
    with pytest.raises(FleetConfigError) as error:
        check_release_metrics("cpu-vllm-0.32.0", releases, {dashboard.DASHBOARD_NAME: dashboard.metric_names(model)})
    e = error.value
    assert e.field == "release cpu-vllm-0.32.0: metric vllm:kv_cache_usage_perc"
    assert "dashboards/vllm-fleet.json uses vllm:kv_cache_usage_perc" in e.problem
    assert "release cpu-vllm-0.32.0 does not expose" in e.problem
    assert "cpu-vllm-0.32.0.metrics" in e.fix and "dashboards/vllm-fleet.json" in e.fix


def test_a_monitored_fleet_is_refused_when_its_release_lacks_a_metric_only_the_dashboard_uses(host_data, tmp_path):
    from tests.deploy.fakehost import fleet_plan

    releases = tmp_path / "releases"
    shutil.copytree(RELEASES, releases)
    data = host_data(vllm_releases_dir=str(releases))
    listed = releases / "cpu-vllm-0.32.0.metrics"
    listed.write_text(listed.read_text().replace("vllm:prefix_cache_queries_total\n", ""))
    with pytest.raises(FleetConfigError, match="metric vllm:prefix_cache_queries_total") as error:
        fleet_plan([("h1", data)], ["h1"], monitor_hosts=["h1"])
    assert "dashboards/vllm-fleet.json uses" in error.value.problem
    fleet_plan([("h1", data)], ["h1"])  # without monitoring, nothing uses it


# ---- provisioning ---------------------------------------------------------------------------------

def test_the_datasource_is_the_monitor_hosts_prometheus():
    provisioned = yaml.safe_load((PROVISIONING / "datasource.yml").read_text())
    assert provisioned["apiVersion"] == 1
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == f"http://{PROMETHEUS_ADDRESS}" == "http://127.0.0.1:9090"


def test_the_dashboard_provider_loads_the_fleets_folder():
    provisioned = yaml.safe_load((PROVISIONING / "dashboards.yml").read_text())
    assert provisioned["apiVersion"] == 1
    (provider,) = provisioned["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/vllm-fleet"


# ---- promtool -------------------------------------------------------------------------------------

def test_promtool_parses_every_query(model, tmp_path):
    """promtool has no offline query check, but `check rules` parses each rule's expression: every
    query (its Grafana variables replaced) becomes a recording rule."""
    promtool = require_promtool()
    expressions = dashboard.panel_expressions(model) + dashboard.variable_expressions(model)
    rules = [{"record": f"dashboard:query_{n}:check", "expr": dashboard.substitute_variables(expr),
              "labels": {"panel": title}} for n, (title, expr) in enumerate(expressions)]
    (tmp_path / "dashboard-queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", "dashboard-queries.yml"], cwd=tmp_path, check=False,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(rules)} rules found" in output, output
