"""The fallback provider's plan (roles.plan.fallback): what the edge is given, and every refusal
before a host is touched, naming the host, the setting and the fix, never the key."""

import os

import pytest

from roles import secrets
from roles.errors import FleetConfigError
from roles.plan import setting_checks, settings
from roles.plan.cost import fallback_cost_per_day
from roles.plan.fallback import FALLBACK_KEY_FILE, instance_cap, keepalive_probes, plan_provider
from roles.plan.fleet import plan_fleet
from roles.plan.report import cost_lines

KEY = "sk-provider-0123456789abcdef"
GIVEN = {"nginx_fallback": "overflow", "nginx_fallback_url": "https://api.example.com:8443/openai/v1/",
         "nginx_fallback_model": "meta/llama-3.3-70b"}


@pytest.fixture
def folder(tmp_path):
    folder = secrets.private_dir(tmp_path / "secrets")
    secrets.write_private(folder / FALLBACK_KEY_FILE, f"{KEY}\n".encode())
    return folder


def refusal(data, folder, tmp_path) -> FleetConfigError:
    with pytest.raises(FleetConfigError) as error:
        plan_provider("lb1", data, folder, tmp_path)
    assert KEY not in str(error.value)
    return error.value


def test_off_plans_no_provider(folder, tmp_path):
    assert settings.BY_NAME["nginx_fallback"].default == "off"
    assert plan_provider("lb1", {}, folder, tmp_path) is None
    assert plan_provider("lb1", {**GIVEN, "nginx_fallback": "off"}, folder, tmp_path) is None


def test_the_provider_as_the_edge_reaches_it(folder, tmp_path):
    provider = plan_provider("lb1", GIVEN, folder, tmp_path)
    assert (provider.mode, provider.host, provider.port, provider.base_path) == \
        ("overflow", "api.example.com", 8443, "/openai/v1")
    assert provider.authority == "api.example.com:8443" and provider.key.reveal() == KEY
    assert provider.uri("/v1/chat/completions") == "/openai/v1/chat/completions"
    assert provider.models_url == "https://api.example.com:8443/openai/v1/models"
    assert provider.ca is None and (provider.connect_timeout, provider.read_timeout) == (5, 300)
    assert KEY not in repr(provider)
    default_port = plan_provider("lb1", {**GIVEN, "nginx_fallback_url": "https://api.example.com/v1"}, folder, tmp_path)
    assert default_port.authority == "api.example.com" and default_port.port == 443


@pytest.mark.parametrize("missing", ["nginx_fallback_url", "nginx_fallback_model"])
def test_a_mode_without_url_or_model_is_refused(folder, tmp_path, missing):
    error = refusal({k: v for k, v in GIVEN.items() if k != missing}, folder, tmp_path)
    assert error.field == f"host lb1: `{missing}`"
    assert "nginx_fallback is 'overflow'" in error.problem and "nginx_fallback = 'off'" in error.fix


def test_the_key_file_must_exist_be_private_and_hold_one_key(folder, tmp_path):
    path = folder / FALLBACK_KEY_FILE
    os.chmod(path, 0o644)
    assert "has mode 0644" in refusal(GIVEN, folder, tmp_path).problem
    path.write_text("two words\n")
    os.chmod(path, 0o600)
    error = refusal(GIVEN, folder, tmp_path)
    assert error.field == str(path) and "does not hold one key" in error.problem
    assert f"vllm-fleet keys fallback {folder}" in error.fix
    path.unlink()
    error = refusal(GIVEN, folder, tmp_path)
    assert error.field == "host lb1: `nginx_fallback`" and "does not exist" in error.problem


def test_the_ca_bundle_must_hold_certificates(folder, tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    error = refusal({**GIVEN, "nginx_fallback_ca": "ca.pem"}, folder, tmp_path)
    assert error.field == "host lb1: `nginx_fallback_ca`" and "holds no PEM certificate" in error.problem
    ca, _ = secrets.fleet_ca(folder)
    assert plan_provider("lb1", {**GIVEN, "nginx_fallback_ca": str(ca)}, folder, tmp_path).ca == ca


@pytest.mark.parametrize("data, problem", [
    ({"nginx_fallback": "always"}, "'always' is not one of off, failover, overflow."),
    ({"nginx_fallback_url": "http://api.example.com/v1"}, "is not an https URL"),
    ({"nginx_fallback_url": "https://user:pw@api.example.com/v1"}, "is not an https URL"),
    ({"nginx_fallback_model": "two words"}, "is not 1 to 128 letters"),
    ({"nginx_instance_cap": 0}, "0 is outside the allowed range (at least 1)."),
    ({"nginx_dead_peer_timeout": 5}, "5 is outside the allowed range (from 6 to 600)."),
])
def test_the_settings_refuse_other_values(data, problem):
    with pytest.raises(FleetConfigError) as error:
        setting_checks.check_host_data("lb1", data)
    assert problem in error.value.problem


def test_an_instance_cap_is_its_max_num_seqs_unless_set():
    assert instance_cap({}, 16) == 16
    assert instance_cap({"nginx_instance_cap": 2}, 16) == 2


@pytest.mark.parametrize("timeout, idle, interval", [(30, 15, 5), (6, 3, 1), (7, 4, 1), (600, 300, 100)])
def test_keepalive_probes_drop_a_silent_peer_within_the_timeout(timeout, idle, interval):
    probes = keepalive_probes(timeout)
    assert probes == {"net.ipv4.tcp_keepalive_time": idle, "net.ipv4.tcp_keepalive_intvl": interval,
                      "net.ipv4.tcp_keepalive_probes": 3}
    assert idle + 3 * interval <= timeout


def test_the_fallbacks_cost_per_day():
    assert fallback_cost_per_day(200_000_000, 0.1, 0.6) == pytest.approx(12.0)
    assert fallback_cost_per_day(200_000_000, 0.0, 0.6) == 0


def test_plan_reports_what_the_fallback_costs(host_data):
    data = host_data(vllm_gpu_hour_price=2.0, vllm_tokens_per_s=1000.0, vllm_daily_tokens=100_000_000,
                     vllm_fallback_price_per_million=0.5)
    lines = cost_lines(plan_fleet([("h1", data)], ["h1"]))
    assert ("the fallback provider at 0.5 per million, carrying 5% of the 100,000,000 tokens a day "
            "(vllm_fallback_share): 2.50/day") in lines[1]
    unpriced = plan_fleet([("h1", {**data, "vllm_fallback_price_per_million": None})], ["h1"])
    assert not any("fallback" in line for line in cost_lines(unpriced))
