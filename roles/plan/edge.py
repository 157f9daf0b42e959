"""The edge's clients and TLS inputs, planned on the control node before any host is touched.

The load balancer lets in only the clients of ``clients.toml`` in ``nginx_secrets_dir``: each
one a name, one or two keys (two while a key is rotated) and its own limits. Its certificate is
the operator's (``nginx_tls_certificate`` and ``nginx_tls_key``) or one the fleet's own CA issues
(``roles.secrets``). Everything that would make nginx refuse to start, let in a guessable key
or serve a certificate clients reject is refused here, and no message ever holds a key.
"""

from __future__ import annotations

import ipaddress
import re
import stat
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from roles.common import did_you_mean
from roles.errors import FleetConfigError
from roles.plan import consistency, settings

CLIENTS_FILE = "clients.toml"
CLIENTS_HEADER = ("# vllm-fleet clients: never commit this file.\n"
                  "# Written by `vllm-fleet keys`; it keeps clients, keys and limits, not other comments.\n")
# It names the client's nginx zone key and its lines in the access log.
CLIENT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}", re.ASCII)
CLIENT_NAME_WHAT = "1 to 64 lower-case letters, digits and ._- starting with a letter or digit"
# A key goes verbatim into the nginx configuration (a map) and into an HTTP Authorization header.
KEY_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+", re.ASCII)
MIN_KEY_LENGTH = 32
MAX_KEY_LENGTH = 256
# A client's own limits, the setting each overrides, and its smallest value.
LIMITS: dict[str, tuple[str, int]] = {
    "rate": ("nginx_client_rate", 1),
    "burst": ("nginx_client_burst", 0),
    "concurrency": ("nginx_client_concurrency", 1),
}
CLIENT_KEYS = ("keys", *LIMITS)
KEYS_NEW = "`vllm-fleet keys new` makes one"


@dataclass(frozen=True)
class Secret:
    """A string that never shows in a repr, a log line or a traceback; ``reveal()`` gives it."""

    _value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(…)"

    __str__ = __repr__

    def reveal(self) -> str:
        return self._value


@dataclass(frozen=True)
class ClientEntry:
    """One ``[clients.NAME]`` table as written: its keys (the newest last) and the limits it sets itself."""

    name: str
    keys: tuple[Secret, ...]
    limits: tuple[tuple[str, int], ...] = ()  # (limit, value) pairs, e.g. (("rate", 5),)


@dataclass(frozen=True)
class Client:
    """A client as the edge enforces it: the file's limits, else the load balancer's settings."""

    name: str
    keys: tuple[Secret, ...]
    rate: int
    burst: int
    concurrency: int


@dataclass(frozen=True)
class EdgePlan:
    """What the edge of one load balancer is built from. ``certificate`` and ``key`` are the
    operator's, or None: the fleet CA in ``secrets_dir`` issues one for ``server_name``."""

    secrets_dir: Path
    clients: tuple[Client, ...]
    certificate: Path | None
    key: Path | None
    server_name: str

    @property
    def clients_file(self) -> Path:
        return self.secrets_dir / CLIENTS_FILE


# ---- files on the control node -----------------------------------------------------------------

def resolve(path: str | Path, base_dir: Path) -> Path:
    """A setting's path, relative to ``base_dir`` (where pyinfra runs) unless absolute."""
    return (Path(base_dir) / Path(path)).resolve()


def check_private(field: str, path: Path) -> None:
    """Refuse a secret file or folder that anyone but its owner may read or write (as ssh does
    with private keys)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        wanted = "700" if path.is_dir() else "600"
        raise FleetConfigError(field, f"{path} has mode {mode:04o}: group or others have access to secrets.",
                               f"`chmod {wanted} {path}` (only its owner may read it).")


def read_key_file(path: Path, goes_into: str, fix: str) -> Secret:
    """The one key in the secret file ``path``: only its owner may read the file, and the key, which
    goes verbatim into ``goes_into``, holds only characters that cannot end or break it there."""
    check_private(str(path), path)
    key = path.read_text(encoding="utf-8").strip()
    if not key or len(key) > MAX_KEY_LENGTH or not KEY_CHARS.fullmatch(key):
        raise FleetConfigError(str(path), f"does not hold one key of 1 to {MAX_KEY_LENGTH} letters, digits and "
                               f"._~+/=- (it goes verbatim into {goes_into}).", f"{fix}.")
    return Secret(key)


def _toml_problem(message: str) -> str:
    """tomllib's message without the character it quotes (it could be part of a key)."""
    return re.sub(r"(character) '.*?' ", r"\1 ", message)


