"""`vllm-fleet keys`: client keys in a secrets folder, added, rotated, removed and shown; the
file stays private and readable by the edge's one reader; refusals exit 2 without a key in them."""

from __future__ import annotations

import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from roles.cli import main
from roles.plan import edge
from roles.plan.edge import ClientEntry, Secret

VLLM_FLEET = Path(sys.executable).with_name("vllm-fleet")
KEY_A = "vf-" + "a" * 40
NOW = datetime(2030, 6, 1, tzinfo=UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def keys(capsys, *args: str | Path) -> tuple[int, str, str]:
    """Run `vllm-fleet keys ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["keys", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args: str | Path) -> tuple[str, str, str]:
    """The field, problem and fix of a refused `vllm-fleet keys` command (exit 2, nothing on stdout)."""
    code, out, err = keys(capsys, *args)
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert lines[0].startswith("refused: ") and lines[1].startswith("  problem: ") and lines[2].startswith("  fix: ")
    return lines[0][len("refused: "):], lines[1][len("  problem: "):], lines[2][len("  fix: "):]


def test_new_prints_one_fresh_key(capsys):
    code, first, _ = keys(capsys, "new")
    _, second, _ = keys(capsys, "new")
    assert code == 0 and first != second
    key = first.strip()
    assert first == key + "\n" and key.startswith("vf-") and len(key) >= edge.MIN_KEY_LENGTH
    assert edge.KEY_CHARS.fullmatch(key)


def test_add_makes_a_private_folder_and_file(tmp_path, capsys):
    folder = tmp_path / "inventories" / "secrets" / "prod"
    code, out, err = keys(capsys, "add", folder, "alice")
    key = out.strip()
    assert code == 0 and out == key + "\n" and key.startswith("vf-")
    assert "deploy to make it valid at the edge" in err and key not in err
    assert mode(folder) == 0o700 and mode(folder / "clients.toml") == 0o600
    assert sorted(p.name for p in folder.iterdir()) == ["clients.toml"]  # no temporary file left
    text = (folder / "clients.toml").read_text()
    assert text.startswith("# vllm-fleet clients: never commit this file.") and key in text
    plan = edge.plan_edge("lb1", {"nginx_secrets_dir": str(folder), "ssh_hostname": "10.0.0.1"}, tmp_path, NOW)
    assert [(c.name, [k.reveal() for k in c.keys]) for c in plan.clients] == [("alice", [key])]


def test_a_key_is_rotated_and_a_client_removed(tmp_path, capsys):
    folder = tmp_path / "secrets"
    old = keys(capsys, "add", folder, "alice")[1].strip()
    bob = keys(capsys, "add", folder, "bob.ci")[1].strip()
    code, out, hint = keys(capsys, "add", folder, "alice")
    new = out.strip()
    assert code == 0 and new not in (old, bob)
    assert f"vllm-fleet keys remove {folder} alice --key-prefix {old[:8]}" in hint and old not in hint
    assert keys(capsys, "show", folder, "alice")[1] == new + "\n"

    code, listing, _ = keys(capsys, "list", folder)
    assert code == 0 and listing.splitlines() == [
        f"alice: 2 keys ({old[:6]}…, {new[:6]}…); rate default, burst default, concurrency default",
        f"bob.ci: 1 key ({bob[:6]}…); rate default, burst default, concurrency default"]
    assert all(key[:7] not in listing for key in (old, new, bob))

    code, out, err = keys(capsys, "remove", folder, "alice", "--key-prefix", old[:8])
    assert code == 0 and out == "" and old not in err
    assert old not in (folder / "clients.toml").read_text() and keys(capsys, "show", folder, "alice")[1] == new + "\n"
    assert mode(folder / "clients.toml") == 0o600

    code, _, err = keys(capsys, "remove", folder, "bob.ci")
    assert code == 0 and "removed client bob.ci" in err and "no client left" not in err
    assert [e.name for e in edge.read_clients(folder).values()] == ["alice"]
    assert "client bob.ci" in refused(capsys, "show", folder, "bob.ci")[0]
    assert "no client left" in keys(capsys, "remove", folder, "alice")[2]
    assert edge.read_clients(folder) == {} and keys(capsys, "list", folder)[:2] == (0, "")


def test_a_rewrite_keeps_every_client_and_its_limits(tmp_path, capsys):
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    entries = [ClientEntry("bob", (Secret(KEY_A),), (("rate", 5), ("concurrency", 2)))]
    (folder / "clients.toml").write_text(edge.clients_toml(entries))
    (folder / "clients.toml").chmod(0o600)
    key = keys(capsys, "add", folder, "alice")[1].strip()
    assert edge.read_clients(folder) == {"bob": entries[0], "alice": ClientEntry("alice", (Secret(key),))}
    assert keys(capsys, "list", folder)[1].splitlines()[0] == \
        "bob: 1 key (vf-aaa…); rate 5, burst default, concurrency 2"


def two_keys_alike(folder: Path) -> None:
    folder.mkdir(mode=0o700)
    entry = ClientEntry("alice", (Secret(KEY_A), Secret(KEY_A[:-1] + "b")))
    (folder / "clients.toml").write_text(edge.clients_toml([entry]))
    (folder / "clients.toml").chmod(0o600)


# name: (arguments after `keys`, given the folder; field has, problem has, fix has)
REFUSALS = {
    "add: a bad name": (lambda d: ["add", d, "Alice"], "NAME", "'Alice' is not a client name", "lower-case letters"),
    "add: a name with a slash": (lambda d: ["add", d, "a/b"], "NAME", "nginx configuration", "._-"),
    "show: no such folder": (lambda d: ["show", d, "alice"], "secrets", "does not exist", "vllm-fleet keys add"),
    "list: no such folder": (lambda d: ["list", d], "secrets", "does not exist", "vllm-fleet keys add"),
    "remove: no such folder": (lambda d: ["remove", d, "alice"], "secrets", "does not exist", "vllm-fleet keys add"),
    "show: no such client": (lambda d: ["show", d, "alicia"], "client alicia", "does not exist",
                             "did you mean `alice`?"),
    "remove: no such client": (lambda d: ["remove", d, "zed"], "client zed", "does not exist",
                               "the clients are: alice"),
    "remove: a short prefix": (lambda d: ["remove", d, "alice", "--key-prefix", KEY_A[:7]], "--key-prefix",
                               "7 characters long", "8 or more"),
    "remove: a prefix of no key": (lambda d: ["remove", d, "alice", "--key-prefix", "vf-zzzzzz"], "client alice",
                                   "none of its keys start", "exactly one of its keys"),
    "remove: a prefix of two keys": (lambda d: ["remove", d, "alice", "--key-prefix", KEY_A[:20]], "client alice",
                                     "2 of its keys start", "exactly one"),
    "remove: the last key": (lambda d: ["remove", d, "bob", "--key-prefix", "vf-" + "c" * 8], "client bob",
                             "only key", "remove the client instead: `vllm-fleet keys remove"),
    "keys: no action": (lambda d: [], "`vllm-fleet keys`", "the following arguments are required",
                        "vllm-fleet keys --help"),
    "keys: unknown action": (lambda d: ["rotate", d, "alice"], "`vllm-fleet keys`", "invalid choice: 'rotate'",
                             "--help"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_bad_keys_command_is_refused(tmp_path, capsys, case):
    args, field, problem, fix = REFUSALS[case]
    folder = tmp_path / "secrets"
    if "no such folder" not in case:
        two_keys_alike(folder)
        with (folder / "clients.toml").open("a") as f:
            f.write(f'\n[clients.bob]\nkeys = ["vf-{"c" * 40}"]\n')
    got = refused(capsys, *args(folder))
    assert field in got[0] and problem in got[1] and fix in got[2], got
    assert KEY_A not in " ".join(got) and "c" * 40 not in " ".join(got)


@pytest.mark.parametrize("loose", [0o755, 0o750])
def test_add_refuses_a_folder_others_can_read(tmp_path, capsys, loose):
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    folder.chmod(loose)
    field, problem, fix = refused(capsys, "add", folder, "alice")
    assert field == str(folder) and f"mode {loose:04o}" in problem and fix == f"`chmod 700 {folder}` (only its " \
        "owner may read it)."
    assert not (folder / "clients.toml").exists()


def test_commands_refuse_a_clients_file_others_can_read(tmp_path, capsys):
    folder = tmp_path / "secrets"
    keys(capsys, "add", folder, "alice")
    (folder / "clients.toml").chmod(0o644)
    for args in (["show", folder, "alice"], ["list", folder], ["add", folder, "bob"]):
        field, _, fix = refused(capsys, *args)
        assert "clients.toml" in field and "chmod 600" in fix


def test_a_broken_clients_file_is_refused_by_the_edge_reader(tmp_path, capsys):
    folder = tmp_path / "secrets"
    keys(capsys, "add", folder, "alice")
    with (folder / "clients.toml").open("a") as f:
        f.write('\n[clients.bob]\nkeys = ["too-short-to-be-safe"]\n')
    field, problem, fix = refused(capsys, "add", folder, "carol")
    assert field.endswith("client bob: keys[0]") and "can be guessed" in problem and "vllm-fleet keys new" in fix
    assert "too-short-to-be-safe" not in problem + fix + field
    assert "carol" not in (folder / "clients.toml").read_text()


def test_the_command_line_lists_keys_and_refuses_without_a_traceback(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(VLLM_FLEET), *args], capture_output=True, text=True, timeout=120,
                              check=False)

    listed = run("--help").stdout.split("positional arguments:", 1)[1]
    assert "\n    keys " in listed
    assert all(action in run("keys", "--help").stdout for action in ("new", "add", "remove", "show", "list"))
    result = run("keys", "show", str(tmp_path / "nope"), "alice")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"refused: {tmp_path / 'nope'}\n  problem: does not exist.")


@pytest.mark.parametrize("action, file_name", [("hub", "hub.token"), ("fallback", "fallback.key")])
def test_a_token_or_provider_key_is_read_from_stdin_into_a_private_file(tmp_path, action, file_name):
    """`keys hub` and `keys fallback`: the secret comes on stdin (never argv) and lands 0600; it is
    printed nowhere; one that an HTTP header could not carry is refused, naming the file."""
    folder = tmp_path / "secrets"
    token = "hf_" + "Q" * 34
    stored = subprocess.run([str(VLLM_FLEET), "keys", action, str(folder)], input=f"{token}\n",
                            capture_output=True, text=True)
    assert stored.returncode == 0, stored.stderr
    assert token not in stored.stdout + stored.stderr and f"wrote {folder / file_name}" in stored.stderr
    assert (folder / file_name).read_text() == f"{token}\n" and mode(folder / file_name) == 0o600
    bad = subprocess.run([str(VLLM_FLEET), "keys", action, str(folder)], input="two words\n",
                         capture_output=True, text=True)
    assert bad.returncode == 2 and f"refused: {folder / file_name}" in bad.stderr
    assert "two words" not in bad.stderr
