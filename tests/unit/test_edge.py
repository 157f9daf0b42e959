"""The edge's inputs (roles.plan.edge) and the secrets the control node generates for it
(roles.secrets): every refusal names the field, the problem and the fix and never holds a key;
certificates are checked before a host is touched; generated files are private and reused."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from roles import secrets
from roles.errors import FleetConfigError
from roles.plan import edge
from roles.plan.edge import Secret

NOW = datetime(2030, 6, 1, tzinfo=UTC)
KEY_A = "vf-" + "a" * 40
KEY_B = "vf-" + "b" * 40
LB = "lb1"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_file(path: Path, text: str | bytes, file_mode: int = 0o600) -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(file_mode)
    return path


def clients_dir(tmp_path: Path, toml: str) -> Path:
    directory = tmp_path / "secrets"
    private_file(directory / edge.CLIENTS_FILE, toml)
    return directory


def lb_data(**overrides) -> dict:
    data = {"nginx_secrets_dir": "secrets", "ssh_hostname": "edge.example.com"}
    data.update(overrides)
    return data


def message(error: pytest.ExceptionInfo) -> str:
    e = error.value
    return f"{e.field} {e.problem} {e.fix} {e}"


# ---- clients and limits -------------------------------------------------------------------------

def test_clients_get_their_own_limits_or_the_settings(tmp_path):
    clients_dir(tmp_path, f'[clients.alice]\nkeys = ["{KEY_A}", "{KEY_B}"]\nrate = 5\n\n'
                          f'[clients."bob.ci"]\nkeys = ["{KEY_A.upper()}"]\nconcurrency = 2\nburst = 0\n')
    plan = edge.plan_edge(LB, lb_data(nginx_client_burst=7), tmp_path, NOW)
    alice, bob = plan.clients
    assert (alice.name, alice.rate, alice.burst, alice.concurrency) == ("alice", 5, 7, 16)
    assert [k.reveal() for k in alice.keys] == [KEY_A, KEY_B]
    assert (bob.name, bob.rate, bob.burst, bob.concurrency) == ("bob.ci", 10, 0, 2)
    assert plan.secrets_dir == (tmp_path / "secrets").resolve()
    assert plan.clients_file == plan.secrets_dir / "clients.toml"
    assert (plan.certificate, plan.key, plan.server_name) == (None, None, "edge.example.com")


def test_a_secret_never_shows_in_a_repr(tmp_path):
    clients_dir(tmp_path, f'[clients.alice]\nkeys = ["{KEY_A}"]\n')
    plan = edge.plan_edge(LB, lb_data(), tmp_path, NOW)
    secret = plan.clients[0].keys[0]
    for text in (repr(plan), str(plan), repr(plan.clients), f"{secret}", str(secret), repr(secret)):
        assert KEY_A not in text and "a" * 20 not in text, text
    assert repr(secret) == "Secret(…)" and secret.reveal() == KEY_A
    assert secret == Secret(KEY_A) and secret != Secret(KEY_B)


def test_the_clients_file_round_trips(tmp_path):
    entries = [edge.ClientEntry("alice", (Secret(KEY_A), Secret(KEY_B)), (("rate", 5), ("burst", 0))),
               edge.ClientEntry("bob.ci", (Secret(KEY_A.upper()),))]
    directory = clients_dir(tmp_path, edge.clients_toml(entries))
    text = (directory / "clients.toml").read_text()
    assert text.startswith("# vllm-fleet clients: never commit this file.")
    assert edge.read_clients(directory) == {e.name: e for e in entries}


def bad_key(key: str) -> str:
    return f'[clients.alice]\nkeys = ["{KEY_A}", "{key}"]\n'


# name: (clients.toml, data overrides, field has, problem has, fix has, a key that must not show)
CLIENT_REFUSALS = {
    "not TOML": ('[clients.alice]\nkeys = ["' + KEY_A + '"]\nrate = = 5\n', {}, "clients.toml: line 3",
                 "is not valid TOML", "correct the file", KEY_A),
    "an unclosed list": ('[clients.alice]\nkeys = ["' + KEY_A + '"\n', {}, "clients.toml", "Unclosed array",
                         "correct the file", KEY_A),
    "a control character in a key": ('[clients.alice]\nkeys = ["' + KEY_A + '\x01"]\n', {}, "line 2",
                                     "Illegal character", "correct the file", "x01"),
    "no clients": ("# nobody yet\n", {}, "host lb1: `nginx_secrets_dir`", "holds no client",
                   "vllm-fleet keys add", None),
    "a misspelt table": (f'[client.alice]\nkeys = ["{KEY_A}"]\n', {}, "`client`", "is not part of the clients file",
                         "did you mean `clients`?", KEY_A),
    "a bad client name": (f'[clients.Alice]\nkeys = ["{KEY_A}"]\n', {}, "[clients.Alice]", "is not a client name",
                          "lower-case letters", KEY_A),
    "a client name with a space": (f'[clients."a b"]\nkeys = ["{KEY_A}"]\n', {}, "[clients.a b]",
                                   "nginx configuration", "lower-case letters", KEY_A),
    "an unknown client key": (f'[clients.alice]\nkeys = ["{KEY_A}"]\nrat = 5\n', {}, "client alice: `rat`",
                              "is not a client setting", "did you mean `rate`?", KEY_A),
    "keys missing": ("[clients.alice]\nrate = 5\n", {}, "client alice: `keys`", "is missing", "vllm-fleet keys new",
                     None),
    "keys empty": ("[clients.alice]\nkeys = []\n", {}, "client alice: `keys`", "could never get in",
                   "vllm-fleet keys new", None),
    "keys not a list": (f'[clients.alice]\nkeys = "{KEY_A}"\n', {}, "client alice: `keys`", "is not a list of keys",
                        'keys = ["KEY"]', KEY_A),
    "a key not a string": (f'[clients.alice]\nkeys = ["{KEY_A}", 12345678]\n', {}, "client alice: keys[1]",
                           "is not a string", "keys = [", KEY_A),
    "a short key": (bad_key("hunter2-hunter2-hunter2-hunter2"), {}, "client alice: keys[1]",
                    "a key shorter than 32 characters can be guessed", "`vllm-fleet keys new` makes one",
                    "hunter2-hunter2-hunter2-hunter2"),
    "a long key": (bad_key("k" * 257), {}, "client alice: keys[1]", "longer than 256", "vllm-fleet keys new",
                   "k" * 257),
    "a key with a quote": (bad_key("vf-" + "c" * 40 + "';"), {}, "client alice: keys[1]", "HTTP header",
                           "vllm-fleet keys new", "c" * 40),
    "a key with a space": (bad_key("vf-" + "d" * 20 + " " + "d" * 20), {}, "client alice: keys[1]",
                           "nginx configuration", "vllm-fleet keys new", "d" * 20),
    "a key twice in one client": (bad_key(KEY_A), {}, "client alice: keys[1]", "client alice's keys[0]",
                                  "vllm-fleet keys add", KEY_A),
    "two clients sharing a key": (f'[clients.alice]\nkeys = ["{KEY_A}"]\n[clients.bob]\nkeys = ["{KEY_B}", "{KEY_A}"]\n',
                                  {}, "client bob: keys[1]", "client alice's keys[0]", "vllm-fleet keys add", KEY_A),
    "rate zero": (f'[clients.alice]\nkeys = ["{KEY_A}"]\nrate = 0\n', {}, "client alice: `rate`",
                  "at least 1", "`nginx_client_rate` (default 10)", KEY_A),
    "burst negative": (f'[clients.alice]\nkeys = ["{KEY_A}"]\nburst = -1\n', {}, "client alice: `burst`",
                       "at least 0", "`nginx_client_burst` (default 20)", KEY_A),
    "concurrency a string": (f'[clients.alice]\nkeys = ["{KEY_A}"]\nconcurrency = "4"\n', {},
                             "client alice: `concurrency`", "'4' is not a whole number",
                             "`nginx_client_concurrency` (default 16)", KEY_A),
    "rate a boolean": (f'[clients.alice]\nkeys = ["{KEY_A}"]\nrate = true\n', {}, "client alice: `rate`",
                       "True is not a whole number", "nginx_client_rate", KEY_A),
    "rate a float": (f'[clients.alice]\nkeys = ["{KEY_A}"]\nrate = 2.5\n', {}, "client alice: `rate`",
                     "2.5 is not a whole number", "nginx_client_rate", KEY_A),
    "a certificate without its key": (f'[clients.alice]\nkeys = ["{KEY_A}"]\n', {"nginx_tls_certificate": "c.pem"},
                                      "host lb1: `nginx_tls_certificate`", "`nginx_tls_key` is not",
                                      "set `nginx_tls_key` as well, or neither", KEY_A),
    "a key without its certificate": (f'[clients.alice]\nkeys = ["{KEY_A}"]\n', {"nginx_tls_key": "k.pem"},
                                      "host lb1: `nginx_tls_key`", "`nginx_tls_certificate` is not",
                                      "fleet's CA", KEY_A),
}


@pytest.mark.parametrize("case", CLIENT_REFUSALS)
def test_a_bad_clients_file_is_refused(tmp_path, case):
    toml, overrides, field, problem, fix, key = CLIENT_REFUSALS[case]
    clients_dir(tmp_path, toml)
    with pytest.raises(FleetConfigError) as error:
        edge.plan_edge(LB, lb_data(**overrides), tmp_path, NOW)
    assert field in error.value.field and problem in error.value.problem and fix in error.value.fix, message(error)
    if key is not None:
        assert key not in message(error), message(error)


def test_an_unset_secrets_dir_is_refused(tmp_path):
    with pytest.raises(FleetConfigError) as error:
        edge.plan_edge(LB, lb_data(nginx_secrets_dir=None), tmp_path, NOW)
    assert error.value.field == "host lb1: `nginx_secrets_dir`" and "is unset" in error.value.problem
    assert "outside git" in error.value.fix and "inventories/secrets/prod" in error.value.fix
    assert "vllm-fleet keys add" in error.value.fix


@pytest.mark.parametrize("folder_exists", [True, False])
def test_a_missing_clients_file_is_refused(tmp_path, folder_exists):
    if folder_exists:
        (tmp_path / "secrets").mkdir(mode=0o700)
    with pytest.raises(FleetConfigError) as error:
        edge.plan_edge(LB, lb_data(), tmp_path, NOW)
    folder = (tmp_path / "secrets").resolve()
    assert error.value.field == "host lb1: `nginx_secrets_dir`"
    assert f"{folder}/clients.toml does not exist" in error.value.problem
    assert f"vllm-fleet keys add {folder} NAME" in error.value.fix


@pytest.mark.parametrize("which, loose, wanted", [("file", 0o640, "chmod 600"), ("file", 0o602, "chmod 600"),
                                                  ("folder", 0o750, "chmod 700"), ("folder", 0o755, "chmod 700")])
def test_secrets_others_can_read_are_refused(tmp_path, which, loose, wanted):
    directory = clients_dir(tmp_path, f'[clients.alice]\nkeys = ["{KEY_A}"]\n')
    path = directory / "clients.toml" if which == "file" else directory
    path.chmod(loose)
    with pytest.raises(FleetConfigError) as error:
        edge.plan_edge(LB, lb_data(), tmp_path, NOW)
    assert f"mode {loose:04o}" in error.value.problem and f"`{wanted} {path.resolve()}`" in error.value.fix
    assert KEY_A not in message(error)


# ---- operator certificates ----------------------------------------------------------------------

def certificate(tmp_path: Path, names: list[str], *, valid_from: datetime = NOW - timedelta(days=10),
                valid_to: datetime = NOW + timedelta(days=80), key=None, stem: str = "edge") -> tuple[Path, Path]:
    """A self-signed certificate for ``names`` and its key (or another ``key``), as PEM files."""
    own = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(__import__("ipaddress").ip_address(n)) if n[0].isdigit() else x509.DNSName(n)
            for n in names]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator")])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(own.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_to))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(own, hashes.SHA256())
    key_pem = (key or own).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    return (private_file(tmp_path / "tls" / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644),
            private_file(tmp_path / "tls" / f"{stem}.key", key_pem))


def with_certificate(tmp_path: Path, cert: Path, key: Path, **overrides) -> dict:
    clients_dir(tmp_path, f'[clients.alice]\nkeys = ["{KEY_A}"]\n')
    return lb_data(nginx_tls_certificate=str(cert.relative_to(tmp_path)), nginx_tls_key=str(key), **overrides)


@pytest.mark.parametrize("names, server", [(["edge.example.com"], "edge.example.com"),
                                           (["other.example.com", "EDGE.example.com"], "edge.example.com."),
                                           (["*.example.com"], "edge.example.com"),
                                           (["10.9.0.11"], "10.9.0.11"),
                                           (["2001:db8::1"], "2001:db8:0::1")])
def test_a_good_operator_certificate_is_planned(tmp_path, names, server):
    cert, key = certificate(tmp_path, names)
    plan = edge.plan_edge(LB, with_certificate(tmp_path, cert, key, nginx_server_name=server), tmp_path, NOW)
    assert (plan.certificate, plan.key, plan.server_name) == (cert.resolve(), key.resolve(), server)


@pytest.mark.parametrize("names, server", [(["*.example.com"], "a.b.example.com"), (["*.example.com"], "example.com"),
                                           (["*.com"], "example.com"), (["10.9.0.11"], "10.9.0.12"),
                                           (["edge.example.com"], "10.9.0.11"), (["10.9.0.11"], "edge.example.com"),
                                           (["edge.example.com"], "edge.example.org")])
def test_a_certificate_covers_only_its_names(tmp_path, names, server):
    cert, _ = certificate(tmp_path, names)
    assert not edge.covers(edge.load_certificates("f", cert)[0], server)


def certificate_case(tmp_path: Path, case: str) -> tuple[Path, Path]:
    if case == "expired":
        return certificate(tmp_path, ["edge.example.com"], valid_from=NOW - timedelta(days=400),
                           valid_to=datetime(2030, 5, 1, 12, 0, tzinfo=UTC))
    if case == "not yet valid":
        return certificate(tmp_path, ["edge.example.com"], valid_from=datetime(2030, 7, 1, tzinfo=UTC),
                           valid_to=NOW + timedelta(days=400))
    if case == "another key":
        return certificate(tmp_path, ["edge.example.com"], key=ec.generate_private_key(ec.SECP256R1()))
    if case == "wrong name":
        return certificate(tmp_path, ["api.example.com", "10.1.2.3"])
    if case == "no names":
        return certificate(tmp_path, [])
    cert, key = certificate(tmp_path, ["edge.example.com"])
    if case == "not PEM":
        cert.write_text("not a certificate\n")
    elif case == "missing":
        cert.unlink()
    elif case == "key missing":
        key.unlink()
    elif case == "key not PEM":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    elif case == "key readable by others":
        key.chmod(0o644)
    elif case == "key encrypted":
        loaded = serialization.load_pem_private_key(key.read_bytes(), None)
        key.write_bytes(loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.BestAvailableEncryption(b"pass")))
    return cert, key


# case: (the setting named, problem has, fix has)
CERTIFICATE_REFUSALS = {
    "expired": ("nginx_tls_certificate", "expired on 2030-05-01 12:00 UTC", "renew it"),
    "not yet valid": ("nginx_tls_certificate", "valid only from 2030-07-01", "clock"),
    "another key": ("nginx_tls_key", "is not the key of", "server's certificate first"),
    "wrong name": ("nginx_tls_certificate", "does not cover 'edge.example.com'", "it covers api.example.com, 10.1.2.3"),
    "no names": ("nginx_tls_certificate", "does not cover", "no subjectAltName"),
    "not PEM": ("nginx_tls_certificate", "holds no PEM certificate", "-----BEGIN CERTIFICATE-----"),
    "missing": ("nginx_tls_certificate", "cannot be read", "on the control node"),
    "key missing": ("nginx_tls_key", "cannot be read", "readable by the user who runs the deploy"),
    "key not PEM": ("nginx_tls_key", "holds no PEM private key", "-----BEGIN PRIVATE KEY-----"),
    "key readable by others": ("nginx_tls_key", "mode 0644", "chmod 600"),
    "key encrypted": ("nginx_tls_key", "is encrypted", "openssl pkey"),
}


@pytest.mark.parametrize("case", CERTIFICATE_REFUSALS)
def test_a_bad_operator_certificate_is_refused(tmp_path, case):
    setting, problem, fix = CERTIFICATE_REFUSALS[case]
    cert, key = certificate_case(tmp_path, case)
    with pytest.raises(FleetConfigError) as error:
        edge.plan_edge(LB, with_certificate(tmp_path, cert, key), tmp_path, NOW)
    assert error.value.field == f"host lb1: `{setting}`", message(error)
    assert problem in error.value.problem and fix in error.value.fix, message(error)
    assert "PRIVATE KEY-----\nM" not in message(error)


def test_server_name_is_the_setting_else_the_address():
    assert edge.server_name(LB, {"nginx_server_name": "api.example.com", "ssh_hostname": "10.0.0.1"}) \
        == "api.example.com"
    assert edge.server_name(LB, {"ssh_hostname": "10.0.0.1"}) == "10.0.0.1"
    assert edge.server_name(LB, {"vllm_advertise_address": "lb.internal", "ssh_hostname": "10.0.0.1"}) == "lb.internal"
    assert edge.server_name(LB, {}) == LB


# ---- the fleet's load balancers -----------------------------------------------------------------

def test_load_balancers_share_one_secrets_folder(tmp_path):
    clients_dir(tmp_path, f'[clients.alice]\nkeys = ["{KEY_A}"]\n')
    plans = dict(edge.plan_fleet_edge([("lb1", lb_data()),
                                       ("lb2", lb_data(nginx_secrets_dir=str(tmp_path / "secrets"), nginx_client_rate=3,
                                                       nginx_server_name=None, ssh_hostname="lb2.example.com"))],
                                      tmp_path, NOW))
    assert plans["lb1"].server_name == "edge.example.com" and [c.name for c in plans["lb1"].clients] == ["alice"]
    # One folder, one set of clients; each load balancer its own name and limits.
    assert plans["lb2"].server_name == "lb2.example.com" and plans["lb2"].secrets_dir == plans["lb1"].secrets_dir
    assert [c.rate for c in plans["lb2"].clients] == [3] and [c.rate for c in plans["lb1"].clients] == [10]
    with pytest.raises(FleetConfigError) as error:
        edge.plan_fleet_edge([("lb1", lb_data()), ("lb2", lb_data(nginx_secrets_dir="other"))], tmp_path, NOW)
    assert error.value.field == "host lb2: `nginx_secrets_dir`" and "host lb1's is" in error.value.problem
    assert "group data" in error.value.fix


def test_each_load_balancer_certificate_is_checked_against_its_own_name(tmp_path):
    cert, key = certificate(tmp_path, ["lb1.example.com"])
    data = with_certificate(tmp_path, cert, key)
    lb1 = {**data, "nginx_server_name": "lb1.example.com"}
    assert dict(edge.plan_fleet_edge([("lb1", lb1)], tmp_path, NOW))["lb1"].certificate == cert.resolve()
    with pytest.raises(FleetConfigError) as error:
        edge.plan_fleet_edge([("lb1", lb1), ("lb2", {**data, "nginx_server_name": "lb2.example.com"})],
                             tmp_path, NOW)
    assert error.value.field == "host lb2: `nginx_tls_certificate`" and "'lb2.example.com'" in error.value.problem


# ---- what the control node generates ------------------------------------------------------------

def test_new_keys_are_long_random_and_accepted_at_the_edge(tmp_path):
    keys = {secrets.new_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert key.startswith("vf-") and len(key) == 46 and edge.KEY_CHARS.fullmatch(key)
    clients_dir(tmp_path, edge.clients_toml([edge.ClientEntry("c", tuple(map(Secret, keys)))]))
    assert len(edge.plan_edge(LB, lb_data(), tmp_path, NOW).clients[0].keys) == 20


def test_fleet_keys_are_generated_once_and_private(tmp_path):
    old_umask = os.umask(0)  # files are created private whatever the umask
    try:
        internal = secrets.fleet_key(tmp_path / "s", "internal")
    finally:
        os.umask(old_umask)
    path = tmp_path / "s" / "internal.key"
    assert mode(path) == 0o600 and mode(tmp_path / "s") == 0o700
    assert path.read_text() == internal.reveal() + "\n" and len(internal.reveal()) == 46
    assert secrets.fleet_key(tmp_path / "s", "internal") == internal
    assert secrets.fleet_key(tmp_path / "s", "smoke") != internal
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["internal.key", "smoke.key"]  # no temporary file
    path.write_text("short\n")
    with pytest.raises(FleetConfigError) as error:
        secrets.fleet_key(tmp_path / "s", "internal")
    assert error.value.field == str(path) and "remove" in error.value.fix and "short" not in message(error)


def test_grafanas_admin_password_is_generated_once_and_private(tmp_path):
    password = secrets.grafana_admin_password(tmp_path / "s")
    path = tmp_path / "s" / "grafana-admin.password"
    assert mode(path) == 0o600 and path.read_text() == password.reveal() + "\n" and len(password.reveal()) == 46
    assert password.reveal() not in repr(password)
    assert secrets.grafana_admin_password(tmp_path / "s") == password
    assert secrets.fleet_key(tmp_path / "s", "grafana-secret") != password
    path.chmod(0o640)
    with pytest.raises(FleetConfigError) as error:
        secrets.grafana_admin_password(tmp_path / "s")
    assert error.value.field == str(path) and password.reveal() not in message(error)
    path.chmod(0o600)
    path.write_text("admin\n")
    with pytest.raises(FleetConfigError) as error:
        secrets.grafana_admin_password(tmp_path / "s")
    # Grafana keeps the password it was created with: the fix says how to give it a new one.
    assert "reset-admin-password --password-from-stdin" in error.value.fix


def test_read_secret_file(tmp_path):
    path = private_file(tmp_path / "k.pem", "PEM DATA")
    assert secrets.read_secret_file(path).reveal() == "PEM DATA" and "PEM" not in repr(secrets.read_secret_file(path))
    with pytest.raises(FleetConfigError, match="cannot be read"):
        secrets.read_secret_file(tmp_path / "nope.pem")


def test_the_fleet_ca_is_made_once(tmp_path):
    cert_path, key_path = secrets.fleet_ca(tmp_path / "s", NOW)
    assert cert_path == secrets.ca_certificate(tmp_path / "s") == tmp_path / "s" / "ca" / "fleet-ca.pem"
    assert mode(key_path) == 0o600 and mode(cert_path) & 0o077 in (0o044, 0o000) and mode(cert_path.parent) == 0o700
    ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert ca.subject.rfc4514_string() == "CN=vllm-fleet CA" and ca.issuer == ca.subject
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical and constraints.value.ca and usage.key_cert_sign and usage.crl_sign
    assert ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ca.not_valid_after_utc - NOW > timedelta(days=3650) and isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    before = (cert_path.read_bytes(), key_path.read_bytes())
    assert secrets.fleet_ca(tmp_path / "s", NOW + timedelta(days=1)) == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_an_edge_certificate_is_issued_by_the_fleet_ca(tmp_path):
    pem, key = secrets.edge_certificate(tmp_path / "s", "lb1", ["edge.example.com", "10.9.0.11"], NOW)
    leaf, ca = x509.load_pem_x509_certificates(pem)
    assert ca.public_bytes(serialization.Encoding.PEM) == secrets.ca_certificate(tmp_path / "s").read_bytes()
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject.rfc4514_string() == "CN=edge.example.com"
    assert edge.covered_names(leaf) == ["edge.example.com", "10.9.0.11"]
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf.not_valid_after_utc == NOW + timedelta(days=397)
    assert "PRIVATE" not in repr(key) and key.reveal().startswith("-----BEGIN PRIVATE KEY-----")
    folder = tmp_path / "s" / "tls"
    assert mode(folder) == 0o700 and mode(folder / "lb1.pem") == 0o600 and mode(folder / "lb1.key") == 0o600
    assert (folder / "lb1.pem").read_bytes() == pem and (folder / "lb1.key").read_text() == key.reveal()
    # The operator check accepts what the fleet issues.
    edge.check_certificate("f", folder / "lb1.pem", folder / "lb1.key", "10.9.0.11", NOW)


def test_an_edge_certificate_is_reused_until_it_is_due(tmp_path):
    first = secrets.edge_certificate(tmp_path / "s", "lb1", ["edge.example.com"], NOW)
    assert secrets.edge_certificate(tmp_path / "s", "lb1", ["edge.example.com"], NOW) == first
    assert secrets.edge_certificate(tmp_path / "s", "lb1", ["edge.example.com"], NOW + timedelta(days=360)) == first
    renewed = secrets.edge_certificate(tmp_path / "s", "lb1", ["edge.example.com"], NOW + timedelta(days=368))
    assert renewed[0] != first[0] and renewed[1] != first[1]
    leaf = x509.load_pem_x509_certificates(renewed[0])[0]
    assert leaf.not_valid_after_utc == NOW + timedelta(days=368 + 397)


@pytest.mark.parametrize("change", ["names", "first name", "new CA", "lost key", "another host"])
def test_an_edge_certificate_is_reissued_when_it_no_longer_fits(tmp_path, change):
    names = ["edge.example.com", "10.9.0.11"]
    first, _ = secrets.edge_certificate(tmp_path / "s", "lb1", names, NOW)
    host = "lb1"
    if change == "names":
        names = ["edge.example.com"]
    elif change == "first name":
        names = list(reversed(names))
    elif change == "new CA":
        for path in (tmp_path / "s" / "ca").iterdir():
            path.unlink()
    elif change == "lost key":
        (tmp_path / "s" / "tls" / "lb1.key").unlink()
    else:
        host = "@docker/lb2"
    pem, _ = secrets.edge_certificate(tmp_path / "s", host, names, NOW)
    assert pem != first
    leaf, ca = x509.load_pem_x509_certificates(pem)
    leaf.verify_directly_issued_by(ca)
    assert set(edge.covered_names(leaf)) == set(names)
    if change == "another host":
        assert (tmp_path / "s" / "tls" / "_docker_lb2.pem").read_bytes() == pem
