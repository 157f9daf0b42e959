"""Run a ``@deploy`` against a host whose facts are given, and list the commands it would run.

No connection is made: ``Host.get_fact`` is answered from a table, and an unexpected fact
fails the test (so a test states every fact the role reads). The deploy goes through
pyinfra's own prepare phase, then each operation's commands are generated in order with
execution-time ``_if=`` conditions, every command taken as successful.
"""

from __future__ import annotations

import hashlib
from fnmatch import fnmatch
import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from pyinfra.api import Config, Inventory, State
from pyinfra.api.command import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.api.deploy import add_deploy
from pyinfra.api.host import Host
from pyinfra.connectors.util import CommandOutput
from pyinfra.context import ctx_host, ctx_state

FactTable = dict[str, Callable[..., Any] | Any]


@dataclass
class PlannedOp:
    name: str
    commands: list[str]  # readable form, for assertions
    raw: list = field(default_factory=list, repr=False)  # the pyinfra command objects


def _render(command) -> str:
    if isinstance(command, StringCommand):
        return command.get_raw_value()
    if isinstance(command, FileUploadCommand):
        src = command.src if isinstance(command.src, str) else "<generated>"
        return f"upload {src} -> {command.dest}"
    if isinstance(command, FunctionCommand):
        return f"function {command.function.__name__}"
    return repr(command)


def plan(deploy_func, *args, host_name: str, host_data: dict, facts: FactTable,
         executed: Callable[[PlannedOp], None] | None = None, **kwargs) -> list[PlannedOp]:
    """The operations ``deploy_func`` adds for one host and the commands each would run.

    ``executed`` is told of each operation as it "runs", so a simulated host can change its
    facts for the operations after it, as a real host does.
    """
    inventory = Inventory(([(host_name, dict(host_data))], {}))
    state = State(inventory, Config())

    def get_fact(self, fact_cls, *fact_args, **fact_kwargs):
        name = fact_cls.__name__
        if name not in facts:
            raise AssertionError(f"unexpected fact {name}({fact_args}, {fact_kwargs}) on {self.name}")
        answer = facts[name]
        return answer(*fact_args, **fact_kwargs) if callable(answer) else answer

    host = inventory.get_host(host_name)
    with mock.patch.object(Host, "get_fact", get_fact), ctx_state.use(state), ctx_host.use(host):
        add_deploy(state, deploy_func, *args, host=host, **kwargs)
        # Execute in order as if every command succeeded, so ``_if=`` conditions see what
        # earlier operations did, exactly as in a real run.
        state.is_executing = True
        ops = []
        for op_hash in state.get_op_order():
            if op_hash not in state.ops[host]:
                continue
            op_data = state.ops[host][op_hash]
            commands = list(op_data.command_generator())
            op_data.operation_meta.set_complete(True, commands, CommandOutput([]))
            ops.append(PlannedOp(name=", ".join(state.get_op_meta(op_hash).names),
                                 commands=[_render(c) for c in commands], raw=commands))
            if executed:
                executed(ops[-1])
    return ops


def changed(ops: list[PlannedOp]) -> list[PlannedOp]:
    return [op for op in ops if op.commands]


