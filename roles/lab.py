"""A local test lab: N Debian hosts booted with systemd-nspawn on this machine.

Each host is an overlay on one shared debootstrap rootfs, has its own network namespace on a
bridge, runs real systemd and sshd, and reaches Debian packages only through an apt-cacher-ng
on the bridge (the bridge has no route out). Deploys talk to the hosts over ssh, exactly as
they would to real servers.

    python -m roles.lab up [--hosts N]      # build/boot; idempotent; writes <state>/lab.json
    python -m roles.lab down [--keep-base]  # stop and remove everything (optionally keep base + key)
    python -m roles.lab status              # table of hosts

This machine's PID 1 is not systemd, which shapes several choices below (nspawn flags,
starting apt-cacher-ng by hand).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

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
# Lab network: the bridge takes .1, host labN takes .(HOST_OFFSET + N).
SUBNET = ipaddress.ip_network("10.213.7.0/24")
# Host addresses start after this offset, leaving room for control-side addresses.
HOST_OFFSET = 10
# Linux bridge joining the hosts' veths to the control node.
BRIDGE = "vflbr0"
# Prefix of the per-host network namespaces (/run/netns/vfl-labN).
NETNS_PREFIX = "vfl-"
# apt-cacher-ng's port on the bridge address.
APT_PROXY_PORT = 3142
# Where apt-cacher-ng started by the lab writes its pid (a dir the daemon's user may write).
APT_PROXY_PIDFILE = Path("/run/apt-cacher-ng/vllm-fleet-lab.pid")
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


class LabError(RuntimeError):
    """A lab step that cannot go on; the message says what to do."""


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


def say(message: str) -> None:
    print(f"lab: {message}", flush=True)


def run(*argv: str, check: bool = True, capture: bool = False, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, text=True,
                          capture_output=capture, **kwargs)


def ok(*argv: str) -> bool:
    """True when a command succeeds; its output is discarded."""
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> None:
    if path.exists() and path.read_text() == content:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    path.chmod(mode)


def running_pid(pidfile: Path, program: str) -> int | None:
    """The pid recorded in pidfile if it is still a live `program` process.

    Checking the program guards against a recycled pid; zombies count as gone.
    """
    try:
        pid = int(pidfile.read_text().strip())
        return pid if process_is(pid, program) else None
    except (OSError, ValueError):
        return None


def process_is(pid: int, program: str) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, IndexError):
        return False
    return state != "Z" and Path(argv0).name == program


def mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as mounts:
        return [line.split()[4] for line in mounts if line.split()[4].startswith(prefix)]


def port_open(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- control-node prerequisites

def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (mounts, network namespaces, nspawn): run it with sudo")


def ensure_tools() -> None:
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if not shutil.which(tool)})
    if not missing:
        return
    say(f"installing {' '.join(missing)} with apt-get...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run("apt-get", "update", "-q", env=env)
    run("apt-get", "install", "-y", "-q", *missing, env=env)


def find_mirror() -> str:
    if DEB822_SOURCES.exists() and (mirror := mirror_from_deb822(DEB822_SOURCES.read_text())):
        return mirror
    if ONE_LINE_SOURCES.exists() and (mirror := mirror_from_one_line(ONE_LINE_SOURCES.read_text())):
        return mirror
    raise LabError(f"no Debian mirror found in {DEB822_SOURCES} or {ONE_LINE_SOURCES}")


def ensure_key() -> Path:
    key = key_path()
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vllm-fleet-lab", "-f", str(key))
    return key


# ---------------------------------------------------------------- base rootfs

def stamp_text(mirror: str) -> str:
    return json.dumps({"suite": SUITE, "packages": BASE_PACKAGES, "mirror": mirror,
                       "revision": BASE_REVISION}, sort_keys=True)


def ensure_base(key: Path) -> None:
    mirror = find_mirror()
    stamp = stamp_text(mirror)
    if base_dir().is_dir() and base_stamp().exists() and base_stamp().read_text() == stamp:
        return
    if hosts_on_disk():
        raise LabError("the base rootfs is out of date but hosts are built on it: "
                       "run `python -m roles.lab down --keep-base` first")
    say(f"building base rootfs with debootstrap from {mirror} (about 1 min)...")
    building = STATE_DIR / "base.building"
    run("rm", "-rf", "--one-file-system", str(building), str(base_dir()))
    run("debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
        SUITE, str(building), mirror, stdout=subprocess.DEVNULL)
    customize_base(building, key)
    building.rename(base_dir())
    base_stamp().write_text(stamp)
    say("base rootfs ready")


def apt_sources_for_hosts() -> dict[str, str]:
    """This machine's Debian apt source files only (third-party repos stay off the hosts)."""
    files = {}
    for source in (DEB822_SOURCES, ONE_LINE_SOURCES):
        if source.exists():
            files[str(source)] = source.read_text()
    return files


