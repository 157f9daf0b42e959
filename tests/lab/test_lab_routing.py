"""The edge's routing policies on the lab, each deployed for real and checked by nginx -t on the
load balancer: `session` keeps a session on one instance, `prefix` keeps a conversation on one
instance, `least_conn` spreads, and an instance marked down (nginx_instances_down) gets no request
under the `prefix` policy. The lab's own policy (the inventory's, `prefix`) is put back at the end.

The kill -9 and rolling-update tests (test_lab_e2e.py, test_lab_rollout.py) run under the lab's
`prefix` policy. Traffic goes only to the lab's own hosts; every loop is bounded in count.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from roles import cli
from tests.lab.labkit import Deploy, bring_up_lab, run_deploy, ssh

pytestmark = pytest.mark.lab

LOG = "/var/log/nginx/vllm-fleet.access.log"


@pytest.fixture(scope="module")
def lab():
    return bring_up_lab()


@pytest.fixture(scope="module")
def lb(lab):
    yield lab["hosts"][0]["name"]
    put_back = run_deploy()
    assert put_back.returncode == 0, put_back.output[-5000:]


@pytest.fixture(scope="module")
def edge(lb):
    return cli.lab_endpoint()


def deploy_checked(lb: str, *data: str) -> Deploy:
    """The fleet deployed with ``data`` overrides (KEY=VALUE), then nginx -t on the load balancer."""
    result = run_deploy(*[arg for item in data for arg in ("--data", item)])
    assert result.returncode == 0, result.output[-5000:]
    ssh(lb, "nginx -t -q")
    return result


class Requests:
    """Chat requests through the edge, each tagged in its query string so that its access log
    line (and the instance that served it) is found again."""

    def __init__(self, edge, lb: str):
        self.session, self.edge, self.lb, self.count = edge.session(), edge, lb, 0
        self.tags: dict[str, str] = {}

    def chat(self, messages: list[dict], headers: dict | None = None) -> str:
        self.count += 1
        tag = f"routing-{self.count}"
        r = self.session.post(f"{self.edge.base_url}/chat/completions?probe={tag}", timeout=60, headers=headers,
                              json={"model": self.edge.model, "max_tokens": 4, "messages": messages})
        assert r.status_code == 200, r.text
        return tag

    def upstreams(self, tags: list[str]) -> list[str]:
        """The instance (ADDRESS:PORT) that served each tagged request, from the edge's access log."""
        lines = ssh(self.lb, f"grep -F 'probe=routing-' {LOG} | tail -n 400").splitlines()
        served = {}
        for line in lines:
            match = re.search(r"probe=(routing-\d+) .* upstream=(\S+) ", line)
            if match:
                served[match.group(1)] = match.group(2)
        return [served[tag] for tag in tags]


def conversation(i: int, turn: int) -> list[dict]:
    """Turn ``turn`` of conversation ``i``: its opening, earlier turns and a new question."""
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": f"Conversation {i}: tell me about the fleet."}]
    for t in range(turn):
        messages += [{"role": "assistant", "content": f"Answer {t}."}, {"role": "user", "content": f"And {t}?"}]
    return messages


def test_session_policy_keeps_a_session_on_one_instance_and_spreads_requests_without_one(lb, edge):
    deploy_checked(lb, "nginx_routing=session")
    calls = Requests(edge, lb)
    sessions = {f"s{i}": [calls.chat(conversation(i, t), {"X-Session-ID": f"s{i}"}) for t in range(3)]
                for i in range(8)}
    anonymous = [calls.chat(conversation(0, 0)) for _ in range(9)]
    served = {s: set(calls.upstreams(tags)) for s, tags in sessions.items()}
    print(f"\nsession: {json.dumps({s: sorted(u) for s, u in served.items()})}")
    assert all(len(u) == 1 for u in served.values())
    assert len(set().union(*served.values())) >= 2
    # Without the header: least_conn, which spreads one request after another over the instances.
    assert len(set(calls.upstreams(anonymous))) >= 2


def test_least_conn_policy_spreads_a_conversation(lb, edge):
    deploy_checked(lb, "nginx_routing=least_conn")
    calls = Requests(edge, lb)
    tags = [calls.chat(conversation(1, t % 3)) for t in range(9)]
    assert len(set(calls.upstreams(tags))) == 3


def test_prefix_policy_keeps_a_conversation_on_one_instance(lb, edge):
    deploy_checked(lb)  # the lab inventory's policy
    assert "js_set" in ssh(lb, "cat /etc/nginx/conf.d/vllm-fleet.conf")
    calls = Requests(edge, lb)
    turns = {i: [calls.chat(conversation(i, t)) for t in range(3)] for i in range(8)}
    served = {i: set(calls.upstreams(tags)) for i, tags in turns.items()}
    print(f"\nprefix: {json.dumps({i: sorted(u) for i, u in served.items()})}")
    assert all(len(u) == 1 for u in served.values())
    assert len(set().union(*served.values())) >= 2


def test_instances_marked_down_get_no_request_under_the_prefix_policy(lb, edge, lab):
    lab1 = lab["hosts"][0]["address"]
    deploy_checked(lb, 'nginx_instances_down=["lab1:b", "lab2:a"]')
    calls = Requests(edge, lb)
    tags = [calls.chat(conversation(i, 0)) for i in range(8)]
    assert Counter(calls.upstreams(tags)) == {f"{lab1}:8001": 8}
    deploy_checked(lb)
    again = Requests(edge, lb)
    assert len(set(again.upstreams([again.chat(conversation(i, 0)) for i in range(8)]))) >= 2


def test_the_edge_answers_without_a_body_to_hash(lb, edge):
    # /v1/models has no body; a body that is not JSON falls back to least_conn, and vLLM refuses it.
    session = edge.session()
    assert session.get(f"{edge.base_url}/models", timeout=30).status_code == 200
    r = session.post(f"{edge.base_url}/chat/completions", data=b"not json", timeout=30,
                     headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
