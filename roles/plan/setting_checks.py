"""What the settings table's values may be, checked, and the table in words: a host's data and an
instance entry refused when a key is unknown or a value has the wrong type, choice, range or form
(``roles.plan.settings`` declares every setting once), and `vllm-fleet settings`'s text.

Any host-data key that starts with a role prefix but is not declared is refused before a host is
touched, with the closest declared name as the fix: a misspelt setting must never silently fall
back to its default.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from roles.common import did_you_mean
from roles.errors import FleetConfigError
from roles.plan.forms import INSTANCE_NAME
from roles.plan.settings import BY_NAME, INSTANCE_KEYS, PER_INSTANCE, ROLE_PREFIXES, SETTINGS, Setting


def suggest(name: str, candidates: list[str]) -> str:
    """The fix for an unknown setting name: the closest declared one, else where the list is."""
    return did_you_mean(name, candidates) or "see `vllm-fleet settings` for the list."


def _type_name(expected: type | tuple[type, ...]) -> str:
    return expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)


def _is_a(value: Any, expected: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is no number (Python says it is an int) and an int is a float."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def _within(setting: Setting, number: float) -> bool:
    return ((setting.minimum is None or number >= setting.minimum)
            and (setting.maximum is None or number <= setting.maximum)
            and (setting.above is None or number > setting.above))


def _check_scalar(field: str, setting: Setting, value: Any) -> None:
    """A number within the setting's bounds, a string (or list element) of its form."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _within(setting, value):
        raise FleetConfigError(field, f"{value!r} is outside the allowed range ({setting.bounds()}).",
                               f"set `{setting.name}` to a value {setting.bounds()}: {setting.doc}")
    if setting.form is not None and not setting.form.test(str(value)):
        raise FleetConfigError(field, f"{value!r} is not {setting.form.what}.",
                               f"write `{setting.name}` in that form, e.g. {setting.form.example!r}: {setting.doc}")


def _check_value(field: str, setting: Setting, value: Any) -> None:
    """Refuse a value of the wrong type, or outside the setting's choices, bounds or form."""
    if value is None:
        return
    if not _is_a(value, setting.type):
        name = _type_name(setting.type)
        raise FleetConfigError(field, f"expected a {name}, got {value!r}.",
                               f"set `{setting.name}` to a {name} ({setting.doc})")
    if setting.choices and value not in setting.choices:
        raise FleetConfigError(field, f"{value!r} is not one of {', '.join(map(str, setting.choices))}.",
                               f"pick one of those for `{setting.name}`.")
    if not isinstance(value, list):
        _check_scalar(field, setting, value)
        return
    for index, element in enumerate(value if setting.item is not None else ()):
        if not _is_a(element, setting.item):
            name = _type_name(setting.item)
            raise FleetConfigError(f"{field}[{index}]", f"expected a {name}, got {element!r}.",
                                   f"make every element of `{setting.name}` a {name} ({setting.doc})")
        _check_scalar(f"{field}[{index}]", setting, element)


def check_host_data(host_name: str, data: Mapping[str, Any]) -> None:
    """Refuse unknown role-prefixed keys, and values of the wrong type, range or form, in one host's data."""
    for key, value in data.items():
        if not key.startswith(ROLE_PREFIXES):
            continue
        setting = BY_NAME.get(key)
        if setting is None:
            raise FleetConfigError(
                f"host {host_name}: setting `{key}`", "is not a vllm-fleet setting.",
                f"{suggest(key, list(BY_NAME))} (misspelt settings are never ignored).")
        _check_value(f"host {host_name}: `{key}`", setting, value)


def check_override(field: str, key: str, value: Any) -> None:
    """Refuse a bad value of per-instance setting ``key`` (its short name), as ``field``."""
    _check_value(field, PER_INSTANCE[key], value)


def check_instance_entry(host_name: str, index: int, entry: Any) -> None:
    """Refuse an instance entry that is not a mapping, holds unknown keys or bad values, or lacks
    a name or port."""
    where = f"host {host_name}: vllm_instances[{index}]"
    if not isinstance(entry, Mapping):
        raise FleetConfigError(where, f"expected a mapping like {{name: a, port: 8001}}, got {entry!r}.",
                               "give each instance a name and a port.")
    name = entry.get("name")
    if isinstance(name, str) and INSTANCE_NAME.test(name):
        where = f"host {host_name}: instance {name}: vllm_instances[{index}]"
    for key, value in entry.items():
        setting = INSTANCE_KEYS.get(key) or PER_INSTANCE.get(key)
        if setting is None:
            raise FleetConfigError(
                f"{where}: `{key}`", "is not a per-instance setting.",
                suggest(key, list(INSTANCE_KEYS) + list(PER_INSTANCE)))
        _check_value(f"{where}: `{key}`", setting, value)
    for key, setting in INSTANCE_KEYS.items():
        if entry.get(key) is None:
            raise FleetConfigError(f"{where}: `{key}`", "is missing.", f"give every instance a {key}: {setting.doc}")


def allowed(setting: Setting) -> str:
    """The values a setting takes beyond its type, in words ("" when any of its type will do)."""
    each = "each " if setting.item is not None else ""
    parts = [f"one of {', '.join(map(str, setting.choices))}"] if setting.choices else []
    parts += [f"a list of {_type_name(setting.item)}"] if setting.item is not None else []
    parts += [each + setting.bounds()] if setting.bounds() else []
    parts += [each + setting.form.what] if setting.form is not None else []
    return "; ".join(parts)


def describe(which: Iterable[Setting] = SETTINGS) -> str:
    """The settings table (or some of its rows) as plain text, for the CLI and the docs."""
    lines = []
    for s in which:
        scope = " [per instance]" if s.per_instance else ""
        values = f"\n    allowed: {allowed(s)}" if allowed(s) else ""
        lines.append(f"{s.name} ({_type_name(s.type)}, default {s.default!r}){scope}\n    {s.doc}{values}")
    return "\n".join(lines)
