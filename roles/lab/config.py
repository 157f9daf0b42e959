"""The lab's fixed choices (state folder, subnet, packages, names) and the pure helpers
that derive addresses, mirrors and paths from them (unit-tested)."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from roles.errors import FleetConfigError, LabError


def lab_subnet(text: str) -> ipaddress.IPv4Network:
    """The lab network from ``VLLM_FLEET_LAB_SUBNET``: a private IPv4 network of at least a /24
    (the bridge, then HOST_OFFSET addresses, then the hosts)."""
    try:
        subnet = ipaddress.ip_network(text)
    except ValueError:
        subnet = None
    if not isinstance(subnet, ipaddress.IPv4Network) or not subnet.is_private or subnet.prefixlen > 24:
        raise FleetConfigError("VLLM_FLEET_LAB_SUBNET", f"{text!r} is not a private IPv4 network of /24 or larger.",
                               "set it to a free private network such as 10.213.7.0/24, or unset it.")
    return subnet


# Everything the lab creates lives here; tests and CI point it elsewhere.
STATE_DIR = Path(os.environ.get("VLLM_FLEET_LAB_DIR", "/var/lib/vllm-fleet-lab"))
# Debian release of the hosts; matches the control node so its apt sources apply unchanged.
SUITE = "bookworm"
# Packages baked into the base rootfs: what systemd, ssh and pyinfra need on a host.
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "openssh-server", "python3", "iproute2",
    "sudo", "dbus", "ca-certificates", "procps",
)
# Bump when customize_base() changes, so that existing bases are rebuilt.
BASE_REVISION = 1
# Hosts booted when `up` is given no --hosts.
DEFAULT_HOSTS = 2
# Lab network: the bridge takes .1, host labN takes .(HOST_OFFSET + N); the environment may move it.
SUBNET = lab_subnet(os.environ.get("VLLM_FLEET_LAB_SUBNET", "10.213.7.0/24"))
# Host addresses start after this offset, leaving room for control-side addresses.
HOST_OFFSET = 10
# Linux bridge joining the hosts' veths to the control node.
BRIDGE = "vflbr0"
# Prefix of the per-host network namespaces (/run/netns/vfl-labN).
NETNS_PREFIX = "vfl-"
# Where the lab's stand-in fallback provider (roles/lab/provider.py) serves TLS, on the last host.
PROVIDER_PORT = 8443
# apt-cacher-ng's port on the bridge address.
APT_PROXY_PORT = 3142
# Where apt-cacher-ng started by the lab writes its pid (a dir the daemon's user may write).
APT_PROXY_PIDFILE = Path("/run/apt-cacher-ng/vllm-fleet-lab.pid")
# Its transfer log (the package's LogDir): a line "TIME|O|BYTES|CLIENT|FILE" per package file served.
APT_PROXY_LOG = Path("/var/log/apt-cacher-ng/apt-cacher.log")
# Its control socket, kept apart from a system instance's default socket.
APT_PROXY_SOCKET = Path("/run/apt-cacher-ng/vllm-fleet-lab.socket")
# Account apt-cacher-ng runs as (the package creates it and owns its cache).
APT_PROXY_USER = "apt-cacher-ng"
# This machine's extra CA files; TLS is intercepted here, so hosts must trust them too.
CA_SOURCE_DIR = Path("/usr/local/share/ca-certificates")
# apt source files of this machine, deb822 first (Debian 12's default), then the one-line file.
DEB822_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
ONE_LINE_SOURCES = Path("/etc/apt/sources.list")
# Seconds a host gets to accept ssh after boot before `up` gives up.
SSH_WAIT_S = 90
# Seconds nspawn gets to halt a host after TERM before it is killed.
STOP_WAIT_S = 15
# Control-node commands the lab uses, and the Debian package that provides each.
REQUIRED_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "apt-cacher-ng": "apt-cacher-ng",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ip": "iproute2",
}
# ssh options: lab hosts are throwaway, so their host keys are neither checked nor recorded.
SSH_OPTIONS = (
    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
)


# ---------------------------------------------------------------- pure helpers (unit-tested)

def mirror_from_deb822(text: str) -> str | None:
    """First URI of the first enabled `deb` stanza of a deb822 .sources file."""
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:  # continuation line
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" in fields.get("types", "").split() and fields.get("uris"):
            return fields["uris"].split()[0]
    return None


def mirror_from_one_line(text: str) -> str | None:
    """URI of the first `deb` line of a one-line sources.list (options in [...] skipped)."""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[len("deb "):].strip()
        if rest.startswith("["):
            rest = rest.split("]", 1)[1].strip()
        if rest:
            return rest.split()[0]
    return None


def host_name(index: int) -> str:
    return f"lab{index}"


def host_address(index: int, subnet: ipaddress.IPv4Network = SUBNET) -> str:
    """Address of host labN: the (HOST_OFFSET + N)th address of the subnet."""
    address = subnet.network_address + HOST_OFFSET + index
    if index < 1 or address >= subnet.broadcast_address:
        raise LabError(f"host number {index} does not fit in {subnet}")
    return str(address)


def bridge_address(subnet: ipaddress.IPv4Network = SUBNET) -> str:
    return str(subnet.network_address + 1)


def colliding_routes(routes: list[dict], subnet: ipaddress.IPv4Network = SUBNET,
                     own_device: str = BRIDGE) -> list[str]:
    """Destinations of routes (`ip -j route` entries) that overlap the lab subnet.

    The default route and the lab's own bridge route do not count as collisions.
    """
    hits = []
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("dev") == own_device:
            continue
        if ipaddress.ip_network(dst, strict=False).overlaps(subnet):
            hits.append(f"{dst} dev {route.get('dev', '?')}")
    return hits


def lab_document(count: int, key: Path) -> dict:
    """Content of lab.json for hosts lab1..labN."""
    control = bridge_address()
    return {
        "hosts": [{"name": host_name(i), "address": host_address(i)} for i in range(1, count + 1)],
        "ssh_user": "root",
        "ssh_key": str(key.resolve()),
        "control_address": control,
        "apt_proxy": f"http://{control}:{APT_PROXY_PORT}",
    }


# ---------------------------------------------------------------- paths and small utilities

def base_dir() -> Path:
    return STATE_DIR / "base"


def base_stamp() -> Path:
    return STATE_DIR / "base.stamp"


def key_path() -> Path:
    return STATE_DIR / "id_ed25519"


def lab_json() -> Path:
    return STATE_DIR / "lab.json"


def host_dir(name: str) -> Path:
    return STATE_DIR / "hosts" / name


def netns_name(name: str) -> str:
    return NETNS_PREFIX + name


def veth_name(name: str) -> str:
    """Bridge-side veth of a host (interface names are limited to 15 characters)."""
    return f"vfl-{name}"[:15]


def load_state() -> dict:
    """The running lab's description (lab.json)."""
    if not lab_json().exists():
        raise LabError("lab is not up: run `vllm-fleet lab up`")
    return json.loads(lab_json().read_text())
