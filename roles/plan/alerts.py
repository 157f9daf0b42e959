"""The fleet's Prometheus alert rules, rendered from the ``monitor_*`` settings, and the metric
names that they (or a dashboard's queries) use.

The rules are ``templates/prometheus/vllm-fleet-rules.yml.j2``: one group per area (instances,
edge, GPUs, hosts), each alert with a ``severity`` label and ``summary`` and ``runbook``
annotations. Thresholds are settings; the ``for`` durations are fixed in the template, which
says why each is what it is.

A dashboard that goes blank because vLLM renamed a metric is what operators complain about
most, so every name an expression uses can be listed (``expression_metrics``,
``metric_names``) and checked against what a release really exposes before anything is
deployed. This module is pure: no pyinfra, no I/O besides reading its template.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jinja2
import yaml

from roles.errors import FleetConfigError
from roles.paths import TEMPLATES
from roles.plan import setting_checks, settings

RULES_TEMPLATE = "vllm-fleet-rules.yml.j2"
# The rendered file's name (roles.plan.monitoring.RULES_FILE is where Prometheus reads it).
RULES_FILE_NAME = "vllm-fleet-rules.yml"

# The settings the rules read, each a jinja variable of the same name in the template.
THRESHOLD_SETTINGS = (
    "monitor_queue_waiting_max",
    "monitor_kv_cache_usage_max",
    "monitor_ttft_p95_max_s",
    "monitor_itl_p95_max_s",
    "monitor_lb_5xx_ratio_max",
    "monitor_fallback_share_max",
    "monitor_gpu_temperature_max_c",
    "monitor_disk_free_min",
)
RULE_SETTINGS = THRESHOLD_SETTINGS + ("monitor_scrape_interval", "vllm_data_dir")

# XIDs after which a GPU is unusable, or its memory untrustworthy, until it is reset or replaced.
# Application faults (13, 31, 43, 45: a bad kernel, a page fault, a killed process) are not
# here: the GPU is fine and the instance's own restart handles them.
CRITICAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint or warning: the GPU's firmware stopped on an error",
    62: "internal micro-controller halt: the GPU stops answering until reset",
    63: "ECC page retirement or row remap recorded: applied only at the next reset",
    64: "ECC page retirement or row remapper recording failure",
    74: "NVLink error: tensor-parallel instances across the link stall or fail",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate: memory failing",
    94: "contained ECC error: the process was stopped, the GPU needs a reset",
    95: "uncontained ECC error: every process on the GPU is affected",
    119: "GSP RPC timeout: the GPU's firmware stopped answering (Hopper and later run on GSP)",
    120: "GSP error: the GPU's firmware failed",
    140: "unrecovered ECC error in GPU memory",
    154: "the driver's recovery action changed: it asks for a GPU reset or a reboot",
}

# A rate needs two samples in its window; four scrapes leave room for a missed one.
SCRAPES_PER_RATE_WINDOW = 4
MIN_RATE_WINDOW_S = 300

_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES / "prometheus"), keep_trailing_newline=True,
                                trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def _setting_values(data: Mapping[str, Any], host_name: str) -> dict[str, Any]:
    """The effective value of every setting the rules read, each checked like the deploy checks it."""
    values = {name: settings.value(data, name) for name in RULE_SETTINGS}
    setting_checks.check_host_data(host_name, values)
    return values


def rate_window(scrape_interval_s: int) -> str:
    """The window of every rate(): five minutes, or four scrapes when they are further apart."""
    seconds = max(MIN_RATE_WINDOW_S, SCRAPES_PER_RATE_WINDOW * scrape_interval_s)
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def mountpoints_holding(path: str) -> list[str]:
    """The mount points that may hold an absolute path, nearest first: /var/lib/x, /var/lib, /var, /."""
    parts = [part for part in path.split("/") if part]
    return ["/" + "/".join(parts[:n]) for n in range(len(parts), 0, -1)] + ["/"]


def render_rules(data: Mapping[str, Any], host_name: str = "monitor") -> str:
    """The alert rules file for Prometheus, with the thresholds of ``data`` (host or group data;
    unset settings take their defaults). A value of the wrong type or range is refused."""
    values = _setting_values(data, host_name)
    return _TEMPLATES.get_template(RULES_TEMPLATE).render(
        **values,
        rate_window=rate_window(values["monitor_scrape_interval"]),
        critical_xid_pattern="|".join(str(xid) for xid in CRITICAL_XIDS),
        model_cache_dir=values["vllm_data_dir"],
        model_cache_mounts=mountpoints_holding(values["vllm_data_dir"]),
    )


# ---- the metric names an expression uses ---------------------------------------------------------

_TOKEN = re.compile(r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z]*(?:\d+[a-zA-Z]+)*)
    | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<operator>==|!=|<=|>=|=~|!~|[-+*/%^<>=])
    | (?P<open>[({\[])
    | (?P<close>[)}\]])
    | (?P<other>[,@])
""", re.VERBOSE)
_CLOSING = {"(": ")", "{": "}", "[": "]", "labels": ")"}
# Keywords that are never metric names: aggregations (which may come before their `by`),
# set operators, modifiers, and number literals. Functions are told by the `(` after them.
_KEYWORDS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio", "and", "or", "unless", "atan2", "by", "without", "on", "ignoring",
    "group_left", "group_right", "bool", "offset", "inf", "nan",
})
# Keywords whose parenthesis holds label names, not an expression.
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_MATCH_OPERATORS = frozenset({"=", "!=", "=~", "!~"})


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    """(kind, text) of every token of a PromQL expression, without spaces and comments."""
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise FleetConfigError(f"PromQL expression {expr!r}", f"{expr[position]!r} at {position} is not PromQL.",
                                   "fix the expression (promtool check rules shows where).")
        position = match.end()
        if match.lastgroup not in ("space", "comment"):
            yield match.lastgroup, match.group()


