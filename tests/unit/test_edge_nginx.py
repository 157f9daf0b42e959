"""The edge's configuration for each routing policy, read by the real nginx (Debian's, with its njs
module for the prefix policy; the Makefile installs both): `nginx -t` accepts it, and a running
nginx routes with it. Each nginx runs in a folder of its own, on loopback ports, as it would under
Debian's nginx.conf (which includes conf.d/ inside http), with the secrets file and the TLS
certificate the deploy installs."""

import urllib.error
from collections import Counter

import pytest

from tests.unit.edge_harness import POLICIES, Edge, needs_nginx

pytestmark = needs_nginx


@pytest.mark.parametrize("routing", POLICIES)
def test_nginx_accepts_each_policy(host_data, tmp_path, routing):
    edge = Edge(host_data, tmp_path, routing, nginx_instances_down=["h1:c"])
    edge.write(down={edge.plan.upstreams[1]})
    done = edge.nginx("-t", check=False)
    assert done.returncode == 0, done.stderr


def test_one_session_goes_to_one_instance_and_none_to_least_conn(running):
    edge = running("session")
    for session in ("s-1", "s-2", "s-3", "s-4"):
        answered = {edge.post("/v1/chat/completions", {"messages": []}, {"X-Session-ID": session}) for _ in range(4)}
        assert len(answered) == 1, (session, answered)
    without = Counter(edge.post("/v1/chat/completions", {"messages": []}) for _ in range(6))
    assert len(without) == 3, without  # one upstream after the other while none has a request in flight


def test_prompts_sharing_a_prefix_go_to_one_instance(running):
    edge = running("prefix", nginx_prefix_chars=16)
    for system in ("first system prompt", "second system prompt", "a third system prompt", "yet another one"):
        answered = {edge.post("/v1/chat/completions", {"messages": [{"role": "system", "content": system},
                                                                   {"role": "user", "content": f"question {i}"}]})
                    for i in range(4)}
        assert len(answered) == 1, (system, answered)
    # No prompt (not JSON): least_conn over every instance.
    assert len(Counter(edge.post("/v1/completions", "not json") for _ in range(6))) == 3


@pytest.mark.parametrize("routing", ["session", "prefix"])
def test_a_down_instance_gets_no_request_under_any_policy(running, routing):
    edge = running(routing, nginx_instances_down=["h1:a"], nginx_prefix_chars=16)
    answered = Counter()
    for i in range(24):
        answered[edge.post("/v1/completions", {"prompt": f"prompt number {i:04d} and more"}, {"X-Session-ID": str(i)})] += 1
        answered[edge.post("/v1/completions", "no prompt")] += 1
    assert set(answered) == {"b", "c"}, answered


def test_the_prefix_redirect_counts_a_request_once_and_keeps_the_key_check(running):
    # One request a second without a burst: counted twice (before and after js_content's redirect
    # to the named location), the first request would already be refused.
    edge = running("prefix", nginx_client_rate=1, nginx_client_burst=0)
    assert edge.post("/v1/completions", {"prompt": "counted once"}) in edge.instances
    edge.key = "x" * 40
    with pytest.raises(urllib.error.HTTPError) as refused:
        edge.post("/v1/completions", {"prompt": "no key"})
    assert refused.value.code == 401
