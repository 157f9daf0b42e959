"""The fallback provider (nginx_fallback) through the real nginx and njs: what no instance can take
goes to a second TLS endpoint on loopback, with the provider's model name and key and nothing else
of the client's; a request an instance received is never sent again; overflow sends what finds
every instance at its cap; the provider's certificate is checked."""

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from roles import secrets
from roles.plan.fallback import FALLBACK_KEY_FILE
from tests.unit.edge_harness import POLICIES, Edge, needs_nginx
from tests.unit.provider_stand_in import PROVIDER_KEY, PROVIDER_MODEL

pytestmark = needs_nginx

class Instances:
    """Stand-ins at the instances' ports: each answers with its name after ``delay`` seconds, or
    (``drop``) reads the request and closes the connection without an answer."""

    def __init__(self, ports: dict[str, int], delay: float = 0.0, drop: bool = False):
        self.received = Counter()
        self.servers = []
        for name, port in ports.items():
            server = ThreadingHTTPServer(("127.0.0.1", port), self.handler(name, delay, drop))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)

    def handler(self, name, delay, drop):
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                received[name] += 1
                if drop:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                time.sleep(delay)
                data = json.dumps({"model": "tiny", "instance": name}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def fallback_edge(running, provider, tmp_path):
    """Start an edge whose fallback is ``provider``; nothing answers at the instances' ports unless
    the test starts stand-ins there."""
    def start(routing="least_conn", mode="failover", **lb_data):
        secrets.write_private(tmp_path / "secrets" / FALLBACK_KEY_FILE, f"{PROVIDER_KEY}\n".encode())
        settings = {"nginx_fallback": mode, "nginx_fallback_url": provider.url, "nginx_fallback_model": PROVIDER_MODEL,
                    "nginx_fallback_ca": str(provider.ca), "nginx_prefix_chars": 16, **lb_data}
        return running(routing, stand_ins=False, **settings)
    return start


def chat(edge: Edge, stream=False, model="tiny", headers=None) -> tuple[int, str]:
    """Status and body of a chat completion through the edge."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello there, who answers?"}], "stream": stream}
    try:
        return 200, edge.post("/v1/chat/completions", body, headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def served_by(edge: Edge, count: int) -> list[str]:
    """The access log's served_by of the first ``count`` requests (nginx writes a line once it has
    sent the response: it may come a moment after the client read it)."""
    log = edge.folder / "vllm-fleet.access.log"
    for _ in range(50):
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= count:
            break
        time.sleep(0.05)
    return [line.rsplit("served_by=", 1)[1] for line in lines]


@pytest.mark.parametrize("routing", POLICIES)
def test_with_every_instance_down_the_provider_answers_with_its_model_and_key(fallback_edge, provider, routing):
    edge = fallback_edge(routing)
    status, body = chat(edge, headers={"X-Session-ID": "s-1", "Cookie": "a=b"})
    assert status == 200 and json.loads(body) == {"model": PROVIDER_MODEL, "choices": [{"text": "from the provider"}]}
    (request,) = provider.received
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == PROVIDER_MODEL
    assert request["body"]["messages"] == [{"role": "user", "content": "hello there, who answers?"}]
    # The provider's key and host, and nothing of the client's: no key, address, session or cookie.
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}" and headers["host"] == provider.url.split("/")[2]
    assert not {"x-forwarded-for", "x-session-id", "cookie"} & set(headers), headers
    assert served_by(edge, 1) == ["fallback"]


def test_a_stream_comes_through_the_fallback_as_it_is_sent(fallback_edge, provider):
    edge = fallback_edge()
    status, body = chat(edge, stream=True)
    events = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["from", "the", "provider"]
    assert provider.received[0]["body"]["stream"] is True


def test_a_request_an_instance_received_is_never_sent_again(fallback_edge, provider):
    edge = fallback_edge()
    instances = Instances(edge.instances, drop=True)
    try:
        status, body = chat(edge)
    finally:
        instances.close()
    # One instance received it and vanished: the client hears so, and the provider never sees it.
    assert status == 502 and json.loads(body)["error"]["code"] == "service_unavailable"
    assert sum(instances.received.values()) == 1 and provider.received == []


def test_only_the_fleets_model_and_generation_routes_fall_back(fallback_edge, provider):
    edge = fallback_edge()
    assert chat(edge, model="another-model")[0] == 503
    with pytest.raises(urllib.error.HTTPError) as models:
        edge.post("/v1/models", "")
    assert models.value.code in (502, 503)
    assert provider.received == []


def test_the_providers_certificate_must_chain_to_the_given_cas(fallback_edge, provider, tmp_path):
    # The fleet's own CA did not issue the provider's certificate: nginx refuses the handshake.
    fleet_ca, _ = secrets.fleet_ca(secrets.private_dir(tmp_path / "secrets"))
    edge = fallback_edge(nginx_fallback_ca=str(fleet_ca))
    status, body = chat(edge)
    assert status == 502 and json.loads(body)["error"]["code"] == "service_unavailable" and provider.received == []
    assert "upstream SSL certificate verify error" in (edge.folder / "error.log").read_text()


def test_with_fallback_off_the_same_outage_fails(running, provider):
    edge = running("least_conn", stand_ins=False)
    assert chat(edge)[0] == 502 and provider.received == []


@pytest.mark.parametrize("mode, to_instances", [("overflow", 3), ("failover", 9)])
def test_overflow_sends_what_finds_every_instance_at_its_cap(fallback_edge, provider, mode, to_instances):
    edge = fallback_edge(mode=mode, nginx_instance_cap=1, nginx_client_concurrency=32)
    instances = Instances(edge.instances, delay=1.5)
    try:
        with ThreadPoolExecutor(9) as pool:
            answers = list(pool.map(lambda _: chat(edge), range(9)))
    finally:
        instances.close()
    assert all(status == 200 for status, _ in answers), answers
    answered = Counter(json.loads(body).get("instance", "provider") for _, body in answers)
    assert sum(instances.received.values()) == to_instances
    assert answered["provider"] == 9 - to_instances == len(provider.received), answered


def test_the_provider_key_is_only_in_the_root_only_secrets_file(fallback_edge):
    edge = fallback_edge()
    assert PROVIDER_KEY in (edge.folder / "secrets.conf").read_text()
    assert PROVIDER_KEY not in (edge.folder / "vllm-fleet.conf").read_text()
    assert oct(os.stat(edge.folder / "secrets" / FALLBACK_KEY_FILE).st_mode & 0o777) == "0o600"