def apt_config_for_hosts() -> str:
    proxy = f"http://{bridge_address()}:{APT_PROXY_PORT}"
    lines = [
        f'Acquire::http::Proxy "{proxy}";',
        # apt-cacher-ng and pipelined requests through it stall; one request at a time.
        'Acquire::http::Pipeline-Depth "0";',
        # Deploys may race the first apt run of a freshly booted host: wait for the lock.
        'DPkg::Lock::Timeout "300";',
    ]
    # The mirror here may serve a dated snapshot; mirror the control node's tolerance of that.
    valid_until = subprocess.run(["apt-config", "dump", "Acquire::Check-Valid-Until"],
                                 capture_output=True, text=True).stdout
    if '"false"' in valid_until:
        lines.append('Acquire::Check-Valid-Until "false";')
    return "\n".join(lines) + "\n"


def customize_base(root: Path, key: Path) -> None:
    say("configuring base rootfs (CA files, apt proxy, sshd, key)...")
    # CA certificates: TLS from hosts is intercepted just like from this machine.
    ca_dest = root / "usr/local/share/ca-certificates"
    ca_dest.mkdir(parents=True, exist_ok=True)
    if CA_SOURCE_DIR.is_dir():
        for ca in CA_SOURCE_DIR.glob("*.crt"):
            shutil.copy2(ca, ca_dest / ca.name)
    run("chroot", str(root), "update-ca-certificates", stdout=subprocess.DEVNULL)
    # apt: only the Debian sources, through the proxy on the bridge.
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    for path, text in apt_sources_for_hosts().items():
        write_if_changed(root / path.lstrip("/"), text)
    write_if_changed(root / "etc/apt/apt.conf.d/90vllm-fleet-lab", apt_config_for_hosts())
    # sshd: root by key only; every host makes its own host keys before first boot.
    write_if_changed(root / "etc/ssh/sshd_config.d/vllm-fleet-lab.conf",
                     "PermitRootLogin prohibit-password\nPasswordAuthentication no\n")
    for host_key in (root / "etc/ssh").glob("ssh_host_*"):
        host_key.unlink()
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    write_if_changed(ssh_dir / "authorized_keys", Path(f"{key}.pub").read_text(), mode=0o600)
    # machine-id: empty in the base so each host gets its own (written at host creation).
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)


# ---------------------------------------------------------------- network

def ensure_bridge() -> None:
    routes = json.loads(run("ip", "-j", "-4", "route", "show", capture=True).stdout or "[]")
    if hits := colliding_routes(routes):
        raise LabError(f"lab subnet {SUBNET} collides with existing routes: {', '.join(hits)}; "
                       "change SUBNET in roles/lab.py")
    if not ok("ip", "link", "show", BRIDGE):
        run("ip", "link", "add", BRIDGE, "type", "bridge")
    address = f"{bridge_address()}/{SUBNET.prefixlen}"
    if address not in run("ip", "-4", "-o", "addr", "show", "dev", BRIDGE, capture=True).stdout:
        run("ip", "addr", "add", address, "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")


def ensure_host_network(name: str, address: str) -> None:
    netns = netns_name(name)
    if not Path(f"/run/netns/{netns}").exists():
        run("ip", "netns", "add", netns)
    veth = veth_name(name)
    if not ok("ip", "link", "show", veth):
        # The container end is created straight inside the namespace, named eth0 there.
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    run("ip", "link", "set", veth, "master", BRIDGE, "up")
    cidr = f"{address}/{SUBNET.prefixlen}"
    if cidr not in run("ip", "-n", netns, "-4", "-o", "addr", "show", "dev", "eth0", capture=True).stdout:
        run("ip", "-n", netns, "addr", "add", cidr, "dev", "eth0")
    run("ip", "-n", netns, "link", "set", "eth0", "up")
    run("ip", "-n", netns, "link", "set", "lo", "up")


