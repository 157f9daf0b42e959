"""The fleet's Grafana dashboard (``dashboards/vllm-fleet.json``) and the metric names its queries
use, so that every vLLM name a panel reads is checked against what the release exposes
(``roles.plan.metrics.check_release_metrics``) like the alert rules' names are: a panel must
not go blank because vLLM renamed a metric.

The queries hold Grafana's variables (``$host``, ``${model}``, ``[[host]]``,
``$__rate_interval``), which are not PromQL: ``substitute_variables`` replaces them with values
of the same kind (a duration, a regular expression) before a query is parsed. This module is
pure: no pyinfra, no I/O besides reading the dashboard file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from roles.errors import FleetConfigError
from roles.paths import REPO_ROOT
from roles.plan.alerts import expression_metrics

DASHBOARD = REPO_ROOT / "dashboards" / "vllm-fleet.json"
# How the release check names the file (relative to the repository, like the rules template).
DASHBOARD_NAME = DASHBOARD.relative_to(REPO_ROOT).as_posix()

# Grafana's built-in interval variables, each replaced by a value of its kind.
_BUILTIN_VALUES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "__interval_ms": "60000",
    "__range_ms": "3600000",
    "__range_s": "3600",
}
# Any other variable (a template variable like $host) stands for label values: the queries use
# it inside a regular-expression matcher (host=~"$host"), where "match anything" keeps it valid.
_ANY_VALUE = ".*"
# $name, ${name} or ${name:format}, and the deprecated [[name]] or [[name:format]].
_VARIABLE = re.compile(r"\$\{(?P<braced>[A-Za-z_]\w*)(?::[^}]*)?\}|\$(?P<plain>[A-Za-z_]\w*)"
                       r"|\[\[(?P<old>[A-Za-z_]\w*)(?::[^\]]*)?\]\]")
# A query variable's label_values(SELECTOR, LABEL) and query_result(EXPR) hold PromQL; the
# one-argument label_values(LABEL), label_names() and metrics(REGEX) name no metric.
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.+),\s*[A-Za-z_]\w*\s*\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.DOTALL)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard's JSON model; a file that is not a JSON object is refused."""
    try:
        dashboard = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FleetConfigError(f"dashboard {path}", f"cannot be read as JSON ({e}).",
                               "fix the file (Grafana's dashboard JSON model: Share, Export).") from None
    if not isinstance(dashboard, dict):
        raise FleetConfigError(f"dashboard {path}", "is not a JSON object.", "export the dashboard's JSON model again.")
    return dashboard


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, in file order: a collapsed row holds its panels in its own
    ``panels`` list, an expanded one is followed by them at the top level."""
    def walk(items: Any) -> Iterator[dict[str, Any]]:
        for panel in items or ():
            if isinstance(panel, dict):
                yield panel
                yield from walk(panel.get("panels"))
    yield from walk(dashboard.get("panels"))


def panel_expressions(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) of every query of every panel, nested ones included, in file
    order; the expressions as written, Grafana variables and all."""
    return [(str(panel.get("title", "")), target["expr"])
            for panel in panels(dashboard) for target in panel.get("targets") or ()
            if isinstance(target, dict) and isinstance(target.get("expr"), str) and target["expr"].strip()]


def variable_expressions(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """("variable NAME", expression) of every query variable whose query reads a metric:
    label_values(SELECTOR, LABEL) gives SELECTOR, query_result(EXPR) gives EXPR."""
    found = []
    for variable in (dashboard.get("templating") or {}).get("list") or ():
        if not isinstance(variable, dict) or variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if not isinstance(query, str):
            continue
        match = _LABEL_VALUES.match(query) or _QUERY_RESULT.match(query)
        if match:
            found.append((f"variable {variable.get('name')}", match.group("expr")))
    return found


def substitute_variables(expr: str) -> str:
    """``expr`` with Grafana's variables replaced: the built-in intervals by a duration (or a
    number, for the _ms and _s ones), any other variable by ".*"."""
    def value(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("plain") or match.group("old")
        return _BUILTIN_VALUES.get(name, _ANY_VALUE)
    return _VARIABLE.sub(value, expr)


def metric_names(dashboard: Mapping[str, Any]) -> set[str]:
    """Every metric name the dashboard's panels (and query variables) read; a query that is not
    PromQL is refused, naming its panel."""
    names: set[str] = set()
    for title, expr in panel_expressions(dashboard) + variable_expressions(dashboard):
        try:
            names |= expression_metrics(substitute_variables(expr))
        except FleetConfigError as e:
            raise FleetConfigError(f"dashboard {DASHBOARD_NAME}, panel {title!r}", e.problem, e.fix) from None
    return names
