"""The host firewall role: one nftables table, ``inet vllm_fleet``, that lets the instance ports
in from the load balancers only, keeps SSH open and drops whatever else comes in.

What is open is planned from the inventory (``roles.plan.firewall``); the SSH ports the host's
sshd listens on are added from the host itself, so the firewall never locks the operator out, and
so is an instance group's ephemeral port range (the kernel's, which the operator may have moved).
New rules are checked with ``nft -c`` before they replace the rules file, so a bad render never
reaches the running ruleset, and are applied only when the rules or the unit changed (or the
table is missing from the running ruleset). With ``firewall_enabled: false`` the role takes the
table off the host.
"""

from __future__ import annotations

from io import StringIO

import jinja2
from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.operations import files, server, systemd

from roles import paths
from roles.checked_files import checked_file
from roles.facts import LocalPortRange
from roles.plan.firewall import TABLE, FirewallPlan
from roles.platform import install_packages

NFT = "/usr/sbin/nft"

_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(paths.TEMPLATES), keep_trailing_newline=True,
                                trim_blocks=True, undefined=jinja2.StrictUndefined)
# Host names reach the rules file in comments only; a line break in one would end the comment.
_TEMPLATES.filters["comment"] = lambda text: "".join(c if c.isprintable() else "?" for c in str(text))


def render_rules(plan: FirewallPlan) -> str:
    """The rules file: ``nft -f`` of it replaces the table ``inet vllm_fleet`` as a whole."""
    return _TEMPLATES.get_template("vllm-fleet-firewall.nft.j2").render(plan=plan, table=TABLE)


def render_unit() -> str:
    """The unit that loads the rules at boot, after the distribution's nftables.service."""
    return _TEMPLATES.get_template("vllm-fleet-firewall.service.j2").render(
        nft=NFT, rules=paths.FIREWALL_RULES, table=TABLE)


class FirewallTable(FactBase):
    """Whether the running ruleset holds vllm-fleet's table (False where nft is not installed)."""

    def requires_command(self, *args, **kwargs) -> str:
        return "nft"

    def command(self) -> str:
        return f"nft list table {TABLE} >/dev/null 2>&1 && echo loaded || true"

    default = bool

    def process(self, output: list[str]) -> bool:
        return any(line.strip() == "loaded" for line in output)


class SshPorts(FactBase):
    """The TCP ports the host's sshd serves: its effective configuration (``sshd -T``: Port and
    ListenAddress), and the server port of the connection this deploy runs on (SSH_CONNECTION,
    where sudo keeps it). Empty where neither can be read (no sshd, the local connector)."""

    def command(self) -> str:
        return ("{ sshd=$(command -v sshd || echo /usr/sbin/sshd); "
                "[ -x \"$sshd\" ] && \"$sshd\" -T 2>/dev/null | grep -Ei '^(port|listenaddress) '; "
                "echo \"connection ${SSH_CONNECTION:-}\"; }")

    default = list

    def process(self, output: list[str]) -> list[int]:
        ports = set()
        for line in output:
            words = line.split()
            if not words:
                continue
            key = words[0].lower()
            if key == "port" and len(words) == 2:
                ports.add(words[1])
            elif key == "listenaddress" and len(words) >= 2:
                ports.add(words[1].rsplit(":", 1)[-1])  # 0.0.0.0:22, [::]:2222
            elif key == "connection" and len(words) == 5:
                ports.add(words[4])  # client address, client port, server address, server port
        return sorted(int(p) for p in ports if p.isdigit() and 1 <= int(p) <= 65535)


@deploy("Host firewall")
def host_firewall(plan: FirewallPlan | None):
    """The firewall ``plan`` describes, or none where it is None (firewall_enabled: false)."""
    if plan is None:
        _remove()
        return
    plan = plan.with_ssh_ports(host.get_fact(SshPorts))
    # An instance group's gloo, NCCL and ZMQ sockets listen on ports the kernel picks from this
    # host's ephemeral range: open that one, not the Linux default the plan assumed.
    if plan.group is not None and (local_ports := host.get_fact(LocalPortRange)) is not None:
        plan = plan.with_local_port_range(*local_ports)
    install_packages("Install nftables", ["nftables"])
    files.directory(name="Directory of the firewall rules", path=paths.FIREWALL_RULES.rsplit("/", 1)[0])
    rules = checked_file(name="Render the firewall rules (checked with nft -c first)", text=render_rules(plan),
                         path=paths.FIREWALL_RULES, check=f"{NFT} -c -f {{}}")
    unit = files.put(name=f"Install {paths.FIREWALL_UNIT}", src=StringIO(render_unit()),
                     dest=paths.FIREWALL_UNIT_FILE, mode="644")
    systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
    # reload-or-restart: a running unit reloads (one nft transaction: never a moment without
    # rules); a stopped one starts. Also where the table went missing (`nft flush ruleset`).
    server.shell(name="Apply the firewall rules", commands=[f"systemctl reload-or-restart {paths.FIREWALL_UNIT}"],
                 _if=lambda: rules.did_change() or unit.did_change() or not host.get_fact(FirewallTable))
    systemd.service(name="Load the firewall at boot", service=paths.FIREWALL_UNIT, running=True, enabled=True)


def _remove():
    """firewall_enabled: false: the operator asked for no firewall from vllm-fleet. The unit is
    stopped (which deletes the table) and disabled; a table left without it is deleted too."""
    systemd.service(name="Stop the host firewall (firewall_enabled is false)", service=paths.FIREWALL_UNIT,
                    running=False, enabled=False)
    server.shell(name="Remove the firewall table", commands=[f"nft delete table {TABLE}"],
                 _if=lambda: host.get_fact(FirewallTable))
