"""The fallback provider's probe (roles/files/provider_probe.py) against a stand-in provider over
TLS on loopback: a key accepted, a key refused, a certificate no given CA issued, a model it does
not list, and a provider that is not there."""

import json
import socket

import pytest

from roles import secrets
from roles.files import provider_probe
from tests.unit.provider_stand_in import PROVIDER_KEY, PROVIDER_MODEL


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "fallback.key"
    secrets.write_private(path, f"{PROVIDER_KEY}\n".encode())
    return path


def probe(provider, key_file, ca=None, model=PROVIDER_MODEL, url=None):
    return provider_probe.probe(url or f"{provider.url}/models", str(ca or provider.ca), str(key_file), model, 5.0)


def test_an_accepted_key_and_a_listed_model(provider, key_file):
    assert probe(provider, key_file) == {"ok": True, "reachable": True, "problem": ""}


def test_a_refused_key_is_reachable_and_not_ok(provider, key_file):
    key_file.write_text("sk-wrong-key\n")
    result = probe(provider, key_file)
    assert (result["ok"], result["reachable"]) == (False, True)
    assert result["problem"] == f"the provider refused its key: HTTP 401 from {provider.url}/models"
    assert "sk-wrong-key" not in json.dumps(result)


def test_a_certificate_no_given_ca_issued(provider, key_file, tmp_path):
    other_ca, _ = secrets.fleet_ca(secrets.private_dir(tmp_path / "other"))
    result = probe(provider, key_file, ca=other_ca)
    assert (result["ok"], result["reachable"]) == (False, True)
    assert result["problem"].startswith(f"the provider's certificate is not trusted by {other_ca}")


def test_a_model_the_provider_does_not_list(provider, key_file):
    result = probe(provider, key_file, model="gpt-none")
    assert (result["ok"], result["reachable"]) == (False, True)
    assert result["problem"] == f"the provider lists no model 'gpt-none' (it lists {PROVIDER_MODEL})"


def test_a_provider_that_is_not_there(provider, key_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = probe(provider, key_file, url=f"https://localhost:{port}/v1/models")
    assert (result["ok"], result["reachable"]) == (False, False)
    assert "could not be reached" in result["problem"]


def test_the_command_line_prints_one_json_object(provider, key_file, capsys):
    assert provider_probe.main(["--models-url", f"{provider.url}/models", "--ca", str(provider.ca), "--key-file",
                                str(key_file), "--model", PROVIDER_MODEL]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
