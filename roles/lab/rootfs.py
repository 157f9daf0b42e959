"""The control node's prerequisites and the shared debootstrap base rootfs every lab host boots from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from roles.errors import LabError
from roles.lab.config import (
    APT_PROXY_PORT,
    BASE_PACKAGES,
    BASE_REVISION,
    CA_SOURCE_DIR,
    DEB822_SOURCES,
    ONE_LINE_SOURCES,
    REQUIRED_TOOLS,
    STATE_DIR,
    SUITE,
    base_dir,
    base_stamp,
    bridge_address,
    key_path,
    mirror_from_deb822,
    mirror_from_one_line,
)
from roles.lab.hosts import hosts_on_disk
from roles.lab.proc import run, say, write_if_changed

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
                       "run `vllm-fleet lab down --keep-base` first")
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
