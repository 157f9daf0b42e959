"""What a simulated host does with the commands of an instance group (roles/group.py and the
rolling update's switch of a stage): mixed into SimulatedHost, whose ``_shell``, ``run`` and
``running`` it uses."""

from __future__ import annotations

import argparse
import shlex

from pyinfra.connectors.util import CommandOutput

from roles import paths
from tests.deploy.probe_args import probe_args


class CommandFailed(Exception):
    """A command failed on the host (its message: what it printed): pyinfra stops the host there."""


class GroupCommands:
    """The leader's rendezvous listener, a follower's reach of it, and a stage's switch with the
    group's watchdog stopped around it."""

    def init_group_state(self) -> None:
        # What `ip -o addr show to ADDRESS` names (empty: no interface holds the address), whether
        # the leader's master port answers from here, and what ran.
        self.interface = "eth0"
        self.reach_ok = True
        self.rendezvous: list[argparse.Namespace] = []  # fleet_probe listen and reach, as the probe read them
        self.switches: list[tuple[argparse.Namespace, bool]] = []  # (a switch's arguments, group watchdog running)

    def group_shell(self, argv: list[str]) -> bool:
        """Apply ``argv`` if it is one of the group's preflight commands; whether it was."""
        cmd, args = argv[0], argv[1:]
        if cmd == "if" and args[:3] == ["systemctl", "-q", "is-active"] and "listen" in args:
            self._listen(args)
        elif cmd == "python3" and args[:2] == [paths.FLEET_PROBE_PATH, "reach"]:
            self._reach(argv)
        else:
            return False
        return True

    def _watched_switch(self, command: str) -> tuple[bool, CommandOutput]:
        """A stage of an instance group switches with the group's watchdog stopped around it:
        ``systemctl stop WATCHDOG; SWITCH; switched=$?; systemctl start WATCHDOG; exit $switched``."""
        steps = command.split("; ")
        watch = paths.GROUP_WATCH_UNIT
        assert steps[2:] == ["switched=$?", f"systemctl start {watch}", "exit $switched"], command
        self._shell(shlex.split(steps[0]))
        result = self.run(steps[1])
        self._shell(shlex.split(steps[3]))
        return result

    def _listen(self, args: list[str]) -> None:
        """``if systemctl -q is-active UNIT; then echo ...; else python3 fleet_probe.py listen ...; fi``:
        the leader's rendezvous listener, unless its running leader holds the port."""
        unit = args[3].rstrip(";")
        assert args[-1] == "fi", f"unexpected rendezvous listener: {args}"
        if f"{unit}.service" in self.running:
            return
        listen = args[args.index("else") + 1:-1]
        self.rendezvous.append(probe_args([*listen[:-1], listen[-1].rstrip(";")]))

    def _reach(self, argv: list[str]) -> None:
        """``python3 fleet_probe.py reach ... || { echo REASON >&2; exit 1; }``: a follower connects to
        its leader's master port; where it cannot (``reach_ok`` unset) the command fails with REASON."""
        cut = argv.index("||")
        assert argv[cut + 1:cut + 3] == ["{", "echo"] and argv[cut + 4:] == [">&2;", "exit", "1;", "}"], argv
        self.rendezvous.append(probe_args(argv[:cut]))
        if not self.reach_ok:
            raise CommandFailed(argv[cut + 3])
