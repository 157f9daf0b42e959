"""Run a ``@deploy`` against a host whose facts are given, and list the commands it would run.

No connection is made: ``Host.get_fact`` is answered from a table, and an unexpected fact
fails the test (so a test states every fact the role reads). The deploy goes through
pyinfra's own prepare phase, then each operation's commands are generated in order with
execution-time ``_if=`` conditions, every command taken as successful.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from pyinfra.api import Config, Inventory, State
from pyinfra.api.command import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.api.host import Host
from pyinfra.api.state import StateStage
from pyinfra.api.util import PYINFRA_INSTALL_DIR
from pyinfra.connectors.util import CommandOutput, OutputLine
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


def _op_order_from_code(state) -> list[int]:
    """pyinfra's CLI operation order (line numbers of the calling code, outermost first, pyinfra's
    and other installed packages' frames left out), without ``inspect.stack()``'s source reads,
    which make a deploy of a hundred operations take seconds."""
    lines, frame = [], sys._getframe(1)
    while frame is not None:
        if not frame.f_code.co_filename.startswith(PYINFRA_INSTALL_DIR):
            lines.append(frame.f_lineno)
        frame = frame.f_back
    return [state.current_op_file_number, *reversed(lines)]


def run_fleet(deploy_func, *args, hosts: dict[str, tuple[dict, "SimulatedHost"]], **kwargs) -> list[tuple[str, PlannedOp]]:
    """Run ``deploy_func`` for several simulated hosts as one pyinfra run: every operation in
    pyinfra's fleet-wide order, each host's commands applied to its simulated host as they are
    generated (so facts read after a command see its effect), execute-time ``_if=`` included.
    Returns (host name, operation) in the order they ran."""
    inventory = Inventory(([(name, dict(data)) for name, (data, _) in hosts.items()], {}))
    state = State(inventory, Config())
    sims = {name: sim for name, (_, sim) in hosts.items()}

    def get_fact(self, fact_cls, *fact_args, **fact_kwargs):
        facts = sims[self.name].facts()
        name = fact_cls.__name__
        if name not in facts:
            raise AssertionError(f"unexpected fact {name}({fact_args}, {fact_kwargs}) on {self.name}")
        answer = facts[name]
        return answer(*fact_args, **fact_kwargs) if callable(answer) else answer

    def run_shell_command(self, command, **_):
        return sims[self.name].run(command.get_raw_value())

    timeline = []
    # CLI mode: operations are identified by their place in the code (as when pyinfra runs a
    # deploy file), so the same call on two hosts is one fleet-wide operation.
    with mock.patch.object(Host, "get_fact", get_fact), mock.patch.object(Host, "run_shell_command", run_shell_command), \
            mock.patch("pyinfra.is_cli", True), \
            mock.patch("pyinfra.api.operation.get_operation_order_from_stack", _op_order_from_code), ctx_state.use(state):
        state.set_stage(StateStage.Prepare)
        for host in inventory:
            # What pyinfra's CLI does with a deploy file: run it once per host, in that host's context.
            with ctx_host.use(host):
                deploy_func(*args, **kwargs)
        state.set_stage(StateStage.Execute)
        state.is_executing = True
        for op_hash in state.get_op_order():
            for host in inventory:
                if op_hash not in state.ops[host]:
                    continue
                op_data = state.ops[host][op_hash]
                commands = []
                with ctx_host.use(host):
                    for command in op_data.command_generator():
                        commands.append(command)
                        if isinstance(command, FunctionCommand):
                            # vllm-fleet's callbacks run against the simulated host; pyinfra's own
                            # (reboot waits) need a live connection, and the command before them
                            # already changed the simulated state.
                            if command.function.__module__.startswith("roles."):
                                command.execute(state, host, {})
                        else:
                            sims[host.name].apply_command(command)
                op_data.operation_meta.set_complete(True, commands, CommandOutput([]))
                timeline.append((host.name, PlannedOp(name=", ".join(state.get_op_meta(op_hash).names),
                                                      commands=[_render(c) for c in commands], raw=commands)))
    return timeline


def plan(deploy_func, *args, host_name: str, host_data: dict, sim: "SimulatedHost", **kwargs) -> list[PlannedOp]:
    """The operations ``deploy_func`` runs on one simulated host, and their commands."""
    return [op for _, op in run_fleet(deploy_func, *args, hosts={host_name: (host_data, sim)}, **kwargs)]


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
        self.dir_modes: dict[str, int] = {}
        self.users: dict[str, dict] = {"root": self._user("/root", "/bin/bash", "root")}
        self.packages: dict[str, list[str]] = {}
        self.running: set[str] = set()
        self._writes = 0  # order of files written by commands, for "newest first" facts
        self.enabled: set[str] = set()
        self.restarts: list[str] = []  # instances restarted by the rollout's switch, in order
        self.drained: list[list[str]] = []  # upstreams nginx was asked to drain, per take-out
        self.failing_releases: set[str] = set()  # release venvs whose engine fails to start
        self.refused_flags: dict[str, str] = {}  # instance -> what a new release's parser says of its flags

    @staticmethod
    def _user(home, shell, group):
        return {"home": home, "shell": shell, "group": group, "groups": [], "comment": None, "password": None}

    # -- facts ----------------------------------------------------------------------------------
    def facts(self) -> FactTable:
        def file(path):
            f = self.files.get(path)
            return {"mode": f["mode"], "user": "root", "group": "root", "mtime": f.get("mtime", datetime.now())} if f else None

        def digest(path):
            f = self.files.get(path)
            return f["sha1"] if f else None

        def contents(path):
            f = self.files.get(path)
            return f["lines"] if f and f["lines"] is not None else None

        def directory(path):
            owner = self.dirs.get(path.rstrip("/"))
            mode = self.dir_modes.get(path.rstrip("/"), 755)
            return {"mode": mode, "user": owner, "group": owner} if owner else None

        def link(path):
            return {"link_target": self.links[path], "mode": 777} if path in self.links else None

        return {
            "LinuxDistribution": self.distro, "Os": "Linux", "LinuxName": self.distro["name"], "TmpDir": "/tmp",
            "Which": lambda command: f"/usr/sbin/{command}", "Date": datetime.now(), "Command": lambda command: self._command(command),
            "File": file, "Directory": directory, "Link": link, "FileContents": contents,
            "Sha1File": digest, "Md5File": lambda path: None, "Sha256File": lambda path: None,
            "FindFiles": lambda path, fname="*", maxdepth=None: sorted(
                f for f in self.files if f.startswith(path.rstrip("/") + "/") and fnmatch(Path(f).name, fname)),
            "CompleteDirs": lambda parent, marker: sorted(
                (f.rsplit("/", 1)[0] for f in self.files if f.startswith(parent + "/") and f.endswith("/" + marker)),
                key=lambda d: -self.files[f"{d}/{marker}"]["order"]),
            "InstanceModels": lambda env_dir: {
                line.split("--model ")[1].split()[0] for path, f in self.files.items()
                if path.startswith(env_dir + "/") and path.endswith(".env") for line in f["lines"] if "--model " in line},
            "Users": self.users, "Groups": [], "DebPackages": self.packages,
            "PciNvidia": {"gpus": self.gpu.pci_gpus, "nvswitches": self.gpu.nvswitches},
            "NvidiaModuleVersion": lambda: self.gpu.loaded, "SecureBoot": self.gpu.secure_boot,
            "AptHolds": lambda: sorted(self.gpu.holds), "KernelVersion": "6.8.0-45-generic",
            "SystemdStatus": lambda *a, **k: {u: True for u in self.running},
            "InstanceReleases": lambda links_dir: {
                Path(l).name: {"venv": t, "release": (self.files.get(f"{t}/.release") or {"lines": [Path(t).name]})["lines"][0]}
                for l, t in self.links.items() if l.startswith(links_dir + "/")},
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
        if "check_engine_args.py" in command:
            asked = json.loads(shlex.split(command)[-1])
            return json.dumps({name: self.refused_flags.get(name) for name in asked})
        if "fleet_probe.py smoke" in command:
            return json.dumps({"ok": self.smoke_ok, "results": [{"check": "x", "ok": self.smoke_ok}]})
        raise AssertionError(f"unexpected Command fact: {command}")

    # -- commands -------------------------------------------------------------------------------
    def apply_command(self, command) -> None:
        if isinstance(command, FileUploadCommand):
            self._upload(command)
        elif isinstance(command, StringCommand):
            for part in command.get_raw_value().split(" && "):
                self._shell(shlex.split(part))

    def run(self, command: str) -> tuple[bool, CommandOutput]:
        """What a command run by a Python callback (the rollout's switch) prints."""
        argv = shlex.split(command)
        if argv[1].endswith("fleet_probe.py") and argv[2] == "switch":
            opts = dict(zip(argv[3::2], argv[4::2]))
            result = self._switch(opts["--name"], opts["--env-dir"], opts["--link"], opts["--target"])
            return True, CommandOutput([OutputLine("stdout", "RESULT " + json.dumps(result))])
        if argv[1].endswith("fleet_probe.py") and argv[2] == "reload-and-drain":
            self.drained.append([argv[i + 1] for i, a in enumerate(argv) if a == "--upstream"])
            return True, CommandOutput([OutputLine("stdout", "drained")])
        raise AssertionError(f"unexpected command: {command}")

    def _switch(self, name: str, env_dir: str, link: str, target: str) -> dict:
        """fleet_probe.py switch: the staged environment and the release become the instance's and
        it restarts; an instance on a release in ``failing_releases`` does not come up, so the
        previous ones come back."""
        env, staged = f"{env_dir}/{name}.env", f"{env_dir}/{name}.env.next"
        previous = self.files[env], self.links.get(link)
        self.files[env] = self.files.pop(staged)
        self.links[link] = target
        self.restarts.append(name)
        if target not in self.failing_releases:
            return {"outcome": "switched", "detail": f"vllm@{name} serves from {target}", "seconds": 1.0}
        self.files[env], self.links[link] = previous
        self.restarts.append(name)
        return {"outcome": "reverted", "detail": f"vllm@{name} did not become healthy", "seconds": 2.0}

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
            elif args[1].rstrip("/") in self.dirs:
                self.dir_modes[args[1].rstrip("/")] = int(args[0])
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
        elif cmd == "systemctl" and args[:2] == ["enable", "--now"]:
            self.enabled.add(args[2] + ".service")
            self.running.add(args[2] + ".service")
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
