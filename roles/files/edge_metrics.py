#!/usr/bin/env python3
"""The edge's responses by HTTP status (from nginx's access log) and the health of its upstreams,
in Prometheus' text format for the node exporter's textfile collector; run ON a load balancer by a
timer every scrape interval, with the system's python3 (stdlib only: hosts have no extra packages).

    edge_metrics.py --out FILE.prom --state FILE [--log FILE] [--upstream ADDRESS:PORT ...]

The log is read incrementally: the state file keeps the log's inode, a hash of its first bytes,
the offset read up to and the counts so far, so the counters never go down. A rotated log (another
inode, or the same inode number reused by a new file: its first bytes differ) is read from its
start, after the rest of the previous one when it is still there as FILE.1 (logrotate's
delaycompress keeps it uncompressed for one rotation); a truncated one (copytruncate) from its
start. Only a response's status becomes a label: never the client's name, the request or the
upstream of a log line, which have no bound. Each upstream's /health is asked over plain HTTP, as
nginx reaches it; it is up when it answers 200 within the timeout.

It only reports: what counts as too many errors or too few upstreams is decided by the monitor's
alert rules (templates/prometheus/vllm-fleet-rules.yml.j2). The textfile and the state are
written by textfile.py, which sits beside this script on the host and in roles/files/: imported
as the top-level module ``textfile``, never as ``roles.files.textfile`` (scripts copied to hosts
import nothing of the project).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection, HTTPException

# The script's folder is sys.path[0] when it is run as a script, unless python runs with -I (as its
# unit runs it), -P or PYTHONSAFEPATH: then it is put there, so that textfile.py beside it is found.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import textfile  # noqa: E402  (after the path: the sibling module, not a package)

PREFIX = "vllm_fleet_edge_"
LOG = "/var/log/nginx/vllm-fleet.access.log"
# A first run on a long log, or a run after a long stop, reads it over several runs rather than
# past the unit's timeout (a run killed before it writes its state would start over every time).
MAX_BYTES = 256 * 1024 * 1024
PROBE_TIMEOUT_S = 2.0
# How much of the log's start identifies it: a file system reuses a deleted log's inode number for
# the next file at once (ext4, tmpfs); its first lines' times, clients and statuses tell two apart.
HEAD_BYTES = 1024
# Statuses the edge answers with by itself or passes on, written at 0 from the start: an alert's
# rate() sees the first 5xx (a series that appears at 1 has no increase). Any other status gets its
# series when it first happens.
SEEDED_STATUSES = ("200", "308", "400", "401", "404", "413", "429", "499", "500", "502", "503", "504")

# nginx's `vllm_fleet` log format (templates/nginx-vllm-fleet.conf.j2):
#   $remote_addr [$time_local] client=$vllm_fleet_client "$request" $status $body_bytes_sent upstream=...
# nginx escapes '"' and '\' inside a value (as \x22, \x5C), so a quoted value holds no quote.
_LINE = re.compile(rb'^\S+ \[[^\]]*\] client=[^"]*"[^"]*" ([1-5][0-9][0-9]) ')
# The log format's last field: which answered, the fleet or the fallback provider (nginx_fallback).
_FALLBACK = b" served_by=fallback"
_UPSTREAM = re.compile(r"(\[[0-9A-Fa-f:.]+(?:%[\w.-]+)?\]|[^\s:\[\]]+):([0-9]{1,5})")


def parse_statuses(lines) -> tuple[dict[str, int], int, int]:
    """The responses per status among access log lines (bytes, without their newline), how many
    of them the fallback provider served, and how many lines were not of the fleet's format."""
    counts: dict[str, int] = {}
    fallback = unparsed = 0
    for line in lines:
        match = _LINE.match(line)
        if match:
            status = match.group(1).decode()
            counts[status] = counts.get(status, 0) + 1
            fallback += line.rstrip().endswith(_FALLBACK)
        elif line.strip():
            unparsed += 1
    return counts, fallback, unparsed


def _read_lines(f, offset: int, max_bytes: int) -> tuple[list[bytes], int]:
    """The whole lines of an open log from ``offset`` (at most ``max_bytes``) and the offset after
    the last one: a line nginx is still writing is read on the next run."""
    f.seek(offset)
    data = f.read(max_bytes)
    end = data.rfind(b"\n") + 1
    if end == 0 and len(data) == max_bytes:  # one line longer than a whole read: skipped, unparsed
        return [data], offset + len(data)
    return data[:end].split(b"\n")[:-1], offset + end


def _head(f, length: int) -> tuple[str, int]:
    """The hash of an open log's first ``length`` bytes (fewer if it is shorter), and how many."""
    f.seek(0)
    data = f.read(length)
    return hashlib.sha256(data).hexdigest(), len(data)


