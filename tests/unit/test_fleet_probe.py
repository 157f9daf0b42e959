"""The host-side probe, on this machine's own loopback: the drain measure (established connections
to an upstream, as the load balancer's drain counts them before an instance restarts), the
rendezvous preflight of a multi-host instance, and a follower stage's switch."""

import json
import os
import socket
import subprocess
import sys
import threading
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from roles.files import fleet_probe  # a script the roles copy to hosts; importable for its pure parts


def test_proc_net_notation_of_both_families():
    assert fleet_probe._hex_endpoint("10.213.7.11", 8001) == "0B07D50A:1F41"
    assert fleet_probe._hex_endpoint("::1", 8001) == "00000000000000000000000001000000:1F41"


@pytest.mark.parametrize("family, host, upstream", [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1:{port}"),
    (socket.AF_INET6, "::1", "[::1]:{port}"),
])
def test_connections_to_an_upstream_are_counted_until_closed(family, host, upstream):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with ExitStack() as stack:
        server = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        server.bind((host, 0))
        server.listen()
        name = upstream.format(port=server.getsockname()[1])
        assert fleet_probe.connections_to([name]) == 0
        clients = [stack.enter_context(socket.create_connection((host, server.getsockname()[1])))
                   for _ in range(3)]
        accepted = [stack.enter_context(server.accept()[0]) for _ in clients]
        # The accepted ends are connections *from* the upstream's side: not counted.
        assert fleet_probe.connections_to([name]) == 3
        for client in clients:
            client.close()
        for conn in accepted:
            conn.close()
        assert fleet_probe.connections_to([name]) == 0


def test_other_ports_are_not_counted():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            assert fleet_probe.connections_to([f"127.0.0.1:{port + 1}", f"localhost:{port}"]) == 1


# ---- a multi-host instance's rendezvous preflight, and a follower's switch ---------------------------

PROBE = fleet_probe.__file__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PROBE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_the_leader_listens_on_its_master_port_and_a_follower_reaches_it():
    port = str(free_port())
    listening = probe("listen", "--address", "127.0.0.1", "--port", port, "--peers", "1", "--timeout", "20")
    # The command returns at once; its child takes the follower's connection and goes.
    assert listening.returncode == 0 and f"listening on 127.0.0.1:{port} for 1 follower(s)" in listening.stdout
    reached = probe("reach", "--address", "127.0.0.1", "--port", port, "--timeout", "10")
    assert reached.returncode == 0 and reached.stdout.strip() == f"reached 127.0.0.1:{port}"


def test_a_master_port_another_process_holds_fails_the_preflight_at_once():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        refused = probe("listen", "--address", "127.0.0.1", "--port", port, "--peers", "1", "--timeout", "20")
    assert refused.returncode == 1
    assert f"port {port} on 127.0.0.1 cannot be bound (Address already in use)" in refused.stderr


def test_an_unreachable_master_port_is_named_after_the_timeout():
    port = str(free_port())  # nothing listens there
    unreached = probe("reach", "--address", "127.0.0.1", "--port", port, "--timeout", "2")
    assert unreached.returncode == 1
    assert unreached.stderr.startswith(f"cannot reach 127.0.0.1:{port} within 2s:")


class Leader(BaseHTTPRequestHandler):
    """A leader's /health while it restarts: answers 200 (the old engine), then 503 a few times
    (it is starting and waits for its followers), then 200 again."""

    answers: list[int] = []

    def do_GET(self):
        status = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_followers_switch_is_proved_by_its_leader_going_down_and_coming_back(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "systemctl.calls"
    (fake_bin / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho ActiveState=active\n")
    (fake_bin / "systemctl").chmod(0o755)
    (fake_bin / "journalctl").write_text("#!/bin/sh\n")
    (fake_bin / "journalctl").chmod(0o755)
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "pp.env").write_text('ENGINE_ARGS="--headless"\n')
    (env_dir / "pp.env.next").write_text('ENGINE_ARGS="--headless --max-num-seqs 8"\n')
    link = tmp_path / "pp"
    link.symlink_to(tmp_path / "old-venv")
    Leader.answers = [200, 503, 503, 200]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Leader)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = probe("switch", "--name", "pp", "--port", "8003", "--model", "m", "--link", str(link),
                     "--target", str(tmp_path / "new-venv"), "--timeout", "20", "--env-dir", str(env_dir),
                     "--leader", f"127.0.0.1:{server.server_port}",
                     env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    finally:
        server.shutdown()
    result = json.loads(done.stdout.splitlines()[-1][len("RESULT "):])
    assert result["outcome"] == "switched", done.stdout + done.stderr
    assert "restart vllm@pp" in calls.read_text().splitlines()
    assert os.readlink(link) == str(tmp_path / "new-venv")
    assert "--max-num-seqs 8" in (env_dir / "pp.env").read_text() and not (env_dir / "pp.env.previous").exists()
    assert Leader.answers == [200]  # it waited through the leader's 503s
