"""The lab network: a bridge, one namespace and veth per host, and apt-cacher-ng on the bridge
(the only way out: hosts reach Debian packages through it, and nothing else)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from roles.errors import LabError
from roles.lab.config import (
    APT_PROXY_PIDFILE,
    APT_PROXY_PORT,
    APT_PROXY_SOCKET,
    APT_PROXY_USER,
    BRIDGE,
    STATE_DIR,
    SUBNET,
    bridge_address,
    colliding_routes,
    netns_name,
    veth_name,
)
from roles.lab.hosts import wait_gone
from roles.lab.proc import ok, port_open, run, running_pid, say, write_if_changed

# ---------------------------------------------------------------- network

def ensure_bridge() -> None:
    routes = json.loads(run("ip", "-j", "-4", "route", "show", capture=True).stdout or "[]")
    if hits := colliding_routes(routes):
        raise LabError(f"lab subnet {SUBNET} collides with existing routes: {', '.join(hits)}; "
                       "set VLLM_FLEET_LAB_SUBNET to a free private /24 (and `vllm-fleet lab down` first)")
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
