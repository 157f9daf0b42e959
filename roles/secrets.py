"""The fleet's secrets, kept on the control node in ``nginx_secrets_dir``: the clients file, the
keys the deploy generates (``internal.key``: nginx to the instances; ``smoke.key``: the deploy's
smoke test at the edge; ``grafana-admin.password`` and ``grafana-secret.key``: Grafana's
administrator and the key it signs and encrypts with), the fleet CA and the edge certificates it
issues.

Everything is written privately, folders 0700 and files created 0600 (never written, then
chmod-ed), and atomically: a temporary file in the same folder, then a rename. Nothing is
rewritten unless it is missing or due, so a second deploy changes nothing on any host.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from roles.common import did_you_mean
from roles.errors import FleetConfigError
from roles.plan import edge
from roles.plan.edge import ClientEntry, Secret

CA_DIR = "ca"
CA_FILE = "fleet-ca.pem"
CA_KEY_FILE = "fleet-ca.key"
TLS_DIR = "tls"
CA_VALIDITY = timedelta(days=3652)
# 397 days: the longest validity browsers and TLS libraries accept for a server certificate.
EDGE_VALIDITY = timedelta(days=397)
RENEW_BEFORE = timedelta(days=30)
# A certificate is valid from a little before it is issued: a host's clock may lag the control node's.
CLOCK_SKEW = timedelta(hours=1)
FLEET_KEY_NAME = re.compile(r"[a-z][a-z0-9-]*")
GRAFANA_ADMIN_PASSWORD_FILE = "grafana-admin.password"
# Key prefixes shorter than this could name a key by accident (every generated key starts "vf-").
MIN_KEY_PREFIX = 8


def new_key() -> str:
    """A fresh client key: 256 random bits, URL-safe (it goes into a header and nginx's config)."""
    return "vf-" + secrets.token_urlsafe(32)


# ---- private files ------------------------------------------------------------------------------

def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner may enter (its parents are ordinary folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def write_private(path: Path, data: bytes, mode: int = 0o600, replace: bool = True) -> bool:
    """Write ``path`` atomically, created with ``mode`` (0600: only its owner reads it). With
    ``replace=False`` an existing file is kept (another deploy may have just written it):
    False then, True when written."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)  # before any byte is written
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if it exists: never two different secrets under one name
            return True
        except FileExistsError:
            return False
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def read_secret_file(path: Path) -> Secret:
    """An operator's secret file (e.g. nginx_tls_key), read as text."""
    try:
        return Secret(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        problem = error.strerror if isinstance(error, OSError) else "it is not text"
        raise FleetConfigError(str(path), f"cannot be read: {problem}.",
                               "give a PEM file readable by the user who runs the deploy.") from None


# ---- keys the deploy generates ------------------------------------------------------------------

def _generated(path: Path, fix: str) -> Secret:
    """The one key in ``path``, a new one (``new_key``) written there first when it is missing;
    ``fix``: what to do when the file holds something else."""
    if not path.exists():
        write_private(path, f"{new_key()}\n".encode(), replace=False)
    edge.check_private(str(path), path)
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < edge.MIN_KEY_LENGTH or len(key) > edge.MAX_KEY_LENGTH or not edge.KEY_CHARS.fullmatch(key):
        raise FleetConfigError(str(path), "does not hold one key as vllm-fleet writes it.", fix)
    return Secret(key)


def fleet_key(secrets_dir: Path, name: str) -> Secret:
    """``<secrets_dir>/<name>.key``, generated on first use: "internal" (nginx sends it to the
    instances), "smoke" (the deploy's smoke test sends it to the edge) and "grafana-secret"
    (Grafana signs and encrypts with it: its packaged default is public)."""
    if not FLEET_KEY_NAME.fullmatch(name):
        raise ValueError(f"not a fleet key name: {name!r}")
    path = Path(secrets_dir) / f"{name}.key"
    return _generated(path, f"remove {path}: the next deploy writes a new one and gives it to every host.")


def grafana_admin_password(secrets_dir: Path) -> Secret:
    """``<secrets_dir>/grafana-admin.password``, generated on first use: the password of
    Grafana's administrator (grafana_admin_user)."""
    path = Path(secrets_dir) / GRAFANA_ADMIN_PASSWORD_FILE
    # Grafana takes admin_password only when it creates its administrator, on its first start.
    return _generated(path, f"write the administrator's current password into {path} (0600), or a new one that "
                            "you also give Grafana: `grafana cli admin reset-admin-password --password-from-stdin`.")


# ---- the fleet CA and the edge certificates -----------------------------------------------------

def ca_certificate(secrets_dir: Path) -> Path:
    """The fleet CA's certificate, which clients trust (curl --cacert, the OpenAI SDK's http client)."""
    return Path(secrets_dir) / CA_DIR / CA_FILE


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vllm-fleet CA")])
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def fleet_ca(secrets_dir: Path, now: datetime | None = None) -> tuple[Path, Path]:
    """The fleet CA's certificate and key, ``ca/fleet-ca.pem`` (public) and ``ca/fleet-ca.key``,
    made once."""
    cert_path, key_path = ca_certificate(secrets_dir), Path(secrets_dir) / CA_DIR / CA_KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    if cert_path.exists():
        raise FleetConfigError(str(key_path), "is missing: the fleet CA can issue no certificate without it.",
                               f"restore it from a backup; or remove {cert_path.parent} to make a new CA (clients "
                               "must then trust the new fleet-ca.pem).")
    # The key first: a deploy stopped in between leaves a key to finish the CA with, never a lone certificate.
    write_private(key_path, _pem_key(ec.generate_private_key(ec.SECP256R1())), replace=False)
    key = edge.load_private_key(str(key_path), key_path)
    write_private(cert_path, _ca_certificate(key, now or datetime.now(UTC)).public_bytes(
        serialization.Encoding.PEM), mode=0o644, replace=False)
    return cert_path, key_path


def _general_names(names: list[str]) -> list[x509.GeneralName]:
    def general_name(name: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            return x509.DNSName(name.lower().rstrip("."))
    return [general_name(name) for name in names]


def _subject(names: list[str]) -> x509.Name:
    # X.509 caps a common name at 64 characters; clients read the subjectAltName anyway.
    first = names[0].lower().rstrip(".")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)] if len(first) <= 64 else [])


def _issue(ca_cert: x509.Certificate, ca_key, key: ec.EllipticCurvePrivateKey, names: list[str],
           now: datetime) -> x509.Certificate:
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder().subject_name(_subject(names)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + EDGE_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _still_good(pem_path: Path, key_path: Path, ca_cert: x509.Certificate, names: list[str],
                now: datetime) -> bool:
    """Whether the kept certificate may be served again: the current CA's, for exactly ``names``,
    with its key, valid now and for more than RENEW_BEFORE."""
    try:
        chain = x509.load_pem_x509_certificates(pem_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        chain[0].verify_directly_issued_by(ca_cert)
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, IndexError, UnsupportedAlgorithm, InvalidSignature,
            x509.ExtensionNotFound):
        return False
    leaf = chain[0]
    return (chain[1:] == [ca_cert]
            and edge.public_key_bytes(key.public_key()) == edge.public_key_bytes(leaf.public_key())
            and leaf.subject == _subject(names) and set(san) == set(_general_names(names))
            and leaf.not_valid_before_utc <= now and leaf.not_valid_after_utc - now > RENEW_BEFORE)


def edge_certificate(secrets_dir: Path, host_name: str, names: list[str],
                     now: datetime | None = None) -> tuple[bytes, Secret]:
    """The PEM certificate (the load balancer's, then the fleet CA's) and PEM key for one load
    balancer, kept in ``tls/<host>.pem|.key``: the kept pair while it is still good, else a new
    one issued by the fleet CA for ``names`` (the first is also the CN)."""
    if not names:
        raise ValueError("an edge certificate needs at least one name")
    now = now or datetime.now(UTC)
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    ca_path, ca_key_path = fleet_ca(secrets_dir, now)
    ca_cert = edge.load_certificates(str(ca_path), ca_path)[0]
    # pyinfra host names may hold '/' or '@' (@docker/ubuntu): the file name keeps a safe spelling.
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", host_name).lstrip(".") or "_"
    pem_path, key_path = Path(secrets_dir) / TLS_DIR / f"{stem}.pem", Path(secrets_dir) / TLS_DIR / f"{stem}.key"
    if _still_good(pem_path, key_path, ca_cert, names, now):
        return pem_path.read_bytes(), Secret(key_path.read_text(encoding="ascii"))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _issue(ca_cert, edge.load_private_key(str(ca_key_path), ca_key_path), key, names, now)
    pem = leaf.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    write_private(key_path, _pem_key(key))
    write_private(pem_path, pem)
    return pem, Secret(_pem_key(key).decode("ascii"))


# ---- the clients file (`vllm-fleet keys`) -------------------------------------------------------

def clients_file(secrets_dir: Path) -> Path:
    return Path(secrets_dir) / edge.CLIENTS_FILE


def load_clients(secrets_dir: Path, missing_ok: bool = False) -> dict[str, ClientEntry]:
    """The clients file's clients, checked by the edge's reader; none when it is missing and
    ``missing_ok`` (the folder, where it exists, must still be private)."""
    secrets_dir = Path(secrets_dir)
    if clients_file(secrets_dir).is_file():
        return edge.read_clients(secrets_dir)
    if not missing_ok:
        problem = f"holds no {edge.CLIENTS_FILE}." if secrets_dir.exists() else "does not exist."
        raise FleetConfigError(str(secrets_dir), problem,
                               f"add a client first: `vllm-fleet keys add {secrets_dir} NAME`.")
    if secrets_dir.exists():
        edge.check_private(str(secrets_dir), secrets_dir)
    return {}


def write_clients(secrets_dir: Path, entries: dict[str, ClientEntry]) -> None:
    """Rewrite the clients file (atomically, 0600) with every client's keys and limits."""
    private_dir(Path(secrets_dir))
    write_private(clients_file(secrets_dir), edge.clients_toml(entries.values()).encode())


def client(secrets_dir: Path, entries: dict[str, ClientEntry], name: str) -> ClientEntry:
    """The client ``name``, refused with the closest name when there is none."""
    if name not in entries:
        known = ", ".join(entries) or "none"
        raise FleetConfigError(f"{clients_file(secrets_dir)}: client {name}", "does not exist.",
                               did_you_mean(name, list(entries)) or f"the clients are: {known} "
                               f"(`vllm-fleet keys list {secrets_dir}`).")
    return entries[name]


def add_client_key(secrets_dir: Path, name: str) -> tuple[Secret, ClientEntry]:
    """A new key for client ``name`` (a new client, or a second key: step 1 of a rotation)."""
    edge.check_client_name("`vllm-fleet keys add` NAME", name)
    entries = load_clients(secrets_dir, missing_ok=True)
    key = Secret(new_key())
    old = entries.get(name, ClientEntry(name, ()))
    entries[name] = ClientEntry(name, (*old.keys, key), old.limits)
    write_clients(secrets_dir, entries)
    return key, entries[name]


def remove_client(secrets_dir: Path, name: str) -> int:
    """Remove client ``name``; the number of clients left."""
    entries = load_clients(secrets_dir)
    client(secrets_dir, entries, name)
    del entries[name]
    write_clients(secrets_dir, entries)
    return len(entries)


def remove_client_key(secrets_dir: Path, name: str, prefix: str) -> ClientEntry:
    """Client ``name`` without the one key starting with ``prefix`` (step 2 of a rotation)."""
    entries = load_clients(secrets_dir)
    entry = client(secrets_dir, entries, name)
    field = f"{clients_file(secrets_dir)}: client {name}"
    if len(prefix) < MIN_KEY_PREFIX:
        raise FleetConfigError("`vllm-fleet keys remove --key-prefix`",
                               f"is {len(prefix)} characters long: too short to name one key for sure.",
                               f"give the first {MIN_KEY_PREFIX} or more characters of the key to remove.")
    matching = [key for key in entry.keys if key.reveal().startswith(prefix)]
    if len(matching) != 1:
        raise FleetConfigError(field, f"{len(matching) or 'none'} of its keys start with the given prefix.",
                               "give a prefix of exactly one of its keys (`vllm-fleet keys list` shows how each "
                               "starts).")
    if len(entry.keys) == 1:
        raise FleetConfigError(field, "that is the client's only key: a client without keys could never get in.",
                               f"remove the client instead: `vllm-fleet keys remove {secrets_dir} {name}`.")
    entries[name] = ClientEntry(name, tuple(key for key in entry.keys if key != matching[0]), entry.limits)
    write_clients(secrets_dir, entries)
    return entries[name]
