"""What a host does with releases: install a lock from its wheel store or the operator's index, and
which release venvs (or staged models) to prune."""

from __future__ import annotations

import shlex

from roles.release.lock import Lock


def host_install_command(lock: Lock, venv_dir: str, lock_file: str, source: list[str], python: str = "python3",
                         wheel_manifest: str | None = None) -> str:
    """Shell command that builds the release venv from ``lock_file`` (the lock, on the host), pip taking
    each wheel from ``source``: the host's wheel store (``--no-index --find-links STORE``) or the operator's
    index (``--index-url URL``), and checking it against the lock's hash either way.

    The venv is recreated from scratch so no package of an earlier lock survives; ``.release``
    names it for reports, ``wheel_manifest`` (copied in as ``.wheels.json``) says which wheels of
    the store it came from, and ``.lock-digest`` is written last, so a half-done install never
    reads as the lock's; a failed one is removed. The host's own pip configuration (indexes,
    constraints) is ignored: the lock is the truth.
    """
    venv = shlex.quote(venv_dir)
    steps = [f"{shlex.quote(python)} -m venv --clear {venv}",
             f"PIP_CONFIG_FILE=/dev/null {venv}/bin/python -m pip install --quiet --no-deps --require-hashes "
             f"{shlex.join(source)} -r {shlex.quote(lock_file)}"]
    if wheel_manifest is not None:
        steps.append(f"cp {shlex.quote(wheel_manifest)} {venv}/.wheels.json")
    steps += [f"printf '%s\\n' {shlex.quote(lock.release)} > {venv}/.release",
              f"printf '%s\\n' {shlex.quote(lock.digest)} > {venv}/.lock-digest"]
    return "{ " + " && ".join(steps) + f"; }} || {{ rm -rf {venv}; exit 1; }}"


def dirs_to_remove(installed_newest_first: list[str], keep: int, protected: set[str]) -> list[str]:
    """Release venvs (or staged models) to delete on a host: all but the ``keep`` newest, never a
    protected one (the one being switched to, one an instance uses, the host's current one)."""
    unprotected = [venv for venv in installed_newest_first if venv not in protected]
    room = max(keep - len(protected & set(installed_newest_first)), 0)
    return unprotected[room:]
