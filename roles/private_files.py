"""Files that hold secrets (API keys, private keys): written readable by root alone, at no moment
by anyone else, and never shown by pyinfra (``files.put`` prints a file's contents with ``--diff``).

With ``_sudo``, pyinfra uploads through a temporary file of the SSH user's and copies it into place:
both that file and the one copied into are created 0600 beforehand, so the secret is never in a
file others can read, not even for an instant.

A configuration that holds a secret and that its service must accept (Alertmanager's receiver,
whose webhook URL may carry a token) is given a ``check``: the staged file goes live only once the
service's checker accepts it, as ``checked_file`` does for files without secrets.
"""

from __future__ import annotations

import hashlib
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.facts.files import File, Sha256File


def _quiet_check(check: str, staged: str) -> StringCommand:
    """``check`` (``{}`` stands for the file) run on ``staged`` with its output not shown: a
    checker quotes what it refuses (amtool prints a URL it cannot parse), and here that may be the
    secret. A refusal fails the operation with the command to run on the host to see why: the
    refused file stays there, as private as the live one."""
    command = check.format(shlex.quote(staged))
    why = f"{staged} refused by `{command}` (its output is not shown: it may quote a secret); run it as root to see why"
    return StringCommand(f"{command} > /dev/null 2>&1 || {{ echo {shlex.quote(why)} >&2; exit 1; }}")


def upload_commands(content: str, dest: str, group: str = "root", check: str | None = None):
    """The commands that put ``content`` at ``dest`` (owned by root, mode 0600; 0640 when a
    service's ``group`` reads it) in one rename, once ``check`` (a command, see ``_quiet_check``)
    accepts the staged file when one is given."""
    staged, dest_q = shlex.quote(f"{dest}.upload"), shlex.quote(dest)
    mode_and_group = "-m 600" if group == "root" else f"-m 640 -g {shlex.quote(group)}"
    yield StringCommand(f"install {mode_and_group} /dev/null {staged}")
    via = None
    if (host.current_op_global_arguments or {}).get("_sudo"):
        via = host.get_temp_filename(dest)
        yield StringCommand(f'install -m 600 -o "${{SUDO_USER:-root}}" /dev/null {shlex.quote(via)}')
    yield FileUploadCommand(StringIO(content), f"{dest}.upload", remote_temp_filename=via)
    if check:
        yield _quiet_check(check, f"{dest}.upload")
    yield StringCommand(f"mv -f {staged} {dest_q}" + (f" && rm -f {shlex.quote(via)}" if via else ""))


@operation()
def private_file(path: str, content: str, group: str = "root", check: str | None = None):
    """``content`` at ``path``, readable by root (and ``group``) alone, once ``check`` accepts it
    (when given), unless it is there already (compared by digest, so the secret never travels
    back either)."""
    digest = hashlib.sha256(content.encode()).hexdigest()
    info = host.get_fact(File, path=path)
    mode = 600 if group == "root" else 640
    if info and host.get_fact(Sha256File, path=path) == digest and (info["mode"], info["user"], info["group"]) == \
            (mode, "root", group):
        host.noop(f"{path} is up to date")
        return
    yield from upload_commands(content, path, group, check)