def _parse_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FleetConfigError(str(path), f"cannot be read: {error.strerror}.",
                               "make it readable by the user who runs the deploy.") from None
    except UnicodeDecodeError:
        raise FleetConfigError(str(path), "is not UTF-8 text.", "rewrite it as UTF-8 TOML.") from None
    except tomllib.TOMLDecodeError as error:
        line = re.search(r"at line (\d+)", str(error))
        where = f"{path}: line {line.group(1)}" if line else str(path)
        raise FleetConfigError(where, f"is not valid TOML: {_toml_problem(str(error))}.",
                               "correct the file (TOML: [clients.NAME] tables of keys = [\"KEY\", ...]), or "
                               "re-create the client with `vllm-fleet keys add`.") from None


def read_clients(secrets_dir: Path) -> dict[str, ClientEntry]:
    """The clients of ``secrets_dir/clients.toml``, checked, in file order (maybe none). The
    folder and the file must be private; the file must exist."""
    path = secrets_dir / CLIENTS_FILE
    check_private(str(secrets_dir), secrets_dir)
    check_private(str(path), path)
    raw = _parse_toml(path)
    for key in raw:
        if key != "clients":
            raise FleetConfigError(f"{path}: `{key}`", "is not part of the clients file.",
                                   did_you_mean(key, ["clients"]) or "put each client in a [clients.NAME] table.")
    tables = raw.get("clients", {})
    if not isinstance(tables, dict):
        raise FleetConfigError(f"{path}: `clients`", "is not a table.", "write each client as [clients.NAME].")
    entries = {name: _client_entry(path, name, table) for name, table in tables.items()}
    _check_unique_keys(path, entries)
    return entries


def check_client_name(field: str, name: str) -> None:
    if not CLIENT_NAME.fullmatch(name):
        raise FleetConfigError(field, f"{name!r} is not a client name: it goes into the nginx configuration and "
                               "its logs.", f"name the client with {CLIENT_NAME_WHAT}.")


def _client_entry(path: Path, name: str, table: Any) -> ClientEntry:
    """One client's table, checked: known keys, good keys, limits within bounds."""
    check_client_name(f"{path}: [clients.{name}]", name)
    where = f"{path}: client {name}"
    if not isinstance(table, dict):
        raise FleetConfigError(where, "is not a table.", f"write it as [clients.{name}] with keys = [...].")
    for key in table:
        if key not in CLIENT_KEYS:
            raise FleetConfigError(f"{where}: `{key}`", "is not a client setting.",
                                   did_you_mean(key, list(CLIENT_KEYS)) or f"use only {', '.join(CLIENT_KEYS)}.")
    keys = _client_keys(where, table.get("keys"))
    limits = tuple((limit, _limit(where, limit, table[limit])) for limit in LIMITS if limit in table)
    return ClientEntry(name, keys, limits)


def _client_keys(where: str, keys: Any) -> tuple[Secret, ...]:
    """The client's keys, each long enough not to be guessed and safe in nginx and a header."""
    fix = f"give the client a list of keys, keys = [\"KEY\"]; {KEYS_NEW} (or `vllm-fleet keys add`)."
    if not isinstance(keys, list) or not keys:
        problem = "is missing." if keys is None else "is not a list of keys." if not isinstance(keys, list) \
            else "is empty: the client could never get in."
        raise FleetConfigError(f"{where}: `keys`", problem, fix)
    for index, key in enumerate(keys):
        field = f"{where}: keys[{index}]"
        if not isinstance(key, str):
            raise FleetConfigError(field, f"is not a string (a {type(key).__name__}): keys are strings.", fix)
        if len(key) < MIN_KEY_LENGTH:
            raise FleetConfigError(field, f"is {len(key)} characters long: a key shorter than {MIN_KEY_LENGTH} "
                                   "characters can be guessed.", f"replace it; {KEYS_NEW}.")
        if len(key) > MAX_KEY_LENGTH or not KEY_CHARS.fullmatch(key):
            raise FleetConfigError(field, f"is longer than {MAX_KEY_LENGTH} characters or holds characters other "
                                   "than letters, digits and ._~+/=- (it goes verbatim into the nginx configuration "
                                   "and an HTTP header).", f"replace it; {KEYS_NEW}.")
    return tuple(Secret(key) for key in keys)


def _limit(where: str, limit: str, number: Any) -> int:
    setting, minimum = LIMITS[limit]
    if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
        default = settings.BY_NAME[setting].default
        raise FleetConfigError(f"{where}: `{limit}`", f"{number!r} is not a whole number of at least {minimum}.",
                               f"set {limit} to a whole number of at least {minimum}, or remove it to use the load "
                               f"balancer's `{setting}` (default {default}): {settings.BY_NAME[setting].doc}")
    return number