class SimulatedHost:
    """A host's state as facts, updated by the commands a deploy runs on it.

    Only the commands vllm-fleet's roles emit are understood (uploads, mkdir, chmod, ln,
    useradd, apt-get install, systemctl, writing a digest file); the point is a second run
    against exactly the state the first run left, not a shell emulator.
    """

    APT_STAMP = "/var/lib/apt/periodic/update-success-stamp"

    def __init__(self, distro: dict, nproc: int = 8, smoke_ok: bool = True, gpu: "GpuState | None" = None):
        self.distro = distro
        self.nproc = nproc
        self.gpu = gpu or GpuState(pci_gpus=0)
        self.smoke_ok = smoke_ok  # what the fleet probe reports when the smoke test asks
        self.files: dict[str, dict] = {}  # path -> {"sha1", "mode", "lines"}
        self.dirs: dict[str, str] = {d: "root" for d in ("/", "/etc", "/tmp", "/usr/local/lib", "/etc/systemd/system")}
        self.links: dict[str, str] = {}
        self.users: dict[str, dict] = {"root": self._user("/root", "/bin/bash", "root")}
        self.packages: dict[str, list[str]] = {}
        self.running: set[str] = set()
        self._writes = 0  # order of files written by commands, for "newest first" facts
        self.enabled: set[str] = set()

    @staticmethod
    def _user(home, shell, group):
        return {"home": home, "shell": shell, "group": group, "groups": [], "comment": None, "password": None}

    # -- facts ----------------------------------------------------------------------------------
    def facts(self) -> FactTable:
        def file(path):
            f = self.files.get(path)
            return {"mode": f["mode"], "user": "root", "group": "root", "mtime": datetime.now()} if f else None

        def digest(path):
            f = self.files.get(path)
            return f["sha1"] if f else None

        def contents(path):
            f = self.files.get(path)
            return f["lines"] if f and f["lines"] is not None else None

        def directory(path):
            owner = self.dirs.get(path.rstrip("/"))
            return {"mode": 755, "user": owner, "group": owner} if owner else None

        def link(path):
            return {"link_target": self.links[path], "mode": 777} if path in self.links else None

        return {
            "LinuxDistribution": self.distro, "Os": "Linux", "LinuxName": self.distro["name"], "TmpDir": "/tmp",
            "Which": lambda command: f"/usr/sbin/{command}", "Date": datetime.now(), "Command": lambda command: self._command(command),
            "File": file, "Directory": directory, "Link": link, "FileContents": contents,
            "Sha1File": digest, "Md5File": lambda path: None, "Sha256File": lambda path: None,
            "FindFiles": lambda path, fname="*", maxdepth=None: sorted(
                f for f in self.files if f.startswith(path.rstrip("/") + "/") and fnmatch(Path(f).name, fname)),
            "InstalledReleases": lambda venvs_dir: sorted(
                (f.rsplit("/", 1)[0] for f in self.files if f.startswith(venvs_dir + "/") and f.endswith("/.lock-digest")),
                key=lambda d: -self.files[d + "/.lock-digest"]["order"]),
            "Users": self.users, "Groups": [], "DebPackages": self.packages,
            "PciNvidia": {"gpus": self.gpu.pci_gpus, "nvswitches": self.gpu.nvswitches},
            "NvidiaModuleVersion": lambda: self.gpu.loaded, "SecureBoot": self.gpu.secure_boot,
            "AptHolds": lambda: sorted(self.gpu.holds), "KernelVersion": "6.8.0-45-generic",
            "SystemdStatus": lambda *a, **k: {u: True for u in self.running},
            "SystemdEnabled": lambda *a, **k: {u: True for u in self.enabled},
        }

    def _pinned_driver(self) -> str | None:
        """The version the apt pin file holds the driver to (what apt would install)."""
        pin = self.files.get("/etc/apt/preferences.d/nvidia-driver")
        line = next((l for l in (pin or {}).get("lines", []) if l.startswith("Pin: version ")), None)
        return line.split()[2].rstrip("-*") if line else None

    def _command(self, command: str) -> str:
        if command == "nproc":
            return str(self.nproc)
        if command.startswith("test -d /sys/module/nouveau"):
            return "yes" if self.gpu.nouveau_loaded else "no"
        if "gpu_probe.py readings" in command:
            return json.dumps(self.gpu.readings)
        if "gpu_probe.py burnin" in command:
            return json.dumps(self.gpu.burnin)
        if "fleet_probe.py smoke" in command:
            return json.dumps({"ok": self.smoke_ok, "results": [{"check": "x", "ok": self.smoke_ok}]})
        raise AssertionError(f"unexpected Command fact: {command}")

    # -- commands -------------------------------------------------------------------------------
    def apply(self, ops: list[PlannedOp]) -> None:
        for op in ops:
            for command in op.raw:
                if isinstance(command, FileUploadCommand):
                    self._upload(command)
                elif isinstance(command, StringCommand):
                    for part in command.get_raw_value().split(" && "):
                        self._shell(shlex.split(part))

    def _upload(self, command: FileUploadCommand) -> None:
        src = command.src
        data = Path(src).read_bytes() if isinstance(src, str) else _io_bytes(src)
        self.files[command.dest] = {"sha1": hashlib.sha1(data).hexdigest(), "mode": 644,
                                    "lines": data.decode(errors="replace").splitlines()}

    def _shell(self, argv: list[str]) -> None:
        if not argv:
            return
        cmd, args = argv[0], argv[1:]
        if cmd == "mkdir":
            for a in args:
                if not a.startswith("-"):
                    self.dirs.setdefault(a.rstrip("/"), "root")
        elif cmd == "chown" and args[0] != "-R":
            if args[1].rstrip("/") in self.dirs:
                self.dirs[args[1].rstrip("/")] = args[0].split(":")[0]
        elif cmd == "chmod" and args[0] != "-R":
            if args[1] in self.files:
                self.files[args[1]]["mode"] = int(args[0])
        elif cmd == "ln":
            self.links[args[-1]] = args[-2]
        elif cmd == "rm" and args[-1] in self.links:
            del self.links[args[-1]]
        elif cmd == "rm" and args[-1] in self.files:
            del self.files[args[-1]]
        elif cmd == "useradd":
            opts = dict(zip(args[::2], args[1::2]))
            self.users[args[-1]] = self._user(opts.get("-d"), opts.get("-s"), args[-1])
        elif cmd == "touch" and args[-1] == self.APT_STAMP:
            self.files[self.APT_STAMP] = {"sha1": "", "mode": 644, "lines": []}
        elif cmd in ("echo", "printf") and ">" in args:
            value = args[args.index(">") - 1]
            self._writes += 1
            self.files[args[-1]] = {"sha1": "", "mode": 644, "lines": [value], "order": self._writes}
        elif cmd == "rm" and args[0] == "-rf":
            for path in args[1:]:
                for f in [f for f in self.files if f == path or f.startswith(path + "/")]:
                    del self.files[f]
        elif "DEBIAN_FRONTEND=noninteractive" in cmd and "install" in args:
            for name in args[args.index("install") + 1:]:
                if not name.startswith("-") and "=" not in name and name != "-o":
                    self.packages[name] = ["1.0"]
                    if name.startswith(("nvidia-headless-", "nvidia-driver-cuda")):
                        self.gpu.installed = self._pinned_driver()
                    if name == "nginx":  # Debian's and Ubuntu's package: default site, enabled and started
                        self.links["/etc/nginx/sites-enabled/default"] = "/etc/nginx/sites-available/default"
                        self.running.add("nginx.service")
                        self.enabled.add("nginx.service")
        elif cmd == "mv" and args[-2] in self.links:
            self.links[args[-1]] = self.links.pop(args[-2])
        elif cmd == "mv":
            self.files[args[-1]] = self.files.pop(args[-2], {"sha1": "", "mode": 644, "lines": []})
        elif cmd == "apt-mark" and args[0] == "hold":
            self.gpu.holds.update(args[1:])
        elif cmd == "reboot" or cmd == "modprobe" and args == ["nvidia"]:
            self.gpu.loaded, self.gpu.nouveau_loaded = self.gpu.installed, False
        elif cmd == "systemctl" and len(args) == 2:
            action, unit = args
            if action in ("start", "restart", "reload"):
                self.running.add(unit)
            elif action == "enable":
                self.enabled.add(unit)
            elif action == "stop":
                self.running.discard(unit)
            elif action == "disable":
                self.enabled.discard(unit)


@dataclass
class GpuState:
    """The NVIDIA side of a simulated host: hardware, firmware, what the kernel has loaded."""

    pci_gpus: int
    nvswitches: int = 0
    secure_boot: bool = False
    loaded: str | None = None  # version of the loaded nvidia module
    nouveau_loaded: bool = True  # a fresh install: the in-tree driver has the GPUs
    installed: str | None = None  # driver version the packages put on disk
    holds: set = field(default_factory=set)
    readings: dict = field(default_factory=dict)  # what gpu_probe.py readings prints
    burnin: dict = field(default_factory=dict)


def _io_bytes(stream) -> bytes:
    stream.seek(0)
    data = stream.read()
    stream.seek(0)
    return data.encode() if isinstance(data, str) else data


def debian(major: int) -> dict:
    return {"name": "Debian", "major": major, "minor": None, "release_meta": {"ID": "debian"}}


def ubuntu(major: int, minor: int) -> dict:
    return {"name": "Ubuntu", "major": major, "minor": minor, "release_meta": {"ID": "ubuntu"}}
