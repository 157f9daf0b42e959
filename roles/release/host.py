"""What a host does with releases: install a lock from its unpacked wheels, and which release
venvs (or staged models) to prune."""

from __future__ import annotations

import shlex

from roles.release.lock import Lock


def host_install_command(lock: Lock, venv_dir: str, wheel_dir: str, python: str = "python3") -> str:
    """Shell command for a host that has ``wheels.tar`` unpacked in ``wheel_dir``.

    The venv is recreated from scratch so no package of an earlier lock survives; ``.release``
    names it for reports, and ``.lock-digest`` is written last, so a half-done install never
    reads as the lock's.
    The host's own pip configuration (indexes, constraints) is ignored: the lock is the truth.
    """
    venv, wheels = shlex.quote(venv_dir), shlex.quote(wheel_dir)
    host_lock = shlex.quote(f"{wheel_dir}/{lock.path.name}")
    return (f"{shlex.quote(python)} -m venv --clear {venv}"
            f" && PIP_CONFIG_FILE=/dev/null {venv}/bin/python -m pip install --quiet --no-index --no-deps --require-hashes"
            f" --find-links {wheels} -r {host_lock}"
            f" && printf '%s\\n' {shlex.quote(lock.release)} > {venv}/.release"
            f" && printf '%s\\n' {shlex.quote(lock.digest)} > {venv}/.lock-digest")




def dirs_to_remove(installed_newest_first: list[str], keep: int, protected: set[str]) -> list[str]:
    """Release venvs (or staged models) to delete on a host: all but the ``keep`` newest, never a
    protected one (the one being switched to, one an instance uses, the host's current one)."""
    unprotected = [venv for venv in installed_newest_first if venv not in protected]
    room = max(keep - len(protected & set(installed_newest_first)), 0)
    return unprotected[room:]
