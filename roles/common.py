"""Small helpers every layer uses (planner, releases, roles, lab): stdlib only."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

GIB = 1 << 30


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, as messages and tables print them."""
    return f"{n / GIB:.1f} GiB"


def gb(n: float) -> str:
    """Bytes as GB (1e9) with one decimal: the capacity plan's unit, as vendors size GPUs."""
    return f"{n / 1e9:.1f} GB"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def did_you_mean(name: str, candidates: list[str]) -> str | None:
    """The fix for a misspelt key: "did you mean `X`?", or None when nothing is close."""
    close = difflib.get_close_matches(str(name), candidates, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def endpoint(address: str, port: int) -> str:
    """ADDRESS:PORT as nginx, URLs and the drain probe take it (an IPv6 address in brackets)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class ArtifactFile:
    """One file a host receives and what it must hash to: sha256 (wheels, pushed models, a hub
    model's LFS files), or the git blob id the Hub publishes for its other files."""

    path: str
    size: int
    sha256: str | None = None
    git_sha1: str | None = None


def manifest_json(files: Iterable[ArtifactFile]) -> str:
    """The manifest ``roles/files/artifacts.py`` fetches and verifies by, on hosts."""
    entries = [{"path": f.path, "size": f.size, **({"sha256": f.sha256} if f.sha256 else {"git_sha1": f.git_sha1})}
               for f in files]
    return json.dumps({"files": entries}, indent=1) + "\n"


def total_bytes(files: Iterable[ArtifactFile]) -> int:
    return sum(f.size for f in files)
