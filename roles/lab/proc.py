"""Running commands and watching processes, mounts and ports on the machine that runs the lab."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path


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
