#!/usr/bin/env python3
"""Every vLLM instance of this host read twice, a window apart: /health's status and the lines of
/metrics that `vllm-fleet status` uses, as one JSON object on stdout. Run ON an instance host by
`vllm-fleet status` when it reads the instances directly, with the system's python3 (stdlib only:
hosts have no extra packages). It is sent as `python3 -c` text, so it runs on hosts deployed with
any vllm-fleet version; nothing is installed.

    sample_instances.py --address 10.0.0.5 --instance a:8001 [--instance b:8002 ...]
                        --metric NAME [--metric NAME ...] --window 10 [--timeout 5]

vLLM serves /health and /metrics without the API key. The output, per instance its two readings:
{"a": [FIRST, SECOND], ...}, each
{"health": 200 or null, "metrics": "lines" or null, "at": monotonic seconds or null, "error": null or why}.
It only reads: the increases over the window and the quantile are worked out on the control node
(roles/plan/status.py), which parses the lines.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from http.client import HTTPConnection, HTTPException

# The sample name at the start of a line of Prometheus's text format (comments have none).
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def get(address: str, port: int, path: str, timeout: float) -> tuple[int, str]:
    """One plain-HTTP GET, each socket operation bounded by ``timeout``: (status, body)."""
    conn = HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def kept_lines(page: str, metrics: set[str]) -> str:
    """The sample lines of ``metrics`` on a /metrics page: the rest never leaves the host."""
    return "\n".join(line for line in page.splitlines() if (m := _NAME.match(line)) and m.group(0) in metrics)


def reading(address: str, port: int, metrics: set[str], timeout: float) -> dict:
    """One instance read once: /health's status and its /metrics lines, with when the page came."""
    result = {"health": None, "metrics": None, "at": None, "error": None}
    try:
        result["health"] = get(address, port, "/health", timeout)[0]
        status, page = get(address, port, "/metrics", timeout)
        if status == 200:
            result["metrics"], result["at"] = kept_lines(page, metrics), time.monotonic()
        else:
            result["error"] = f"/metrics answered HTTP {status}"
    except (OSError, HTTPException) as error:  # refused, timed out, reset, a garbled answer
        result["error"] = f"{type(error).__name__}: {error}".rstrip(": ")
    return result


def sample(address: str, instances: list[tuple[str, int]], metrics: set[str], window: float,
           timeout: float) -> dict:
    """Every instance read, then each read again ``window`` seconds after its first reading began
    (its own clock: an instance that hangs until the timeout does not shorten the next one's window;
    the control node divides by the seconds between the two pages, not by ``window``)."""
    first = {}
    for name, port in instances:
        first[name] = (time.monotonic(), reading(address, port, metrics, timeout))
    readings = {}
    for name, port in instances:
        began, earlier = first[name]
        time.sleep(max(0.0, began + window - time.monotonic()))
        readings[name] = [earlier, reading(address, port, metrics, timeout)]
    return readings


def instance(text: str) -> tuple[str, int]:
    name, _, port = text.rpartition(":")
    if not name or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:PORT")
    return name, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sample_instances.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="where this host's instances listen")
    parser.add_argument("--instance", type=instance, action="append", required=True, help="NAME:PORT")
    parser.add_argument("--metric", action="append", required=True, help="a sample name to keep")
    parser.add_argument("--window", type=float, required=True, help="seconds between the two readings")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for each socket operation")
    args = parser.parse_args(argv)
    print(json.dumps(sample(args.address, args.instance, set(args.metric), args.window, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