def _unquote(text: str) -> str:
    return text[1:-1] if text.startswith("`") else ast.literal_eval(text)


def _selector_metric(tokens: list[tuple[str, str]], index: int) -> str | None:
    """Inside `{...}`: the metric name that the string at ``index`` gives, if it gives one: a bare
    quoted name (Prometheus 3: {"vllm:x", le="1"}) or the value of __name__="...". """
    before = tokens[index - 1][1]
    after = tokens[index + 1][1] if index + 1 < len(tokens) else ""
    if before in ("{", ",") and after not in _MATCH_OPERATORS:
        return _unquote(tokens[index][1])
    if before == "=" and index >= 2 and tokens[index - 2] == ("name", "__name__"):
        return _unquote(tokens[index][1])
    return None


def expression_metrics(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects: the identifiers that are neither keywords,
    functions (followed by `(`), label names (inside `{}` or a by/without/on/ignoring/group_*
    list), durations nor numbers. Unbalanced brackets are refused."""
    tokens = list(_tokens(expr))
    names: set[str] = set()
    open_brackets: list[str] = []  # "(", "{", "[", or "labels" for a label list's "("
    for index, (kind, text) in enumerate(tokens):
        inside = open_brackets[-1] if open_brackets else None
        before = tokens[index - 1] if index else ("", "")
        after = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "open":
            label_list = text == "(" and before[0] == "name" and before[1].lower() in _LABEL_LISTS
            open_brackets.append("labels" if label_list else text)
        elif kind == "close":
            if inside is None or _CLOSING[inside] != text:
                raise FleetConfigError(f"PromQL expression {expr!r}", f"{text!r} closes nothing that is open.",
                                       "balance its brackets.")
            open_brackets.pop()
        elif inside == "{":
            if kind == "string" and (name := _selector_metric(tokens, index)):
                names.add(name)
        elif inside in ("[", "labels"):
            continue  # a duration or subquery range, or label names
        elif kind == "name" and text.lower() not in _KEYWORDS and after != "(":
            names.add(text)
    if open_brackets:
        raise FleetConfigError(f"PromQL expression {expr!r}", f"{open_brackets[-1][:1]!r} is never closed.",
                               "balance its brackets.")
    return names


def _rules(rules_text: str) -> list[dict[str, Any]]:
    """Every rule of a Prometheus rules file, in file order; a file of another shape is refused."""
    try:
        document = yaml.safe_load(rules_text)
    except yaml.YAMLError as e:
        raise FleetConfigError("alert rules", f"are not YAML ({e}).", "fix the rules file.") from None
    groups = document.get("groups") if isinstance(document, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise FleetConfigError("alert rules", "have no `groups:` list of groups.",
                               "give them Prometheus's rule file layout: groups: [{name, rules: [...]}].")
    rules = [rule for group in groups for rule in group.get("rules") or ()]
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("expr"), (str, int, float)):
            raise FleetConfigError("alert rules", f"hold a rule without an expression: {rule!r}.",
                                   "give every rule an `expr`.")
    return rules


def rule_expressions(rules_text: str) -> list[tuple[str, str]]:
    """(alert or record name, expression) of every rule of a Prometheus rules file, in file order."""
    return [(rule.get("alert") or rule.get("record"), str(rule["expr"])) for rule in _rules(rules_text)]


def metric_names(rules_text: str) -> set[str]:
    """Every metric name the rules' expressions read from targets: the series that the file's own
    recording rules create are left out, since no target exposes them."""
    rules = _rules(rules_text)
    used = set().union(*(expression_metrics(str(rule["expr"])) for rule in rules))
    return used - {rule["record"] for rule in rules if "record" in rule}
