"""What the fleet's textfile scripts (gpu_metrics.py, edge_metrics.py) share: metric families in
Prometheus' text exposition format, the .prom file written whole for the node exporter's textfile
collector, and the state a script keeps between its runs. Stdlib only.

On a host it sits beside those scripts (in /usr/local/lib/vllm-fleet, installed by each role that
installs one of them) and they import it as the top-level module ``textfile``, never as
``roles.files.textfile`` (scripts copied to hosts import nothing of the project).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable

# A metric family: its name (after the script's prefix), type, help, and samples as (labels, value).
Family = tuple[str, str, str, list[tuple[dict[str, str], object]]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    return str(int(value)) if isinstance(value, (bool, int)) else repr(float(value))


def _sample(name: str, labels: dict[str, str], value) -> str:
    inside = ",".join(f'{key}="{_escape(str(v))}"' for key, v in labels.items())
    return f"{name}{{{inside}}} {_number(value)}" if inside else f"{name} {_number(value)}"


def exposition(prefix: str, families: Iterable[Family]) -> str:
    """The text exposition of ``families``, each name after ``prefix``: each family written whole
    (HELP, TYPE, then its samples), one without samples left out, label values escaped."""
    lines = []
    for name, kind, help_text, samples in families:
        if samples:
            help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
            lines += [f"# HELP {prefix}{name} {help_text}", f"# TYPE {prefix}{name} {kind}",
                      *(_sample(prefix + name, labels, value) for labels, value in samples)]
    return "\n".join(lines) + "\n"


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``: a reader sees the old
    file or the new one, never half of one. The temporary name does not end in .prom, so the
    node exporter (which reads *.prom) never reads it; the mode lets its user read the result."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def load_state(path: str, script: str, starting_over: str) -> dict:
    """The state ``script`` saved on its last run; a missing or unreadable file starts from
    nothing, and an unreadable one is said on stderr with what that means (``starting_over``:
    Prometheus takes the counters' drop as a reset)."""
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"{script}: {path} unreadable ({e}): {starting_over}", file=sys.stderr)
        return {}
    return state if isinstance(state, dict) else {}


def save_state(path: str, state: dict) -> None:
    """The state for the next run, written whole and readable by root alone."""
    write_atomically(path, json.dumps(state, indent=1, sort_keys=True) + "\n", mode=0o600)
