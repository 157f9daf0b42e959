"""A simulated fleet host for the deploy tests: its state (files, packages, units, GPUs, the
firewall), what each fact's command would print in that state, and how each command a deploy
runs changes it. An unexpected fact or command fails the test."""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
from collections.abc import Callable
from datetime import datetime
from fnmatch import fnmatch
from pathlib import Path

import yaml
from pyinfra.api.command import FileUploadCommand, StringCommand
from pyinfra.connectors.util import CommandOutput, OutputLine
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import MISSING, Directory, File, FileContents, FindFiles, Link, Sha1File, Sha256File
from pyinfra.facts.server import (
    ISO_DATE_FORMAT,
    Command,
    Date,
    Groups,
    KernelVersion,
    LinuxDistribution,
    Os,
    TmpDir,
    Users,
    Which,
)
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

from roles import facts, firewall, paths
from tests.deploy.package_effects import PACKAGE_EFFECTS
from tests.deploy.probe_args import probe_args
from tests.deploy.sim_artifacts import ArtifactCommands, ArtifactState, shell_parts
from tests.deploy.sim_gpu import GpuState
from tests.deploy.sim_group import GroupCommands

UNIT_DIR = "/etc/systemd/system"


class SimulatedHost(ArtifactCommands, GroupCommands):
    """A host's state, read by facts through what their commands would print, and updated by
    the commands a deploy runs on it.

    Only the commands vllm-fleet's roles emit are understood (uploads, mkdir, chmod, ln, install
    of an empty private file, mv, useradd, apt-get install, systemctl, nft, promtool, amtool,
    writing a digest file); the point is a second run against exactly the state the first run left, not a
    shell emulator. The fleet probe's commands are read by the probe's own argument parser.
    """

    APT_STAMP = "/var/lib/apt/periodic/update-success-stamp"
    SSHD = ("port 22", "listenaddress 0.0.0.0:22", "connection 10.9.0.1 50000 10.9.0.11 22")

    def __init__(self, distro: dict, nproc: int = 8, smoke_ok: bool = True, gpu: "GpuState | None" = None,
                 sshd: list[str] | None = None):
        self.distro = distro
        self.nproc = nproc
        self.gpu = gpu or GpuState(pci_gpus=0)
        self.smoke_ok = smoke_ok  # what the fleet probe reports when the smoke test asks
        self.files: dict[str, dict] = {}  # path -> {"sha1", "sha256", "mode", "user", "lines"}
        self.uploads: list[tuple[str, int, str]] = []  # (path, its mode as the bytes landed, text), in order
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
        self.sshd = list(self.SSHD if sshd is None else sshd)  # what SshPorts' command prints: sshd -T, the connection
        self.table = False  # whether the kernel's ruleset holds vllm-fleet's table
        self.checked: list[str] = []  # files `nft -c` checked, in order
        self.promtool: list[tuple[str, str]] = []  # (rules or config, file) promtool checked, in order
        self.amtool: list[tuple[str, dict]] = []  # (file, the file as it was then) amtool checked, in order
        self.refusing: set[str] = set()  # checkers (amtool) that refuse every file here: CheckRefused
        self.smoked: list[argparse.Namespace] = []  # the smoke tests run, as the probe read their arguments
        self.provider = {"ok": True, "reachable": True, "problem": ""}  # what the provider probe finds from here
        self.provider_probes: list[list[str]] = []  # the provider probes run, their argv
        self.loaded_units: dict[str, str] = {}  # unit file -> its sha1 when systemd last loaded it
        self.oneshots: list[str] = []  # oneshot services run (started, then done), in order
        self.artifacts = ArtifactState()  # fetches and checks of roles/files/artifacts.py
        self.waited: list[str] = []  # units fleet_probe wait waited for, in order
        self.init_group_state()

    @staticmethod
    def _user(home, shell, group):
        return {"home": home, "shell": shell, "group": group, "groups": []}

    # -- facts ----------------------------------------------------------------------------------
    def fact(self, fact_cls, *args, **kwargs):
        """What pyinfra's ``get_fact`` returns on this host: the lines the fact's command would
        print here, read by the fact's own ``process()`` (its ``default()`` when the command
        prints nothing, as pyinfra does)."""
        output = self.outputs().get(fact_cls)
        if output is None:
            raise AssertionError(f"unexpected fact {fact_cls.__name__}({args}, {kwargs})")
        fact = fact_cls()
        # As pyinfra does before reading the output: FileContents and the hash facts keep what
        # process() compares against, and a wrong argument fails here as on a real host.
        fact.command(*args, **kwargs)
        lines = output(*args, **kwargs)
        return fact.process(lines) if lines else fact.default()

    def outputs(self) -> dict[type, Callable[..., list[str]]]:
        """What each fact's command prints on this host, for the fact's arguments."""
        return {
            LinuxDistribution: self._os_release, Os: lambda: ["Linux"], TmpDir: lambda: ["/tmp"],
            KernelVersion: lambda: ["6.8.0-45-generic"], Which: lambda command: [f"/usr/sbin/{command}"],
            Date: lambda: [datetime.now().astimezone().strftime(ISO_DATE_FORMAT)],
            Command: lambda command: self._command(command).splitlines(),
            File: self._stat, Directory: self._stat, Link: self._stat,
            # For a missing file FileContents' command echoes pyinfra's marker and the path.
            FileContents: lambda path: self.files[path]["lines"] if path in self.files else [MISSING + path],
            Sha1File: lambda path: [f"{self.files[path]['sha1']}  {path}"] if path in self.files else [],
            Sha256File: lambda path: [f"{self.files[path]['sha256']}  {path}"] if path in self.files else [],
            FindFiles: lambda path, fname="*", maxdepth=None: sorted(
                f for f in self.files if fnmatch(Path(f).name, fname)
                and Path(path) in Path(f).parents[:maxdepth]),
            Users: self._users, Groups: lambda: [f"{group}:x:{gid}:" for gid, group in enumerate(dict.fromkeys(
                u["group"] for u in self.users.values()))],
            DebPackages: lambda: [f"{'h' if name in self.gpu.holds else 'i'}i  {name}  {version}  amd64  simulated"
                                  for name, versions in self.packages.items() for version in versions],
            SystemdStatus: lambda services=None, **_: self._systemctl_show(
                services, "SubState", self.running, ("running", "dead")),
            SystemdEnabled: lambda services=None, **_: self._systemctl_show(
                services, "UnitFileState", self.enabled, ("enabled", "disabled")),
            facts.PciNvidia: lambda: ["0x030200"] * self.gpu.pci_gpus + ["0x068000"] * self.gpu.nvswitches,
            facts.NvidiaModuleVersion: lambda: [self.gpu.loaded] if self.gpu.loaded else [],
            facts.SecureBoot: lambda: [f"SecureBoot {'enabled' if self.gpu.secure_boot else 'disabled'}"],
            facts.AptHolds: lambda: sorted(self.gpu.holds),
            facts.CompleteDirs: self._complete_dirs, facts.InstanceReleases: self._instance_links,
            facts.LocalPortRange: lambda: ["32768\t60999"],
            facts.InstanceModels: lambda env_dir: [line for path, f in sorted(self.files.items())
                                                   if Path(path).parent == Path(env_dir) and path.endswith(".env")
                                                   for line in f["lines"] if line.startswith("ENGINE_ARGS=")],
            firewall.FirewallTable: lambda: ["loaded"] if self.table else [],
            firewall.SshPorts: lambda: self.sshd,
            facts.FileSizes: self.file_sizes,
        }

    def _os_release(self) -> list[str]:
        """``/etc/*-release`` as LinuxDistribution's command prints it: each file's name, its
        lines, then ``---``."""
        major, minor = self.distro["major"], self.distro["minor"]
        version = f"{major}" if minor is None else f"{major}.{minor:02d}"
        return ["/etc/os-release", f'NAME="{self.distro["name"]}"', f"ID={self.distro['release_meta']['ID']}",
                f'VERSION_ID="{version}"', "---"]

    def _users(self) -> list[str]:
        """Users' command: each /etc/passwd line, then the primary group, all groups, last login
        and password hash."""
        return [(f"{name}:x:{uid}:{uid}::{u['home'] or ''}:{u['shell'] or ''}|{u['group']}|"
                 f"{' '.join([u['group'], *u['groups']])}||") for uid, (name, u) in enumerate(self.users.items())]

    def _stat(self, path: str) -> list[str]:
        """``stat -c 'user=%U group=%G mode=%A ...' path``, as File, Directory and Link run it."""
        path = path.rstrip("/") or "/"
        if path in self.links:
            kind, owner, mode, name = "l", "root", 777, f"'{path}' -> '{self.links[path]}'"
        elif path in self.files:
            kind, owner, mode, name = "-", self.files[path]["user"], self.files[path]["mode"], f"'{path}'"
        elif path in self.dirs:
            kind, owner, mode, name = "d", self.dirs[path], self.dir_modes.get(path, 755), f"'{path}'"
        else:
            return []  # the command's test for the path fails: nothing printed
        group = self.files.get(path, {}).get("group", owner)
        mtime = int(self.files.get(path, {}).get("mtime", datetime.now()).timestamp())
        perms = "".join("rwx"[i] if int(digit) & (4 >> i) else "-" for digit in f"{mode:03d}" for i in range(3))
        times = f"atime={mtime} mtime={mtime} ctime={mtime}"
        return [f"user={owner} group={group} mode={kind}{perms} {times} size=0 {name}"]

    def _systemctl_show(self, services, prop: str, on: set[str], values: tuple[str, str]) -> list[str]:
        """``systemctl show --property Id --property PROP UNIT...``: a block per unit asked for, or
        per unit the host knows when none is named."""
        units = [services] if isinstance(services, str) else services or sorted(self.running | self.enabled)
        return [line for unit in units
                for line in (f"Id={unit}", f"{prop}={values[0] if unit in on else values[1]}", "")]

    def _complete_dirs(self, parent: str, marker: str) -> list[str]:
        """``ls -1t PARENT/*/MARKER``: the markers one folder down, newest first."""
        found = [f for f in self.files if Path(f).name == marker and Path(f).parent.parent == Path(parent)]
        return sorted(found, key=lambda f: -self.files[f]["order"])

    def _instance_links(self, links_dir: str) -> list[str]:
        """``echo "NAME $(readlink L) $(cat L/.release)"`` for each link in the folder."""
        lines = []
        for link, target in sorted(self.links.items()):
            if Path(link).parent == Path(links_dir):
                release = self.files.get(f"{target}/.release", {"lines": [""]})["lines"][0]
                lines.append(f"{Path(link).name} {target} {release}")
        return lines

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
        if command.startswith("ip -o addr show to "):
            return self.interface
        if "check_engine_args.py" in command:
            asked = json.loads(shlex.split(command)[-1])
            return json.dumps({name: self.refused_flags.get(name) for name in asked})
        argv = shlex.split(command)
        if argv[:2] == ["python3", paths.PROVIDER_PROBE_PATH]:
            key = self.files.get(argv[argv.index("--key-file") + 1])
            assert key is not None and key["mode"] == 600, f"the provider probe reads no root-only key: {argv}"
            self.provider_probes.append(argv)
            return json.dumps(self.provider)
        if argv[:3] == ["python3", paths.ARTIFACTS_PATH, "unlisted"]:
            return self.unlisted(argv)
        if argv[:3] == ["python3", paths.FLEET_PROBE_PATH, "smoke"]:
            self._smoke(argv)
            return json.dumps({"ok": self.smoke_ok, "results": [{"check": "x", "ok": self.smoke_ok}]})
        raise AssertionError(f"unexpected Command fact: {command}")

    def _smoke(self, argv: list[str]) -> None:
        """fleet_probe.py smoke: the instances' own address is given, and the edge is tried over
        TLS with a name, the certificate nginx serves and the root-only smoke key (no key on the
        command line)."""
        args = probe_args(argv)
        if args.instance:
            assert "--address" in argv, f"the smoke test would try the instances on loopback: {argv}"
        if args.lb_port is not None:
            assert args.lb_name and args.model, argv
            assert args.lb_ca in self.files, f"the smoke test checks the edge against a missing {args.lb_ca}"
            key = self.files.get(args.lb_key_file)
            assert key is not None and key["mode"] == 600 and key["user"] == "root", \
                f"the smoke key {args.lb_key_file} is not a root-only file here: {key and key['mode']}"
        self.smoked.append(args)

    # -- commands -------------------------------------------------------------------------------
    def apply_command(self, command) -> None:
        if isinstance(command, FileUploadCommand):
            self._upload(command)
        elif isinstance(command, StringCommand):
            for argv in shell_parts(command.get_raw_value()):
                self._shell(argv)

    def run(self, command: str) -> tuple[bool, CommandOutput]:
        """What a command run by a Python callback (the rollout's switch) prints."""
        if command.startswith(f"systemctl stop {paths.GROUP_WATCH_UNIT}; "):
            return self._watched_switch(command)
        argv = shlex.split(command)
        if argv[:3] == ["python3", paths.FLEET_PROBE_PATH, "switch"]:
            args = probe_args(argv)
            assert "--address" in argv, f"the switch would prove the instance on loopback: {argv}"
            self.switches.append((args, paths.GROUP_WATCH_UNIT in self.running))
            result = self._switch(args.name, args.env_dir, args.link, args.target)
            return True, CommandOutput([OutputLine("stdout", "RESULT " + json.dumps(result))])
        if argv[:3] == ["python3", paths.FLEET_PROBE_PATH, "reload-and-drain"]:
            self.drained.append(probe_args(argv).upstream)
            return True, CommandOutput([OutputLine("stdout", "drained")])
        if argv[:3] == ["python3", paths.FLEET_PROBE_PATH, "wait"]:  # a first start's, logged
            self._shell(argv)
            return True, CommandOutput([OutputLine("stdout", f"{probe_args(argv).unit}: healthy")])
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
        """The bytes land in the file as it is (SFTP, or sudo's `cp` from a temporary file, keep an
        existing file's mode and owner), else in a new one, 0644."""
        src = command.src
        data = Path(src).read_bytes() if isinstance(src, str) else _io_bytes(src)
        before = self.files.get(command.dest, {"mode": 644, "user": "root"})
        self.files[command.dest] = _file(data, mode=before["mode"], user=before["user"],
                                         group=before.get("group", before["user"]))
        self.uploads.append((command.dest, before["mode"], data.decode(errors="replace")))

    def _shell(self, argv: list[str]) -> None:
        if not argv:
            return
        cmd, args = argv[0], argv[1:]
        if not (cmd == "mv" and args[-2] in self.links) and self.artifact_shell(argv) or self.group_shell(argv):
            return
        if cmd == "mkdir":
            for a in args:
                if not a.startswith("-"):
                    self.dirs.setdefault(a.rstrip("/"), "root")
        elif cmd == "chown" and args[0] != "-R":
            user, _, group = args[0].partition(":")
            if args[1] in self.files:
                self.files[args[1]].update(user=user, group=group or self.files[args[1]].get("group", user))
            elif args[1].rstrip("/") in self.dirs:
                self.dirs[args[1].rstrip("/")] = user
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
            self.files[self.APT_STAMP] = _written([])
        elif cmd in ("echo", "printf") and ">" in args:
            value = args[args.index(">") - 1]
            self._writes += 1
            self.files[args[-1]] = _written([value], order=self._writes)
        elif cmd == "rm" and args[0] == "-rf":
            for path in args[1:]:
                for f in [f for f in self.files if f == path or f.startswith(path + "/")]:
                    del self.files[f]
        elif "DEBIAN_FRONTEND=noninteractive" in cmd and "install" in args:
            self._apt_install(args[args.index("install") + 1:])
        elif cmd == "install":
            self._install(args)
        elif Path(cmd).name == "nft":
            self._nft(args)
        elif cmd == "promtool":
            self._promtool(args)
        elif cmd == "amtool":
            self._amtool(args)
        elif cmd == "python3" and args[:2] == [paths.FLEET_PROBE_PATH, "wait"]:
            unit = probe_args(argv).unit
            assert "--address" in args, f"the wait would ask loopback, where {unit} does not listen: {argv}"
            assert f"{unit}.service" in self.running, f"waiting for {unit}, which is not running"
            self.waited.append(unit)
        elif cmd == "mv" and args[-2] in self.links:
            self.links[args[-1]] = self.links.pop(args[-2])
        elif cmd == "mv":
            # A source the simulation never wrote is files.download's temporary file: not fetched here.
            self.files[args[-1]] = self.files.pop(args[-2], None) or _written([])
        elif cmd == "apt-mark" and args[0] == "hold":
            self.gpu.holds.update(args[1:])
        elif cmd == "reboot" or cmd == "modprobe" and args == ["nvidia"]:
            self.gpu.loaded, self.gpu.nouveau_loaded = self.gpu.installed, False
        elif cmd == "systemctl":
            self._systemctl(args)

    def _apt_install(self, args: list[str]) -> None:
        """``apt-get ... install [OPTIONS] PACKAGE[=VERSION]...``: each package installed (at its
        version, else 1.0), with what its maintainer scripts do (``PACKAGE_EFFECTS``). A held
        package changes version only with --allow-change-held-packages, as apt-get refuses."""
        names = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-o")]
        for name, _, version in (n.partition("=") for n in names):
            version = version or "1.0"
            assert name not in self.gpu.holds or self.packages.get(name) == [version] or \
                "--allow-change-held-packages" in args, f"apt-get refuses to change held {name}: {args}"
            self.packages[name] = [version]
            if name.startswith(("nvidia-headless-", "nvidia-driver-cuda")):
                self.gpu.installed = self._pinned_driver()
            effects = PACKAGE_EFFECTS.get(name, {})
            for user in effects.get("users", ()):
                self.users.setdefault(user, self._user(f"/var/lib/{user}", "/usr/sbin/nologin", user))
            for folder in effects.get("dirs", ()):
                self.dirs.setdefault(folder, "root")
            self.links.update(effects.get("links", {}))
            self.running.update(effects.get("services", ()))
            self.enabled.update(effects.get("services", ()))

    def _systemctl(self, args: list[str]) -> None:
        if args == ["daemon-reload"]:
            self.loaded_units = {p: f["sha1"] for p, f in self.files.items() if Path(p).parent == Path(UNIT_DIR)}
        elif args[:2] == ["enable", "--now"]:
            self.enabled.add(args[2] + ".service")
            self.running.add(args[2] + ".service")
        elif len(args) == 2:
            action, unit = args
            if action in ("start", "restart", "reload", "reload-or-restart"):
                self._start(unit)
            elif action == "enable":
                self.enabled.add(unit)
            elif action == "stop":
                self.running.discard(unit)
                self.table = self.table and unit != paths.FIREWALL_UNIT  # its ExecStop deletes the table
            elif action == "disable":
                self.enabled.discard(unit)

    def _start(self, unit: str) -> None:
        """A unit of the deploy's own starts as systemd last loaded it: no change to its file since
        the last daemon-reload. A timer's service must be there; a oneshot service runs and is done
        (``oneshots``), nothing left running, unless it remains active after it exited."""
        path = f"{UNIT_DIR}/{unit}"
        if path in self.files:
            assert self.loaded_units.get(path) == self.files[path]["sha1"], \
                f"systemctl start {unit}: its file changed after the last daemon-reload"
            assert not unit.endswith(".timer") or path.replace(".timer", ".service") in self.loaded_units, unit
            if "Type=oneshot" in self.files[path]["lines"] and "RemainAfterExit=yes" not in self.files[path]["lines"]:
                self.oneshots.append(unit)
                return
        self.running.add(unit)
        # The firewall unit's ExecStart and ExecReload load the rules file: the table.
        self.table = self.table or unit == paths.FIREWALL_UNIT

    def _install(self, args: list[str]) -> None:
        """``install -m MODE [-o OWNER] [-g GROUP] /dev/null PATH``: an empty file, created with its
        mode (and owner and group) before anything is written into it. No other use of install is
        expected."""
        opts = dict(zip(args[:-2:2], args[1:-2:2]))
        assert args[-2] == "/dev/null" and set(opts) <= {"-m", "-o", "-g"} and "-m" in opts, \
            f"unexpected install {args}"
        owner, group = opts.get("-o", "root"), opts.get("-g", "root")
        assert group in {u["group"] for u in self.users.values()}, f"install -g {group}: no such group here"
        self.files[args[-1]] = _file(b"", mode=int(opts["-m"]), user="root" if owner == "${SUDO_USER:-root}" else owner,
                                     group=group)

    def _nft(self, args: list[str]) -> None:
        """``nft -c -f FILE`` (checks the file, loads nothing) and ``nft delete table ...``."""
        if args[:2] == ["-c", "-f"]:
            assert args[2] in self.files, f"nft -c -f {args[2]}: no such file"
            self.checked.append(args[2])
        elif args[:2] == ["delete", "table"] and " ".join(args[2:]) == firewall.TABLE:
            self.table = False
        else:
            raise AssertionError(f"unexpected nft {args}")

    def _promtool(self, args: list[str]) -> None:
        """``promtool check rules FILE`` and ``promtool check config FILE`` (which loads the rule
        files the configuration names: they must be in place already)."""
        assert len(args) == 3 and args[:2] in (["check", "rules"], ["check", "config"]), f"unexpected promtool {args}"
        kind, path = args[1], args[2]
        assert path in self.files, f"promtool check {kind} {path}: no such file"
        if kind == "config":
            config = yaml.safe_load("\n".join(self.files[path]["lines"]))
            for rules in config.get("rule_files") or ():
                assert rules in self.files, f"promtool check config {path}: its rule file {rules} is not there"
        self.promtool.append((kind, path))

    def _amtool(self, args: list[str]) -> None:
        """``amtool check-config FILE``, its output not shown (as roles/private_files.py runs a
        private file's check): the file as it was checked is recorded; a refusal, when amtool is in
        ``refusing``, fails the command."""
        assert args[0] == "check-config" and args[2:6] == [">", "/dev/null", "2>&1", "||"], f"unexpected amtool {args}"
        path = args[1]
        assert path in self.files, f"amtool check-config {path}: no such file"
        self.amtool.append((path, dict(self.files[path])))
        if "amtool" in self.refusing:
            raise CheckRefused(f"amtool check-config {path}")


class CheckRefused(Exception):
    """A checker refused a file: the command fails, and the deploy stops there."""


def _file(data: bytes, mode: int = 644, user: str = "root", **extra) -> dict:
    return {"sha1": hashlib.sha1(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest(), "mode": mode,
            "user": user, "size": len(data), "lines": data.decode(errors="replace").splitlines(), **extra}


def _written(lines: list[str], **extra) -> dict:
    """A file a shell command wrote (echo, printf '%s\\n', touch): newline-terminated lines."""
    return _file("".join(f"{line}\n" for line in lines).encode(), **extra)


def _io_bytes(stream) -> bytes:
    stream.seek(0)
    data = stream.read()
    stream.seek(0)
    return data.encode() if isinstance(data, str) else data


def debian(major: int) -> dict:
    return {"name": "Debian", "major": major, "minor": None, "release_meta": {"ID": "debian"}}


def ubuntu(major: int, minor: int) -> dict:
    return {"name": "Ubuntu", "major": major, "minor": minor, "release_meta": {"ID": "ubuntu"}}
