"""The custom facts of roles/facts.py, tested the way pyinfra tests its own (pyinfra's
``tests/facts/<module>.<Fact>/<case>.json`` and ``tests/test_facts.py``).

Each ``<FactName>/<case>.json`` holds:

- ``args``: the fact's keyword arguments, as the roles pass them (``host.get_fact(Fact, links_dir=...)``);
  pyinfra's cases name positional ones ``arg`` instead. Left out when the fact takes none.
- ``command``: the shell command the fact runs, exactly.
- ``requires_command``: the binary the fact needs, when it names one.
- ``output``: the lines the command prints on a host.
- ``fact``: the value, compared as JSON: tuples are lists, sets are sorted lists.

pyinfra does not call ``process()`` when a command prints nothing: it returns the fact's
``default()``. A case with empty output therefore checks both.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from pyinfra.api import FactBase, StringCommand

from roles import facts

HERE = Path(__file__).parent
CASES = sorted(HERE.glob("*/*.json"))
KEYS = {"args", "command", "requires_command", "output", "fact"}


def as_json(value):
    def encode(item):
        if isinstance(item, (set, frozenset)):
            return sorted(item)
        raise TypeError(f"{item!r} is not JSON")

    return json.loads(json.dumps(value, default=encode))


def fact_classes() -> dict[str, type]:
    return {name: cls for name, cls in inspect.getmembers(facts, inspect.isclass)
            if issubclass(cls, FactBase) and cls.__module__ == facts.__name__}


@pytest.mark.parametrize("path", CASES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_fact(path: Path):
    case = json.loads(path.read_text())
    assert set(case) <= KEYS, f"unknown keys {set(case) - KEYS}"
    fact_cls = fact_classes().get(path.parent.name)
    assert fact_cls is not None, f"roles/facts.py has no fact {path.parent.name}"
    fact = fact_cls()
    args = case.get("args", {})

    assert StringCommand(fact.command(**args)).get_raw_value() == case["command"]
    assert fact.requires_command(**args) == case.get("requires_command")
    assert as_json(fact.process(case["output"])) == case["fact"]
    if not case["output"]:
        assert as_json(fact.default()) == case["fact"]


def test_every_fact_has_cases_and_one_for_a_host_with_nothing():
    """A new fact without cases, or one whose empty output was never looked at, fails here."""
    for name in fact_classes():
        outputs = [json.loads(path.read_text())["output"] for path in HERE.glob(f"{name}/*.json")]
        assert len(outputs) >= 2, f"{name}: fewer than two cases in tests/facts/{name}/"
        assert [] in outputs, f"{name}: no case with empty output"
