"""The host-side probe's drain measure, on this machine's own loopback: established connections
to an upstream, as the load balancer's drain counts them before an instance restarts."""

import socket
from contextlib import ExitStack

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
