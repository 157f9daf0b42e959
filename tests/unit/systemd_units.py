"""What the unit tests read from rendered systemd units: a unit's [Service] settings, and the
exposure systemd-analyze gives a unit file offline."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest


def service(text: str) -> dict[str, list[str]]:
    """[Service] settings of a unit, every assignment of a key in order."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def offline_exposure(unit_file: Path) -> tuple[float, str]:
    """``systemd-analyze security --offline`` of a unit file: its exposure and the report. Skips
    where this machine's systemd-analyze cannot score a file offline."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze on this machine")
    if "--offline" not in subprocess.run([analyze, "--help"], check=False, capture_output=True, text=True).stdout:
        pytest.skip("this systemd-analyze cannot score a unit file offline (--offline needs systemd 250+)")
    done = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit_file)],
                          check=False, capture_output=True, text=True, timeout=60)
    # Unknown keys and unparsable values are ignored by systemd, and would go unnoticed otherwise.
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    match = re.search(rf"Overall exposure level for {re.escape(unit_file.name)}: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout
    return float(match.group(1)), done.stdout
