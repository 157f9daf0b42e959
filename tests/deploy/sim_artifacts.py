"""What the artifact commands do to a simulated host (tests/deploy/simhost.py): the host-side fetch,
verify and unlisted of ``roles/files/artifacts.py``, the moves that put a checked release, model or
cache folder in place, and the shell forms they are written in (a group that removes a half-built
venv, a status kept while a token file is removed).

A fetch lands every listed file its destination lacks (by path and digest) with the manifest's
size and digest, records what it moved (``fetches``), and removes its token file, as the real one
does before it connects; a token file must be root-only when it is read.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from roles import paths


@dataclass
class Fetch:
    """One fetch a host ran: from where, into where, what it moved and whether it had a token."""

    base_url: str
    dest: str
    fetched: list[str]
    bytes: int
    token: bool


@dataclass
class ArtifactState:
    fetches: list[Fetch] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)  # folders `artifacts.py verify` checked, in order


def shell_parts(raw: str) -> list[list[str]]:
    """A StringCommand as the argv of each of its steps: ``{ A && B; } || { cleanup }`` is A, B (the
    cleanup runs only on a failure, which the simulation has none of), and ``A; status=$?; ...`` is A
    (what follows only removes a token file that A removed already)."""
    raw = raw.strip()
    if raw.startswith("{ ") and "; } || {" in raw:
        raw = raw[2:raw.index("; } || {")]
    raw = raw.split("; status=$?", 1)[0]
    return [shlex.split(part) for part in raw.split(" && ")]


def manifest_entries(files: dict, path: str) -> list[dict]:
    return json.loads("\n".join(files[path]["lines"]))["files"]


class ArtifactCommands:
    """Mixed into SimulatedHost: ``self.files``, ``self.dirs`` and ``self.artifacts`` (an ArtifactState)."""

    def artifact_shell(self, argv: list[str]) -> bool:
        """Apply ``argv`` if it is one of the artifact commands; whether it was."""
        cmd, args = argv[0], argv[1:]
        if cmd == "python3" and args[:1] == [paths.ARTIFACTS_PATH]:
            self._artifacts_script(args[1:])
        elif cmd == "find" and "-exec" in args:
            self._find_move(args)
        elif cmd == "mv" and args[0] == "-T":
            self._move_tree(args[1], args[2])
        elif cmd == "cp":
            self._writes += 1  # a file written now: newest of all, as CompleteDirs lists them
            self.files[args[-1]] = {**self.files[args[-2]], "order": self._writes}
        elif cmd == "install" and args[0] == "-d":
            self.dirs.setdefault(args[-1], "root")
            self.dir_modes[args[-1]] = int(args[args.index("-m") + 1])
        elif cmd == "rm" and args[0] == "-f" and len(args) > 2:
            for path in args[1:]:
                self.files.pop(path, None)
        else:
            return False
        return True

    def _artifacts_script(self, args: list[str]) -> None:
        action, options = args[0], args[1:]
        if "||" in options:
            options = options[:options.index("||")]
        given = dict(zip(options[::2], options[1::2]))
        if action == "fetch":
            self._fetch(given)
        elif action == "verify":
            assert given["--manifest"] in self.files, f"verify: no manifest {given['--manifest']}"
            self.artifacts.verified.append(given["--dir"])
        else:
            raise AssertionError(f"unexpected artifacts.py {args}")

    def _fetch(self, given: dict[str, str]) -> None:
        token = given.get("--token-file")
        if token is not None:
            held = self.files.pop(token, None)  # the fetch removes it before it connects
            assert held is not None and held["mode"] == 600 and held["user"] == "root", \
                f"the fetch reads no root-only token file: {token}"
        dest, moved = given["--dest"], []
        for entry in manifest_entries(self.files, given["--manifest"]):
            target = f"{dest}/{entry['path']}"
            digest = entry.get("sha256") or entry["git_sha1"]
            if self.files.get(target, {}).get("digest") == digest:
                continue
            self.files[target] = {"sha1": digest[:40], "sha256": digest, "digest": digest, "size": entry["size"],
                                  "mode": 644, "user": "root", "lines": []}
            moved.append(entry)
        self.artifacts.fetches.append(Fetch(given["--base-url"], dest, [e["path"] for e in moved],
                                            sum(e["size"] for e in moved), token is not None))

    def _find_move(self, args: list[str]) -> None:
        """``find DIR -maxdepth 1 -name PATTERN -exec mv -f -t TARGET {} +``."""
        folder, pattern, target = args[0], args[args.index("-name") + 1], args[args.index("-t") + 1]
        for path in [p for p in self.files if str(Path(p).parent) == folder and fnmatch.fnmatch(Path(p).name, pattern)]:
            self.files[f"{target}/{Path(path).name}"] = self.files.pop(path)

    def _move_tree(self, source: str, target: str) -> None:
        """``mv -T SOURCE TARGET``: a folder renamed, everything in it with it."""
        for path in [p for p in self.files if p.startswith(source + "/")]:
            self.files[target + path[len(source):]] = self.files.pop(path)
        self.dirs[target] = self.dirs.pop(source, "root")

    def unlisted(self, argv: list[str]) -> str:
        """What ``artifacts.py unlisted --dir DIR --manifest M...`` prints here."""
        options = argv[3:]
        folder = options[options.index("--dir") + 1]
        listed = {e["path"] for flag, value in zip(options, options[1:]) if flag == "--manifest"
                  for e in manifest_entries(self.files, value)}
        return "\n".join(sorted(Path(p).name for p in self.files if str(Path(p).parent) == folder
                                and not Path(p).name.startswith(".") and Path(p).name not in listed))

    def file_sizes(self, folder: str) -> list[str]:
        """What the FileSizes fact's command prints here."""
        return [f"{f.get('size', len(chr(10).join(f['lines'])))} {p[len(folder) + 1:]}"
                for p, f in sorted(self.files.items()) if p.startswith(folder + "/")]
