"""Files that hold secrets (API keys, private keys): written readable by root alone, at no moment
by anyone else, and never shown by pyinfra (``files.put`` prints a file's contents with ``--diff``).

With ``_sudo``, pyinfra uploads through a temporary file of the SSH user's and copies it into place:
both that file and the one copied into are created 0600 beforehand, so the secret is never in a
file others can read, not even for an instant.
"""

from __future__ import annotations

import hashlib
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.facts.files import File, Sha256File


def upload_commands(content: str, dest: str, group: str = "root"):
    """The commands that put ``content`` at ``dest`` (owned by root, mode 0600; 0640 when a
    service's ``group`` reads it) in one rename."""
    staged, dest_q = shlex.quote(f"{dest}.upload"), shlex.quote(dest)
    mode_and_group = "-m 600" if group == "root" else f"-m 640 -g {shlex.quote(group)}"
    yield StringCommand(f"install {mode_and_group} /dev/null {staged}")
    via = None
    if (host.current_op_global_arguments or {}).get("_sudo"):
        via = host.get_temp_filename(dest)
        yield StringCommand(f'install -m 600 -o "${{SUDO_USER:-root}}" /dev/null {shlex.quote(via)}')
    yield FileUploadCommand(StringIO(content), f"{dest}.upload", remote_temp_filename=via)
    yield StringCommand(f"mv -f {staged} {dest_q}" + (f" && rm -f {shlex.quote(via)}" if via else ""))


@operation()
def private_file(path: str, content: str, group: str = "root"):
    """``content`` at ``path``, readable by root (and ``group``) alone, unless it is there already
    (compared by digest, so the secret never travels back either)."""
    digest = hashlib.sha256(content.encode()).hexdigest()
    info = host.get_fact(File, path=path)
    mode = 600 if group == "root" else 640
    if info and host.get_fact(Sha256File, path=path) == digest and (info["mode"], info["user"], info["group"]) == \
            (mode, "root", group):
        host.noop(f"{path} is up to date")
        return
    yield from upload_commands(content, path, group)
