"""roles/files/edge_metrics.py: the edge's responses by status, counted from nginx's access log
(incrementally, across rotations, the counts kept so that they never go down), and its upstreams'
health, in Prometheus' text format for the node exporter's textfile collector.

The log lines are written in the fleet's own log format, read from templates/nginx-vllm-fleet.conf.j2;
the upstreams are local HTTP servers on ephemeral ports of 127.0.0.1 and a port nothing listens on.
The exposition is checked by the independent parser of tests/unit/gpu_scripts.py and, where
/usr/bin/promtool exists, by promtool."""

import itertools
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from roles.paths import EDGE_METRICS, HOST_SCRIPTS, TEMPLATES
from tests.unit.gpu_scripts import parse_exposition, value

if str(HOST_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(HOST_SCRIPTS))

import edge_metrics  # noqa: E402  (from roles/files/, as on a host)

P = "vllm_fleet_edge_"
PROMTOOL = Path(os.environ.get("PROMTOOL_UNDER_TEST", "/usr/bin/promtool"))


# ---- log lines in the fleet's format -----------------------------------------------------------

def log_format() -> str:
    """The `vllm_fleet` log_format of the nginx template: its quoted parts, joined as nginx joins them."""
    conf = (TEMPLATES / "nginx-vllm-fleet.conf.j2").read_text()
    statement = re.search(r"log_format vllm_fleet (.*?);\n", conf, re.DOTALL).group(1)
    return "".join(re.findall(r"'([^']*)'", statement))


def nginx_escape(text: str) -> str:
    """What nginx writes for a variable's value with `escape=default`: '"', '\\' and bytes outside
    32-126 as \\xXX."""
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "".join(f"\\x{b:02X}" for b in c.encode())
                   for c in text)


def line(status=200, client="alice", request="POST /v1/chat/completions HTTP/1.1", upstream="10.9.0.11:8001",
         upstream_status=None, served_by="fleet") -> str:
    """One access log line as nginx writes it in the template's format (an empty variable is
    written as nothing, an unset one as '-')."""
    values = {"remote_addr": "203.0.113.7", "time_local": "10/Oct/2025:13:55:36 +0000",
              "vllm_fleet_client": client, "request": nginx_escape(request), "status": str(status),
              "body_bytes_sent": "1234", "upstream_addr": upstream,
              "upstream_status": upstream_status or (str(status) if upstream != "-" else "-"),
              "request_time": "0.532", "upstream_connect_time": "0.001" if upstream != "-" else "-",
              "vllm_fleet_served_by": served_by}
    text = re.sub(r"\$([a-z_]+)", lambda m: values[m.group(1)], log_format())
    assert "$" not in text
    return text


REAL = [
    line(200),
    line(200, client="bob", request="POST /v1/completions HTTP/1.1", upstream="10.9.0.12:8002"),
    # Without a key: answered by the edge itself, no upstream, the client empty.
    line(401, client="", upstream="-"),
    line(404, request='GET /v1/"../../etc/passwd" HTTP/1.1', upstream="-"),
    line(429, upstream="-"),
    # Failover: the first instance refused, the second answered.
    line(200, upstream="10.9.0.11:8001, 10.9.0.12:8001", upstream_status="502, 200"),
    line(503, upstream="10.9.0.11:8001, 10.9.0.12:8001", upstream_status="502, 502"),
    # Every instance refused: the fallback provider answered (nginx_fallback).
    line(200, upstream="10.9.0.11:8001, 10.9.0.12:8001 : 198.51.100.4:443", upstream_status="502, 502 : 200",
         served_by="fallback"),
    # The plain-HTTP port's redirect, and a request line nginx could not parse.
    line(308, client="", request="GET / HTTP/1.1", upstream="-"),
    line(400, client="", request="", upstream="-"),
    line(499),
]


