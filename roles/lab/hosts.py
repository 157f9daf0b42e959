"""Lab hosts: an overlay on the base per host, booted with systemd-nspawn in its own cgroups,
reached over ssh, stopped cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from roles.errors import LabError
from roles.lab.config import (
    SSH_OPTIONS,
    SSH_WAIT_S,
    STATE_DIR,
    STOP_WAIT_S,
    base_dir,
    host_address,
    host_dir,
    host_name,
    load_state,
    netns_name,
)
from roles.lab.proc import mounted, ok, process_is, run, running_pid, say, write_if_changed

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


def nspawn_argv(name: str, merged: Path) -> list[str]:
    """How a host is booted. No extra nspawn options are needed for the units deploys use:
    User=, PrivateTmp=, CacheDirectory= and /dev/shm (a tmpfs of 10% of RAM) work as is.
    LimitNOFILE= is clamped to this machine's hard limit (20000 here): its bounding set lacks
    CAP_SYS_RESOURCE, so neither nspawn's --rlimit= nor systemd inside can raise it."""
    return ["systemd-nspawn", "--boot",
            # PID 1 here is not systemd: nspawn cannot register with machined or make a scope.
            "--register=no", "--keep-unit",
            "-D", str(merged), "-M", name,
            f"--network-namespace-path=/run/netns/{netns_name(name)}",
            # The host firewall (roles/firewall.py) loads an nftables table, and nf_tables answers
            # only a process with CAP_NET_ADMIN, which nspawn leaves out of the container's bounding
            # set with --network-namespace-path: without it nft fails, "Operation not permitted".
            # It acts on the host's own namespace (its eth0, as root on a real host can), never on
            # the bridge or the control node's side; no service of the base configures interfaces.
            "--capability=CAP_NET_ADMIN",
            # Log the boot to console.log and never wait on a terminal.
            "--console=read-only"]


# nspawn mounts /proc/sys read-only; "network" leaves /proc/sys/net writable, which is the host's
# own network namespace here: a load balancer's deploy sets its TCP keepalive timing there
# (nginx_dead_peer_timeout), as root on a real host does.
NSPAWN_ENV = {"SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}


def booted_as_now(name: str, merged: Path) -> bool:
    """Whether the running host was booted as ``nspawn_argv`` and ``NSPAWN_ENV`` boot one today (a
    lab kept from an older checkout may lack an option that a deploy now needs)."""
    pid = nspawn_pid(name)
    try:
        running = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except (OSError, TypeError):
        return False
    wanted = {f"{key}={value}".encode() for key, value in NSPAWN_ENV.items()}
    return [arg.decode() for arg in running] == nspawn_argv(name, merged) and wanted <= environ


def boot_host(name: str, merged: Path) -> None:
    """Start nspawn for a host, detached."""
    console = open(host_dir(name) / "console.log", "ab")
    process = subprocess.Popen(
        nspawn_argv(name, merged), env={**os.environ, **NSPAWN_ENV},
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
