"""Values that reach a shell on a host (issue 10, class 5). Every string setting of the table, fed
whitespace and shell metacharacters, is refused by the plan with the setting named, or reaches
the host's commands only as quoted data. And the commands quote what they interpolate even
where the plan would have refused it: quoting is the second line of defence."""

import dataclasses
import shlex
from unittest import mock

import pytest
from pyinfra.api import StringCommand

from roles import site
from roles.common import ArtifactFile
from roles.errors import FleetConfigError
from roles.plan import settings
from roles.plan.fleet import plan_fleet
from tests.conftest import TINY_CONFIG
from tests.deploy.fakehost import fleet_plan, plan
from tests.deploy.simhost import SimulatedHost, debian

pytestmark = pytest.mark.usefixtures("no_wheel_download", "in_tmp")

BAD = ["a b", "$(touch /tmp/pwned)", "`id`", ";rm -rf /", "'", '"', "\n"]
MARKER = "zzmarker"  # a plain word in place of the bad value: what its commands look like unquoted
SPECIALS = "$`;&|<>()\n"


def takes_strings(setting: settings.Setting) -> bool:
    item = setting.item if isinstance(setting.item, tuple) else (setting.item,)
    return setting.type is str or (setting.type is list and str in item)


STRING_SETTINGS = [s for s in settings.SETTINGS if takes_strings(s)]


def shell_syntax(command: str) -> str:
    """The characters of ``command`` a POSIX shell reads as syntax, not as quoted data."""
    out, quote, escaped = [], None, False
    for c in command:
        if escaped:
            escaped = False
        elif quote == "'":
            quote = None if c == "'" else quote
        elif c == "\\":
            escaped = True
        elif quote == '"':
            quote = None if c == '"' else quote
            out += [c] if c in "$`" else []
        elif c in "'\"":
            quote = c
        else:
            out.append(c)
    return "".join(out)


def assert_inert(plain: list[str], odd: list[str], value: str) -> None:
    """``odd`` are the commands ``plain`` became with ``value`` where ``MARKER`` was: the same
    arguments with the value inside them, and not one more character of shell syntax."""
    assert len(odd) == len(plain), (plain, odd)
    for before, after in zip(plain, odd):
        try:
            argv = shlex.split(after)
        except ValueError:  # an unbalanced quote: the value broke out of its quoting
            argv = None
        assert argv == [arg.replace(MARKER, value) for arg in shlex.split(before)], (before, after)
        assert sorted(c for c in shell_syntax(after) if c in SPECIALS) == \
            sorted(c for c in shell_syntax(before) if c in SPECIALS), (before, after)


def deploy_commands(fleet, data) -> list[str]:
    """The shell commands a deploy runs on a fresh host (uploads and callbacks are no shell text)."""
    ops = plan(site.serve, fleet, host_name="h1", host_data=data, sim=SimulatedHost(debian(12)))
    return [c.get_raw_value() for op in ops for c in op.raw if isinstance(c, StringCommand)]


@pytest.mark.parametrize("setting", STRING_SETTINGS, ids=lambda s: s.name)
def test_shell_syntax_in_a_string_setting_is_refused_or_inert(host_data, setting):
    def data(value):
        return host_data(**{setting.name: [value] if setting.type is list else value})

    plain = None
    for bad in BAD:
        try:
            fleet = fleet_plan([("h1", data(bad))], ["h1"])
        except FleetConfigError as error:
            assert setting.name in error.field, (bad, error)
            continue
        if plain is None:
            plain = deploy_commands(fleet_plan([("h1", data(MARKER))], ["h1"]), data(MARKER))
        assert_inert(plain, deploy_commands(fleet, data(bad)), bad)


def test_values_that_reach_commands_are_refused_by_the_plan(host_data):
    """The settings whose values are put into shell commands on hosts refuse every bad value."""
    for name in ("vllm_install_dir", "vllm_data_dir", "vllm_user", "vllm_python", "vllm_model_id",
                 "vllm_model_revision", "vllm_served_model_name", "nvidia_repo_url", "nvidia_repo_key",
                 "nvidia_repo_key_fingerprint", "grafana_repo_url", "grafana_repo_suite", "grafana_repo_key",
                 "grafana_repo_key_fingerprint", "grafana_version", "grafana_listen_address", "grafana_admin_user",
                 "cache_dir", "vllm_hf_endpoint"):
        for bad in BAD:
            with pytest.raises(FleetConfigError) as err:
                plan_fleet([("h1", host_data(**{name: bad}))], ["h1"])
            assert f"`{name}`" in err.value.field, (name, bad)


@pytest.mark.parametrize("name, template, value", [
    ("vllm_install_dir", "/srv/{}", "a b;$(touch /tmp/pwned)`id`'\"&|<x>"),
    ("vllm_data_dir", "/srv/{}", "a b;$(touch /tmp/pwned)`id`'\"&|<x>"),
    ("vllm_user", "{}", "svc ;$(id)`id`'\"&"),
])
def test_commands_quote_what_the_plan_would_refuse(host_data, name, template, value):
    """The plan is bypassed: a host plan whose settings no inventory could give."""
    fleet = fleet_plan([("h1", host_data())], ["h1"])

    def commands_with(text):
        host = fleet.hosts[0]
        odd = dataclasses.replace(fleet, hosts=(dataclasses.replace(host, data={**host.data, name: text}),))
        return deploy_commands(odd, host_data())

    assert_inert(commands_with(template.format(MARKER)), commands_with(template.format(value)), value)


def test_hub_model_id_and_revision_reach_the_download_as_arguments(host_data):
    """A hub model's id goes into the cache's download (its URL) and into the folder names on the
    cache and the hosts: quoted data in every command, whatever the id holds."""
    data = host_data(vllm_model_path=None, vllm_model_id="acme/chat-7b", vllm_model_revision="0" * 40,
                     vllm_model_config=str(TINY_CONFIG), vllm_hf_endpoint="https://hub.example.internal")
    fleet = fleet_plan([("h1", data)], ["h1"])

    def with_model(model_id, revision):
        host = fleet.hosts[0]
        model = dataclasses.replace(host.model, model_id=model_id, revision=revision)
        return dataclasses.replace(fleet, hosts=(dataclasses.replace(host, model=model),))

    published = (ArtifactFile("config.json", 10, git_sha1="1" * 40),)
    with mock.patch("roles.artifact_sources.snapshot_files", return_value=published):
        plain = deploy_commands(with_model(f"acme/{MARKER}", "0" * 40), data)
        odd = deploy_commands(with_model("acme/x'); import os; os.system('id'); ('$(id)", "0" * 40), data)
    assert_inert(plain, odd, "x'); import os; os.system('id'); ('$(id)")
    download = next(c for c in odd if "/resolve/" in c)
    assert shlex.split(download)[4] == \
        f"https://hub.example.internal/acme/x'); import os; os.system('id'); ('$(id)/resolve/{'0' * 40}/"