class Log:
    """An access log and the script's state and textfile beside it, run through ``metrics``."""

    def __init__(self, tmp_path):
        self.path = tmp_path / "vllm-fleet.access.log"
        self.out = tmp_path / "textfile" / "vllm-fleet-edge.prom"
        self.state = tmp_path / "state" / "edge-state.json"
        self.out.parent.mkdir()
        self.state.parent.mkdir()

    def write(self, *lines, end="\n", path=None):
        with open(path or self.path, "a") as f:
            f.write("".join(f"{text}{end}" for text in lines))

    def collect(self, upstreams=(), **kwargs):
        assert edge_metrics.metrics(str(self.path), str(self.out), str(self.state), list(upstreams), **kwargs) == 0
        return parse_exposition(self.out.read_text())


@pytest.fixture
def log(tmp_path):
    return Log(tmp_path)


def responses(series) -> dict[str, float]:
    return {dict(labels)["status"]: v for (name, labels), v in series.items() if name == f"{P}responses_total"}


def nonzero(series) -> dict[str, float]:
    return {status: v for status, v in responses(series).items() if v}


# ---- parsing -------------------------------------------------------------------------------------

def test_the_template_log_format_is_the_one_parsed():
    assert log_format().startswith('$remote_addr [$time_local] client=$vllm_fleet_client "$request" $status ')
    assert line(200).startswith('203.0.113.7 [10/Oct/2025:13:55:36 +0000] client=alice "POST /v1/chat/completions '
                                'HTTP/1.1" 200 1234 upstream=10.9.0.11:8001 upstream_status=200 ')


def test_lines_of_the_real_format_count_by_their_own_status():
    counts, fallback, unparsed = edge_metrics.parse_statuses(text.encode() for text in REAL)
    assert counts == {"200": 4, "401": 1, "404": 1, "429": 1, "503": 1, "308": 1, "400": 1, "499": 1}
    assert fallback == 1 and unparsed == 0


def test_other_lines_are_counted_apart_and_not_as_responses():
    lines = [b"hello", b'10.0.0.1 - - [10/Oct/2025:13:55:36 +0000] "GET / HTTP/1.1" 200 612 "-" "curl/8.0"',
             line(200, request="GET /x 999 HTTP/1.1").encode(), b"", b"   "]
    counts, fallback, unparsed = edge_metrics.parse_statuses(lines)
    # nginx's `combined` format is not the fleet's: not a response of the edge.
    assert counts == {"200": 1} and fallback == 0 and unparsed == 2


def test_only_the_status_becomes_a_label(log):
    log.write(*REAL)
    log.collect()
    text = log.out.read_text()
    for unbounded in ("alice", "bob", "/v1/", "10.9.0.11", "203.0.113.7", "passwd"):
        assert unbounded not in text
    series = parse_exposition(text)
    assert {k for (name, labels), _ in series.items() if name == f"{P}responses_total" for k, _ in labels} == {
        "status"}


# ---- reading the log incrementally ---------------------------------------------------------------

def test_each_run_counts_only_the_new_lines_and_a_line_being_written_waits(log):
    log.write(line(200), line(200), line(502))
    assert nonzero(log.collect()) == {"200": 2, "502": 1}
    assert nonzero(log.collect()) == {"200": 2, "502": 1}, "lines counted twice"
    # nginx has written half a line: not counted until it is whole.
    half = line(503)
    log.write(half[:20], end="")
    assert nonzero(log.collect()) == {"200": 2, "502": 1}
    log.write(half[20:], line(200))
    assert nonzero(log.collect()) == {"200": 3, "502": 1, "503": 1}


def test_a_rotated_log_is_read_from_its_start_after_the_rest_of_the_old_one(log):
    log.write(line(200), line(200))
    log.collect()
    # logrotate renames the log; nginx writes to the renamed file until it reopens its logs.
    rotated = Path(f"{log.path}.1")
    log.path.rename(rotated)
    log.write(line(500), path=rotated)
    log.write(line(404), line(200))
    series = log.collect()
    assert nonzero(series) == {"200": 3, "500": 1, "404": 1}
    # Rotated again, the old one compressed away (no .1 of that inode): the new log from its start.
    rotated.unlink()
    log.path.rename(rotated)
    log.path.write_text(line(503) + "\n")
    rotated.unlink()
    assert nonzero(log.collect()) == {"200": 3, "500": 1, "404": 1, "503": 1}


