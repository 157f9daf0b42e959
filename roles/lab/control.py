"""The lab's commands: bring it up, take it down, show it, and read its description (lab.json)."""

from __future__ import annotations

import json
from pathlib import Path

from roles.errors import LabError
from roles.lab.config import (
    NETNS_PREFIX,
    STATE_DIR,
    host_address,
    host_dir,
    host_name,
    key_path,
    lab_document,
    lab_json,
    netns_name,
)
from roles.lab.hosts import (
    boot_host,
    booted_as_now,
    ensure_overlay,
    hosts_on_disk,
    init_host_rootfs,
    nspawn_pid,
    ssh_ok,
    stop_host,
    wait_for_ssh,
    write_hosts_file,
)
from roles.lab.network import ensure_apt_proxy, ensure_bridge, ensure_host_network, remove_network, stop_apt_proxy
from roles.lab.proc import mounts_under, run, say, write_if_changed
from roles.lab.rootfs import ensure_base, ensure_key, ensure_tools, require_root


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
        if nspawn_pid(name) and not Path(f"/run/netns/{netns_name(name)}").exists():
            # A host left running by an interrupted `down`: its network is gone, so boot it again.
            say(f"{name} runs without its network namespace: restarting it")
            stop_host(name)
        merged = ensure_overlay(name)
        if nspawn_pid(name) and not booted_as_now(name, merged):
            # Kept from an older checkout: its disk stays, it boots again with today's options.
            say(f"{name} was booted with other nspawn options: restarting it")
            stop_host(name)
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
        print("lab: no hosts (run `vllm-fleet lab up`)")
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
