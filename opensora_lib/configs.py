"""Model configs given as files: a folder's config.json, and its values checked against the types the config takes,
so that a damaged file is named with what is wrong in it (not a bare JSONDecodeError or a TypeError deep in a
constructor)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


def read_config_json(folder: str | Path) -> dict[str, Any] | None:
    """The config.json of a model folder as a dict; None when `folder` is not a folder or has none."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not a text file ({e}); a model folder's config.json holds JSON") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object of config fields ({{...}}), not a {type(data).__name__}")
    return data


def _accepts(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list):
        items = [arg for arg in args if arg is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(any(_accepts(a, v) for a in items or [Any]) for v in value)
    return True  # Any, dicts, nested configs: checked by their own from_dict


def _name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_types(values: dict[str, Any], hints: dict[str, Any], what: str) -> None:
    """Refuse a value of the wrong type for any named field (a number as text, a list for a number, ...)."""
    for name, hint in hints.items():
        if name in values and not _accepts(hint, values[name]):
            raise ValueError(f"{what} config: {name} must be {_name(hint)}, got {values[name]!r}")


def check_field_types(cls: type, values: dict[str, Any], what: str | None = None) -> None:
    """check_types against the fields of the config dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    check_types(values, {f.name: hints[f.name] for f in dataclasses.fields(cls)}, what or cls.__name__)