def test_a_truncated_log_is_read_from_its_start(log):
    log.write(*[line(200)] * 5)
    log.collect()
    inode = log.path.stat().st_ino
    log.path.write_text(line(502) + "\n")  # copytruncate: same file, shorter
    assert log.path.stat().st_ino == inode
    assert nonzero(log.collect()) == {"200": 5, "502": 1}


def test_the_counts_persist_and_never_go_down(log, tmp_path):
    seen = []
    for round_ in range(4):
        log.write(*[line(200)] * (round_ + 1), line(503))
        if round_ == 2:
            log.path.rename(f"{log.path}.1")
        seen.append(responses(log.collect()))
    for before, after in itertools.pairwise(seen):
        assert all(after[status] >= n for status, n in before.items()), (before, after)
    assert seen[-1]["200"] == 1 + 2 + 3 + 4 and seen[-1]["503"] == 4
    # The state is all a run needs: another run's module state plays no part.
    state = json.loads(log.state.read_text())
    assert state["counts"] == {"200": 10, "503": 4} and state["inode"] == log.path.stat().st_ino


def test_a_long_log_is_read_over_several_runs(log):
    log.write(*[line(200)] * 100)
    size = len(line(200)) + 1
    totals = [responses(log.collect(max_bytes=size * 30 + 5))["200"] for _ in range(4)]
    assert totals == [30, 60, 90, 100]


def test_seeded_statuses_are_there_at_zero_from_the_first_run(log):
    log.write(line(200))
    counts = responses(log.collect())
    assert counts["200"] == 1 and counts["502"] == counts["503"] == counts["504"] == counts["500"] == 0


def test_a_missing_log_keeps_the_counts_and_says_so(log):
    log.write(line(200))
    log.collect()
    log.path.unlink()
    series = log.collect()
    assert value(series, f"{P}log_up") == 0 and nonzero(series) == {"200": 1}
    log.write(line(502))
    series = log.collect()
    assert value(series, f"{P}log_up") == 1 and nonzero(series) == {"200": 1, "502": 1}


def test_a_new_log_in_the_old_ones_inode_is_read_from_its_start(log):
    # What a file system does when the log is deleted and made again (the inode number reused),
    # made certain: the same file, its content replaced by as many bytes.
    log.write(line(200), line(200))
    log.collect()
    inode = log.path.stat().st_ino
    log.path.write_text(f"{line(502)}\n{line(503)}\n")
    assert log.path.stat().st_ino == inode
    assert nonzero(log.collect()) == {"200": 2, "502": 1, "503": 1}


def test_an_unreadable_state_starts_again_from_zero(log):
    log.write(line(200), line(200))
    log.collect()
    log.state.write_text("{not json")
    assert nonzero(log.collect()) == {"200": 2}  # the log again from its start, counted once


# ---- the upstreams ------------------------------------------------------------------------------

