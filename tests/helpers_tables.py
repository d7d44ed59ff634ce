"""Run one golden JSON table of tests/fixtures/opensora through its own table runner."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from opensora_lib.fixtures import Comparison

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "opensora"


def run_table(
    name: str, matches: Callable[[dict], bool], runner: Callable[[Path, dict], list[Comparison]]
) -> list[Comparison]:
    """The table runner itself on FIXTURES/name (run_path would also import every other runner of the package)."""
    path = FIXTURES / name
    table = json.loads(path.read_text())
    assert matches(table), f"{name} is not recognised by {matches.__name__}"
    return runner(path, table)
