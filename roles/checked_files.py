"""Configuration files that reach a running service only once the service's own checker accepts
them (nft -c, promtool): uploaded beside the live file, checked, then moved over it. A rejected
render stops the deploy with the service and its file as they were. One that holds a secret is a
``private_file`` with a ``check`` (roles/private_files.py): Alertmanager's receiver, by amtool."""

from __future__ import annotations

import hashlib
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.facts.files import Sha1File


@operation()
def checked_file(text: str, path: str, check: str, mode: str = "644"):
    """``text`` at ``path`` once ``check`` (a command; ``{}`` stands for the file to check)
    accepts it; unchanged when ``path`` holds it already."""
    if host.get_fact(Sha1File, path=path) == hashlib.sha1(text.encode()).hexdigest():
        host.noop(f"{path} is up to date")
        return
    staged = f"{path}.new"
    yield FileUploadCommand(StringIO(text), staged)
    yield StringCommand(f"chmod {mode} {shlex.quote(staged)}")
    yield StringCommand(check.format(shlex.quote(staged)))
    yield StringCommand(f"mv -f {shlex.quote(staged)} {shlex.quote(path)}")