def _check_unique_keys(path: Path, entries: Mapping[str, ClientEntry]) -> None:
    """A key names one client: the edge could not tell two clients sharing one apart."""
    seen: dict[str, str] = {}
    for entry in entries.values():
        for index, key in enumerate(entry.keys):
            here = f"client {entry.name}'s keys[{index}]"
            first = seen.setdefault(key.reveal(), here)
            if first != here:
                raise FleetConfigError(f"{path}: client {entry.name}: keys[{index}]",
                                       f"is the same key as {first}: the edge could not tell who sent it.",
                                       f"remove one of them and give client {entry.name} a new key with "
                                       f"`vllm-fleet keys add {path.parent} {entry.name}`.")


def clients_toml(entries: Iterable[ClientEntry]) -> str:
    """The clients file for ``entries`` (already checked: names and keys need no escaping)."""
    parts = [CLIENTS_HEADER]
    for entry in entries:
        # A name holding '.' would be a nested table if left bare.
        name = entry.name if re.fullmatch(r"[a-z0-9_-]+", entry.name) else f'"{entry.name}"'
        keys = ", ".join(f'"{key.reveal()}"' for key in entry.keys)
        parts.append(f"\n[clients.{name}]\nkeys = [{keys}]\n")
        parts.extend(f"{limit} = {number}\n" for limit, number in entry.limits)
    return "".join(parts)


# ---- the plan -------------------------------------------------------------------------------------

def server_name(lb_host_name: str, data: Mapping[str, Any]) -> str:
    """The name clients reach the edge at: nginx_server_name, else the load balancer's address."""
    return settings.value(data, "nginx_server_name") or consistency.advertised_address(lb_host_name, data)


def secrets_dir(lb_host_name: str, data: Mapping[str, Any], base_dir: Path) -> Path:
    """The load balancer's nginx_secrets_dir, resolved; refused when unset."""
    configured = settings.value(data, "nginx_secrets_dir")
    if not configured:
        raise FleetConfigError(
            f"host {lb_host_name}: `nginx_secrets_dir`",
            "is unset: the edge needs its clients' keys and the fleet's own secrets.",
            "set it to a folder outside git, e.g. 'inventories/secrets/prod' (which .gitignore lists), and add a "
            "client with `vllm-fleet keys add inventories/secrets/prod NAME`.")
    return resolve(configured, base_dir)


def plan_edge(lb_host_name: str, data: Mapping[str, Any], base_dir: Path, now: datetime | None = None) -> EdgePlan:
    """The edge of one load balancer: its clients with their limits, and the operator's certificate
    and key (checked against the server name) or None for both."""
    directory = secrets_dir(lb_host_name, data, base_dir)
    field = f"host {lb_host_name}: `nginx_secrets_dir`"
    add_client = f"add a client with `vllm-fleet keys add {directory} NAME` (it prints the client's key)."
    if not (directory / CLIENTS_FILE).is_file():
        raise FleetConfigError(field, f"{directory / CLIENTS_FILE} does not exist: the edge would let no "
                               "client in.", add_client)
    entries = read_clients(directory)
    if not entries:
        raise FleetConfigError(field, f"{directory / CLIENTS_FILE} holds no client: the edge would let no "
                               "client in.", add_client)
    defaults = {limit: settings.value(data, setting) for limit, (setting, _) in LIMITS.items()}
    clients = tuple(Client(e.name, e.keys, **{**defaults, **dict(e.limits)}) for e in entries.values())
    name = server_name(lb_host_name, data)
    certificate, key = _operator_tls(lb_host_name, data, base_dir, name, now)
    return EdgePlan(directory, clients, certificate, key, name)


def _operator_tls(lb_host_name: str, data: Mapping[str, Any], base_dir: Path, name: str,
                  now: datetime | None) -> tuple[Path | None, Path | None]:
    """The operator's certificate and key, both set or neither, and checked."""
    certificate = settings.value(data, "nginx_tls_certificate")
    key = settings.value(data, "nginx_tls_key")
    if not certificate and not key:
        return None, None
    if not certificate or not key:
        given, missing = ("nginx_tls_certificate", "nginx_tls_key") if certificate else \
            ("nginx_tls_key", "nginx_tls_certificate")
        raise FleetConfigError(f"host {lb_host_name}: `{given}`", f"is set, but `{missing}` is not.",
                               f"set `{missing}` as well, or neither to have the fleet's CA issue the certificate.")
    cert_path, key_path = resolve(certificate, base_dir), resolve(key, base_dir)
    check_certificate(f"host {lb_host_name}: `nginx_tls_certificate`", cert_path, key_path, name, now,
                      key_field=f"host {lb_host_name}: `nginx_tls_key`")
    return cert_path, key_path