def remove_network(names: list[str]) -> None:
    for name in names:
        if ok("ip", "link", "show", veth_name(name)):
            run("ip", "link", "del", veth_name(name))
        if Path(f"/run/netns/{netns_name(name)}").exists():
            run("ip", "netns", "del", netns_name(name))
    if ok("ip", "link", "show", BRIDGE):
        run("ip", "link", "del", BRIDGE)


# ---------------------------------------------------------------- apt proxy

def apt_proxy_config(address: str) -> str:
    """acng.conf for the lab's apt-cacher-ng.

    Plain caching proxy, without the distro config's Remap-* rules: those send Debian requests
    to mirrors from backends_debian(.default), which may be unreachable from here, while the
    hosts only ever ask for this machine's own (reachable) apt sources.
    """
    return "\n".join([
        "CacheDir: /var/cache/apt-cacher-ng",
        "LogDir: /var/log/apt-cacher-ng",
        "SupportDir: /usr/lib/apt-cacher-ng",
        f"BindAddress: {address}",
        f"Port: {APT_PROXY_PORT}",
        f"PidFile: {APT_PROXY_PIDFILE}",
        f"SocketPath: {APT_PROXY_SOCKET}",
        "ForeGround: 0",
        "ExThreshold: 4",
    ]) + "\n"


def ensure_apt_proxy() -> None:
    """apt-cacher-ng on the bridge address; an instance already listening there is reused."""
    address = bridge_address()
    if port_open(address, APT_PROXY_PORT):
        if not running_pid(APT_PROXY_PIDFILE, "apt-cacher-ng"):
            say(f"reusing the apt proxy already listening on {address}:{APT_PROXY_PORT}")
        return
    say(f"starting apt-cacher-ng on {address}:{APT_PROXY_PORT}...")
    config_dir = STATE_DIR / "apt-cacher-ng"
    write_if_changed(config_dir / "acng.conf", apt_proxy_config(address))
    run_dir = APT_PROXY_PIDFILE.parent
    run_dir.mkdir(exist_ok=True)
    shutil.chown(run_dir, APT_PROXY_USER, APT_PROXY_USER)
    # No systemd to supervise it: the daemon forks away from us (ForeGround: 0) in its own
    # session, so it outlives this CLI; the pidfile tells `down` that the lab started it.
    run("runuser", "-u", APT_PROXY_USER, "--", "apt-cacher-ng", "-c", str(config_dir),
        start_new_session=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_open(address, APT_PROXY_PORT):
        if time.monotonic() > deadline:
            raise LabError("apt-cacher-ng did not start; see /var/log/apt-cacher-ng/")
        time.sleep(0.2)


def stop_apt_proxy() -> None:
    if pid := running_pid(APT_PROXY_PIDFILE, "apt-cacher-ng"):
        say("stopping apt-cacher-ng")
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid, "apt-cacher-ng", 10)
    APT_PROXY_PIDFILE.unlink(missing_ok=True)


# ---------------------------------------------------------------- hosts

def hosts_on_disk() -> list[dict]:
    """Hosts that have a directory under <state>/hosts, in index order."""
    hosts = STATE_DIR / "hosts"
    names = sorted((p.name for p in hosts.iterdir() if p.is_dir()), key=lambda n: int(n[3:])) \
        if hosts.is_dir() else []
    return [{"name": n, "address": host_address(int(n[3:]))} for n in names]


