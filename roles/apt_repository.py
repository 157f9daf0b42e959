"""Vendors' apt repositories (NVIDIA's CUDA repository, Grafana's), each trusted through its own key
alone: the key is downloaded from the repository (or the operator's mirror of it) and checked
against the fingerprint the inventory pins before it becomes the keyring that the repository's
deb822 source names in Signed-By, never a key of apt's global trust. What the repository installs
is pinned to an exact version with an apt preference and held, so that no upgrade moves it."""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.operations import files, server

from roles.facts import AptHolds
from roles.platform import install_packages


def deb822_source(uri: str, suite: str, keyring: str, components: tuple[str, ...] = ()) -> str:
    """A deb822 source of one repository, trusted only with ``keyring`` (``suite`` "/" for a flat
    repository, which has no components)."""
    lines = ["Types: deb", f"URIs: {uri}", f"Suites: {suite}",
             *([f"Components: {' '.join(components)}"] if components else []), f"Signed-By: {keyring}"]
    return "\n".join(lines) + "\n"


def pin_file(packages: str, version: str, why: str) -> str:
    """An apt preference holding ``packages`` (apt's glob patterns, space-separated) to ``version``
    (a pattern too), above any other version however new (priority 1001)."""
    return f"# Managed by vllm-fleet: {why}\nPackage: {packages}\nPin: version {version}\nPin-Priority: 1001\n"


def signed_source(repository: str, key_url: str, fingerprint: str, keyring: str, sources: str, source_text: str):
    """The repository's key from ``key_url``, installed as ``keyring`` once its fingerprint is
    ``fingerprint`` (a different key stops the host), then its deb822 source ``source_text`` at
    ``sources``. Returns the source's operation: when it changed, apt's lists need a refresh."""
    # A minimal Debian 12 (debootstrap's minbase, the lab's base) has neither curl nor gpg.
    install_packages(f"What fetches and checks the {repository}'s key", ["ca-certificates", "curl", "gpg"],
                     no_recommends=True)
    key = files.download(name=f"{repository} signing key", src=key_url, dest=f"{keyring}.asc")
    keyring_q, asc = shlex.quote(keyring), shlex.quote(f"{keyring}.asc")
    server.shell(name="Check the key's fingerprint, then install it as the repository's keyring",
                 commands=[f"gpg --show-keys --with-colons {asc} | grep -q {shlex.quote(f'^fpr:*{fingerprint}:')} "
                           f"|| {{ echo {shlex.quote(f'the downloaded key is not {fingerprint}')} >&2; exit 1; }}",
                           f"gpg --dearmor --yes -o {keyring_q} {asc}"],
                 _if=key.did_change)
    return files.put(name=f"{repository} (deb822)", src=StringIO(source_text), dest=sources)


def hold(name: str, packages: list[str]) -> None:
    """``packages`` held with apt-mark (no unattended upgrade may move them), where one is not."""
    if not set(packages) <= set(host.get_fact(AptHolds)):
        server.shell(name=name, commands=[shlex.join(["apt-mark", "hold", *sorted(packages)])])