def plan_fleet_edge(lb_hosts: list[tuple[str, Mapping[str, Any]]], base_dir: Path,
                    now: datetime | None = None) -> tuple[tuple[str, EdgePlan], ...]:
    """Every load balancer's edge, checked, by host name; they share one secrets folder (one set
    of clients, one internal key, one CA), each with its own limits and certificate."""
    if not lb_hosts:
        raise FleetConfigError("load balancers", "there is none.", "put a host in the inventory's load balancer group.")
    folders = [(name, secrets_dir(name, data, base_dir)) for name, data in lb_hosts]
    first_name, first_folder = folders[0]
    for name, folder in folders[1:]:
        if folder != first_folder:
            raise FleetConfigError(
                f"host {name}: `nginx_secrets_dir`",
                f"is {folder}, but host {first_name}'s is {first_folder}: one fleet has one set of clients and one "
                "internal key.", "set nginx_secrets_dir once for every load balancer (group data).")
    return tuple((name, plan_edge(name, data, base_dir, now)) for name, data in lb_hosts)


# ---- operator certificates ------------------------------------------------------------------------

def _read_bytes(field: str, path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise FleetConfigError(field, f"{path} cannot be read: {error.strerror}.",
                               f"give the path of {what} on the control node, readable by the user who "
                               "runs the deploy.") from None


def load_certificates(field: str, path: Path) -> list[x509.Certificate]:
    """The PEM certificates of ``path``, the server's own first."""
    try:
        chain = x509.load_pem_x509_certificates(_read_bytes(field, path, "the PEM certificate"))
    except ValueError:
        chain = []
    if not chain:
        raise FleetConfigError(field, f"{path} holds no PEM certificate.",
                               "give the certificate in PEM (-----BEGIN CERTIFICATE-----), the server's first and "
                               "then its chain.")
    return chain


def load_private_key(field: str, path: Path) -> PrivateKeyTypes:
    """The unencrypted PEM private key of ``path``, which only its owner may read."""
    data = _read_bytes(field, path, "the certificate's private key")
    check_private(field, path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise FleetConfigError(field, f"{path} is encrypted: nginx cannot ask for its passphrase.",
                               f"decrypt it: `openssl pkey -in {path} -out {path}` (keep it mode 600).") from None
    except (ValueError, UnsupportedAlgorithm):
        raise FleetConfigError(field, f"{path} holds no PEM private key nginx can use.",
                               "give the certificate's private key in PEM (-----BEGIN PRIVATE KEY-----).") from None


def public_key_bytes(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def covered_names(certificate: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses of the certificate's subjectAltName (clients ignore its CN)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def covers(certificate: x509.Certificate, name: str) -> bool:
    """Whether a client reaching ``name`` accepts the certificate: an IP SAN for an address, else a
    DNS SAN equal to it or a wildcard for its first label."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    names = covered_names(certificate)
    if address is not None:
        return any(_same_address(address, covered) for covered in names)
    labels = name.lower().rstrip(".").split(".")
    for covered in (n.lower().rstrip(".") for n in names):
        pattern = covered.split(".")
        if pattern == labels or (pattern[0] == "*" and len(pattern) == len(labels) > 2
                                 and pattern[1:] == labels[1:]):
            return True
    return False


def _same_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


def check_certificate(field: str, cert_path: Path, key_path: Path, server_name: str, now: datetime | None = None,
                      key_field: str | None = None) -> None:
    """Refuse an operator certificate nginx cannot use or clients would reject: unreadable, not
    PEM, another key's, expired or not yet valid, or not for ``server_name``. ``field`` names the
    certificate's setting, ``key_field`` the key's (default: ``field``)."""
    now = now or datetime.now(UTC)
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    certificate = load_certificates(field, cert_path)[0]
    key = load_private_key(key_field or field, key_path)
    if public_key_bytes(key.public_key()) != public_key_bytes(certificate.public_key()):
        raise FleetConfigError(key_field or field, f"{key_path} is not the key of {cert_path}: nginx would "
                               "refuse to start.", "give the private key the certificate was issued for, and put the "
                               "server's certificate first in its file (then the chain).")
    if certificate.not_valid_after_utc < now:
        raise FleetConfigError(field, f"{cert_path} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} "
                               "UTC: every client would reject it.", "renew it and give the new certificate.")
    if certificate.not_valid_before_utc > now:
        raise FleetConfigError(field, f"{cert_path} is valid only from "
                               f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: clients would reject it "
                               "until then.", "check the control node's clock, or give a certificate valid now.")
    if not covers(certificate, server_name):
        names = ", ".join(covered_names(certificate)) or "no name (it has no subjectAltName)"
        raise FleetConfigError(field, f"{cert_path} does not cover {server_name!r}, the name clients reach the "
                               "edge at: they would reject it.",
                               f"it covers {names}: set `nginx_server_name` to one of those, or give a "
                               f"certificate for {server_name}.")