class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def serve(status: int):
    handler = type("Handler", (_Health,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def upstreams():
    servers = [serve(200), serve(503)]
    yield [f"127.0.0.1:{s.server_address[1]}" for s in servers] + [f"127.0.0.1:{closed_port()}"]
    for s in servers:
        s.shutdown()
        s.server_close()


def test_upstreams_up_are_those_answering_health_with_200(log, upstreams):
    ok, unhealthy, closed = upstreams
    series = log.collect(upstreams)
    assert value(series, f"{P}upstreams_up") == 1 and value(series, f"{P}upstreams_total") == 3
    assert value(series, f"{P}upstream_up", upstream=ok) == 1
    assert value(series, f"{P}upstream_up", upstream=unhealthy) == 0
    assert value(series, f"{P}upstream_up", upstream=closed) == 0


def test_no_upstream_answers(log):
    series = log.collect([f"127.0.0.1:{closed_port()}", f"[::1]:{closed_port()}"])
    assert value(series, f"{P}upstreams_up") == 0 and value(series, f"{P}upstreams_total") == 2


@pytest.mark.parametrize("text, parsed", [("10.9.0.11:8001", ("10.9.0.11", 8001)), ("[fd00::1]:8002", ("fd00::1", 8002)),
                                          ("vllm-1.example:8001", ("vllm-1.example", 8001))])
def test_upstream_addresses_as_nginx_writes_them(text, parsed):
    assert edge_metrics.upstream(text) == parsed


@pytest.mark.parametrize("bad", ["10.9.0.11", "fd00::1:8001", "10.9.0.11:0", "10.9.0.11:70000", "a b:1", ""])
def test_a_malformed_upstream_is_refused_before_anything_is_read(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        edge_metrics.main(["--out", str(tmp_path / "x.prom"), "--state", str(tmp_path / "s"), "--upstream", bad])
    assert exit_.value.code == 2 and "ADDRESS:PORT" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- the script, run as the timer runs it --------------------------------------------------------

def run_script(log, *upstreams):
    command = [sys.executable, "-I", str(EDGE_METRICS), "--log", str(log.path), "--out", str(log.out),
               "--state", str(log.state), *[a for u in upstreams for a in ("--upstream", u)]]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)


def test_the_textfile_and_state_are_replaced_whole(log, upstreams):
    log.write(*REAL)
    log.out.write_text("# stale\n")
    before = log.out.stat().st_ino
    done = run_script(log, *upstreams)
    assert done.returncode == 0, done.stderr
    assert "2 of 3 upstreams not healthy" in done.stderr
    assert log.out.stat().st_ino != before, "written in place: the node exporter could read half a file"
    assert stat.S_IMODE(log.out.stat().st_mode) == 0o644  # the node exporter's user reads it
    assert stat.S_IMODE(log.state.stat().st_mode) == 0o600
    assert [p.name for p in log.out.parent.iterdir()] == ["vllm-fleet-edge.prom"]
    assert [p.name for p in log.state.parent.iterdir()] == ["edge-state.json"]
    series = parse_exposition(log.out.read_text())
    assert value(series, f"{P}responses_total", status="200") == 4 and value(series, f"{P}fallback_responses_total") == 1
    assert value(series, f"{P}upstreams_up") == 1 and value(series, f"{P}log_unparsed_lines_total") == 0


def test_the_names_are_those_the_alert_rules_read(log, upstreams):
    log.write(line(502))
    series = log.collect(upstreams)
    rules = (TEMPLATES / "prometheus" / "vllm-fleet-rules.yml.j2").read_text()
    used = set(re.findall(r"\bvllm_fleet_edge_[a-z_]+", rules))
    assert used == {f"{P}responses_total", f"{P}fallback_responses_total", f"{P}upstreams_up", f"{P}upstreams_total"}
    assert used <= {name for name, _ in series}


@pytest.mark.skipif(not PROMTOOL.exists(), reason=f"{PROMTOOL} is not installed (the Makefile installs it; "
                                                  "PROMTOOL_UNDER_TEST=PATH names another)")
def test_promtool_accepts_the_exposition(log, upstreams):
    log.write(*REAL)
    log.collect(upstreams)
    done = subprocess.run([str(PROMTOOL), "check", "metrics"], check=False, input=log.out.read_text(),
                          capture_output=True, text=True, timeout=60)
    # The only lint: `_total` is a counter's suffix, and the gauge's name is fixed by the alert rules
    # (the count of the upstreams, next to upstreams_up). Exit 3 is lint only; 1 would be a parse error.
    allowed = {f'{P}upstreams_total non-counter metrics should not have "_total" suffix'}
    problems = set((done.stdout + done.stderr).splitlines())
    assert done.returncode in (0, 3) and problems <= allowed, done.stdout + done.stderr
