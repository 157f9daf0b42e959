"""Fixtures of the unit tests that run the real nginx."""

import time

import pytest

from tests.unit.edge_harness import Edge
from tests.unit.provider_stand_in import Provider


@pytest.fixture
def running(host_data, tmp_path):
    """Start the edge of a policy (and stop it at the end of the test)."""
    started = []

    def start(routing: str, down=frozenset(), **lb_data) -> Edge:
        edge = Edge(host_data, tmp_path, routing, **lb_data)
        edge.write(down)
        edge.nginx()
        started.append(edge)
        for _ in range(100):
            if (tmp_path / "nginx.pid").exists():
                break
            time.sleep(0.05)
        return edge

    yield start
    for edge in started:
        edge.nginx("-s", "quit", check=False)


@pytest.fixture
def provider(tmp_path):
    """A stand-in fallback provider on loopback (tests/unit/provider_stand_in.py), stopped after the test."""
    folder = tmp_path / "provider"
    folder.mkdir()
    server = Provider(folder)
    yield server
    server.shutdown()