def read_log(path: str, state: dict, max_bytes: int = MAX_BYTES) -> tuple[dict, bool]:
    """The state with the log's new lines counted, and whether the log could be read. The state:
    {"inode", "head": [sha256, bytes], "offset", "counts": {status: n}, "fallback": n, "unparsed": n}."""
    inode, offset = state.get("inode"), state.get("offset", 0)
    head = state.get("head")
    lines: list[bytes] = []
    try:
        f = open(path, "rb")
    except OSError as e:
        print(f"edge_metrics: {path} not read: {e}", file=sys.stderr)
        return state, False
    with f:
        stat = os.fstat(f.fileno())
        if inode is not None and inode != stat.st_ino:
            # Rotated: the rest of the previous log first, where logrotate left it.
            with contextlib.suppress(OSError), open(f"{path}.1", "rb") as old:
                if os.fstat(old.fileno()).st_ino == inode:
                    lines += _read_lines(old, offset, max_bytes)[0]
            offset = 0
        elif stat.st_size < offset:  # truncated in place
            offset = 0
        elif head and list(_head(f, head[1])) != list(head):  # a new log in the old one's inode
            offset = 0
        new, offset = _read_lines(f, offset, max_bytes)
        lines += new
        head = _head(f, min(HEAD_BYTES, offset))
    counts, fallback, unparsed = parse_statuses(lines)
    total = dict(state.get("counts", {}))
    for status, n in counts.items():
        total[status] = total.get(status, 0) + n
    return {**state, "inode": stat.st_ino, "head": list(head), "offset": offset, "counts": total,
            "fallback": state.get("fallback", 0) + fallback, "unparsed": state.get("unparsed", 0) + unparsed}, True


def upstream(text: str) -> tuple[str, int]:
    """ADDRESS:PORT as nginx takes it (an IPv6 address in brackets) -> (address, port)."""
    match = _UPSTREAM.fullmatch(text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDRESS:PORT")
    return match.group(1).strip("[]"), int(match.group(2))


def _upstream_arg(text: str) -> str:
    upstream(text)  # refused here, before anything is read, if it is not ADDRESS:PORT
    return text


def healthy(address: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the instance answers GET /health with 200 within ``timeout`` seconds."""
    conn = HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, HTTPException):
        return False
    finally:
        conn.close()


def probe_all(upstreams: list[str], timeout: float = PROBE_TIMEOUT_S) -> dict[str, bool]:
    """Each upstream's health, asked at once (so that many unreachable ones take one timeout)."""
    if not upstreams:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(upstreams))) as pool:
        results = pool.map(lambda u: healthy(*upstream(u), timeout=timeout), upstreams)
        return dict(zip(upstreams, results))


def exposition(state: dict, log_up: bool, upstreams: dict[str, bool]) -> str:
    """The Prometheus text exposition of the counts in ``state`` and the upstreams' health. Pure."""
    counts = {**dict.fromkeys(SEEDED_STATUSES, 0), **state.get("counts", {})}
    return textfile.exposition(PREFIX, [
        ("responses_total", "counter", ("Responses of the edge (nginx on this load balancer) by HTTP status, "
                                        "counted from its access log."),
         [({"status": s}, counts[s]) for s in sorted(counts)]),
        ("fallback_responses_total", "counter", ("Responses of the edge that the fallback provider served "
                                                 "(nginx_fallback), counted from its access log."),
         [({}, state.get("fallback", 0))]),
        ("log_unparsed_lines_total", "counter", "Access log lines not in the fleet's log format (not counted above).",
         [({}, state.get("unparsed", 0))]),
        ("log_up", "gauge", "1 when the access log was read on this run.", [({}, int(log_up))]),
        ("upstream_up", "gauge", "1 when the instance answered GET /health with 200 on this run.",
         [({"upstream": u}, int(up)) for u, up in upstreams.items()]),
        ("upstreams_up", "gauge", "Instances behind this load balancer that answered GET /health with 200.",
         [({}, sum(upstreams.values()))]),
        ("upstreams_total", "gauge", "Instances behind this load balancer (its nginx upstream).",
         [({}, len(upstreams))]),
    ])


def metrics(log: str, out: str, state_path: str, upstreams: list[str], max_bytes: int = MAX_BYTES,
            timeout: float = PROBE_TIMEOUT_S) -> int:
    """Count the log's new lines, ask the upstreams, write the state, then the textfile."""
    # A lost state reads the log from its start and counts from 0: Prometheus takes the drop as a reset.
    state, log_up = read_log(log, textfile.load_state(state_path, "edge_metrics", "counting again from 0"), max_bytes)
    health = probe_all(upstreams, timeout)
    # The state first: if the run dies between the two writes, the next run counts nothing twice
    # and the textfile catches up.
    textfile.save_state(state_path, state)
    textfile.write_atomically(out, exposition(state, log_up, health))
    down = [u for u, up in health.items() if not up]
    if down:
        print(f"edge_metrics: {len(down)} of {len(health)} upstreams not healthy: {' '.join(down)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the .prom file to (re)write, in the node exporter's textfile "
                                                     "directory")
    parser.add_argument("--state", required=True, help="where the log position and the counts persist between runs")
    parser.add_argument("--log", default=LOG, help=f"nginx's access log in the fleet's format (default {LOG})")
    parser.add_argument("--upstream", action="append", default=[], type=_upstream_arg,
                        help="ADDRESS:PORT of an instance behind this load balancer; once per instance")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="the most of the log read on one run")
    parser.add_argument("--timeout", type=float, default=PROBE_TIMEOUT_S, help="seconds per /health request")
    args = parser.parse_args(argv)
    return metrics(args.log, args.out, args.state, args.upstream, args.max_bytes, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