def ensure_overlay(name: str) -> Path:
    root = host_dir(name)
    merged = root / "merged"
    for sub in ("upper", "work", "merged"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if not mounted(merged):
        run("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={base_dir()},upperdir={root / 'upper'},workdir={root / 'work'}", str(merged))
    return merged


def init_host_rootfs(merged: Path, name: str) -> None:
    """Per-host identity, made once before the first boot."""
    if (merged / "etc/ssh/ssh_host_ed25519_key").exists():
        return
    (merged / "etc/hostname").write_text(name + "\n")
    (merged / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    run("ssh-keygen", "-A", "-f", str(merged), stdout=subprocess.DEVNULL)


def write_hosts_file(merged: Path, name: str, count: int) -> None:
    """/etc/hosts naming every lab host, so deploys can use names as well as addresses."""
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{name}", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{host_address(i)}\t{host_name(i)}" for i in range(1, count + 1)]
    write_if_changed(merged / "etc/hosts", "\n".join(lines) + "\n")


def nspawn_pid(name: str) -> int | None:
    return running_pid(host_dir(name) / "nspawn.pid", "systemd-nspawn")


# The writable cgroup hierarchies of this machine (hybrid layout: systemd's named v1 tree and
# an empty v2 tree). PID 1 is not systemd, so nothing gives a container a subtree of its own:
# without one every host's systemd manages the same /system.slice paths, hosts see each
# other's processes in them, and stopping a unit fails ("Failed to kill control group ...
# Input/output error") and leaves its child processes running.
CGROUP_TREES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
CGROUP_PARENT = "vllm-fleet-lab"


def host_cgroups(name: str) -> list[Path]:
    return [tree / CGROUP_PARENT / name for tree in CGROUP_TREES if (tree / "cgroup.procs").exists()]


def enter_own_cgroups(name: str) -> None:
    """Move the calling process (nspawn, before exec) into the host's own cgroups."""
    for group in host_cgroups(name):
        group.mkdir(parents=True, exist_ok=True)
        (group / "cgroup.procs").write_text(f"{os.getpid()}\n")


def remove_cgroups(name: str) -> None:
    """Remove a stopped host's cgroups, deepest first (rmdir only works on empty groups)."""
    for group in host_cgroups(name):
        for sub in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        if group.exists():
            group.rmdir()


def boot_host(name: str, merged: Path) -> None:
    """Start nspawn for a host, detached.

    No extra nspawn options are needed for the units deploys use: User=, PrivateTmp=,
    CacheDirectory= and /dev/shm (a tmpfs of 10% of RAM) work as is. LimitNOFILE= is clamped to
    this machine's hard limit (20000 here): its bounding set lacks CAP_SYS_RESOURCE, so neither
    nspawn's --rlimit= nor systemd inside can raise it.
    """
    console = open(host_dir(name) / "console.log", "ab")
    process = subprocess.Popen(
        ["systemd-nspawn", "--boot",
         # PID 1 here is not systemd: nspawn cannot register with machined or make a scope.
         "--register=no", "--keep-unit",
         "-D", str(merged), "-M", name,
         f"--network-namespace-path=/run/netns/{netns_name(name)}",
         # Log the boot to console.log and never wait on a terminal.
         "--console=read-only"],
        stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
        start_new_session=True,  # own session: the host outlives this CLI and its terminal
        preexec_fn=lambda: enter_own_cgroups(name),
    )
    (host_dir(name) / "nspawn.pid").write_text(f"{process.pid}\n")


def ssh_command(name: str, state: dict | None = None) -> list[str]:
    """argv that runs ssh into lab host `name`; append the remote command."""
    state = state or load_state()
    address = next((h["address"] for h in state["hosts"] if h["name"] == name), None)
    if address is None:
        raise LabError(f"no lab host named {name!r}; hosts: {[h['name'] for h in state['hosts']]}")
    return ["ssh", "-i", state["ssh_key"], *SSH_OPTIONS, f"{state['ssh_user']}@{address}"]


def ssh_ok(address: str, key: Path) -> bool:
    return ok("ssh", "-i", str(key), *SSH_OPTIONS, f"root@{address}", "true")


def wait_for_ssh(hosts: list[dict], key: Path) -> None:
    deadline = time.monotonic() + SSH_WAIT_S
    for host in hosts:
        while not ssh_ok(host["address"], key):
            if time.monotonic() > deadline or not nspawn_pid(host["name"]):
                raise LabError(f"{host['name']} did not accept ssh; see "
                               f"{host_dir(host['name']) / 'console.log'}")
            time.sleep(0.3)


def wait_gone(pid: int, program: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process_is(pid, program):
            return True
        time.sleep(0.1)
    return False


def stop_host(name: str) -> None:
    if pid := nspawn_pid(name):
        say(f"stopping {name}")
        os.kill(pid, signal.SIGTERM)  # nspawn turns TERM into a clean halt of the host
        if not wait_gone(pid, "systemd-nspawn", STOP_WAIT_S):
            os.killpg(pid, signal.SIGKILL)
            wait_gone(pid, "systemd-nspawn", 5)
    merged = host_dir(name) / "merged"
    if mounted(merged):
        run("umount", str(merged))
    remove_cgroups(name)


# ---------------------------------------------------------------- commands

def load_state() -> dict:
    """The running lab's description (lab.json)."""
    if not lab_json().exists():
        raise LabError("lab is not up: run `python -m roles.lab up`")
    return json.loads(lab_json().read_text())


def up(count: int) -> None:
    require_root()
    count = max(count, len(hosts_on_disk()))  # never shrink: `down` removes hosts
    ensure_tools()
    key = ensure_key()
    ensure_base(key)
    ensure_bridge()
    ensure_apt_proxy()
    hosts = [{"name": host_name(i), "address": host_address(i)} for i in range(1, count + 1)]
    for host in hosts:
        name = host["name"]
        merged = ensure_overlay(name)
        write_hosts_file(merged, name, count)
        if nspawn_pid(name):
            continue
        say(f"booting {name} at {host['address']}")
        init_host_rootfs(merged, name)
        ensure_host_network(name, host["address"])
        boot_host(name, merged)
    wait_for_ssh(hosts, key)
    write_if_changed(lab_json(), json.dumps(lab_document(count, key), indent=2) + "\n")
    say(f"up: {count} hosts, ssh key {key}, description in {lab_json()}")


def down(keep_base: bool) -> None:
    require_root()
    names = [h["name"] for h in hosts_on_disk()]
    for name in names:
        stop_host(name)
    # Namespaces can outlive a deleted state dir; clear every one with the lab's prefix.
    netns = run("ip", "netns", "list", capture=True).stdout.split()
    names += [ns[len(NETNS_PREFIX):] for ns in netns
              if ns.startswith(NETNS_PREFIX + "lab") and ns[len(NETNS_PREFIX):] not in names]
    remove_network(names)
    stop_apt_proxy()
    if not STATE_DIR.exists():
        return
    if leftovers := mounts_under(STATE_DIR):
        raise LabError(f"still mounted, not deleting {STATE_DIR}: {', '.join(leftovers)}")
    keep = {"base", "base.stamp", "id_ed25519", "id_ed25519.pub"} if keep_base else set()
    for entry in STATE_DIR.iterdir():
        if entry.name not in keep:
            run("rm", "-rf", "--one-file-system", str(entry))
    if not keep_base:
        STATE_DIR.rmdir()
    if names:
        say("down" + (" (base rootfs and key kept)" if keep_base else ""))


def human_size(size: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if size < 1024:
            return f"{size:.0f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


def status() -> None:
    hosts = hosts_on_disk()
    if not hosts:
        print("lab: no hosts (run `python -m roles.lab up`)")
        return
    key = key_path()
    print(f"{'host':<8}{'address':<16}{'state':<10}{'ssh':<6}overlay")
    for host in hosts:
        running = nspawn_pid(host["name"]) is not None
        ssh = "ok" if running and ssh_ok(host["address"], key) else "no"
        usage = run("du", "-sb", str(host_dir(host["name"]) / "upper"), capture=True, check=False)
        size = human_size(int(usage.stdout.split()[0])) if usage.returncode == 0 else "?"
        print(f"{host['name']:<8}{host['address']:<16}{'running' if running else 'stopped':<10}"
              f"{ssh:<6}{size}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roles.lab", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="build the base if needed and boot the hosts")
    up_parser.add_argument("--hosts", type=int, default=DEFAULT_HOSTS, help="number of hosts")
    down_parser = commands.add_parser("down", help="stop the hosts and remove the lab")
    down_parser.add_argument("--keep-base", action="store_true",
                             help="keep the base rootfs and ssh key so the next `up` is fast")
    commands.add_parser("status", help="show the hosts")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.hosts)
        elif args.command == "down":
            down(args.keep_base)
        else:
            status()
    except (LabError, subprocess.CalledProcessError) as error:
        print(f"lab: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
