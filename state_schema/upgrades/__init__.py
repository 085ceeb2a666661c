"""Upgrades of the ledger document, one module per version step (``vN_to_vN+1.py``).

Each step is a pure function from a document of version N to one of version N+1; a ledger of
any older version is brought up to date by running the steps in order. Add a step here, and a
paragraph to ``state_schema/README.md``, whenever the schema version goes up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import v1_to_v2, v2_to_v3

Document = dict[str, Any]

STEPS: dict[int, Callable[[Document], Document]] = {
    1: v1_to_v2.upgrade,
    2: v2_to_v3.upgrade,
}
"""The step that turns a document of version N (the key) into one of version N+1."""


def upgrade(doc: Document, to: int) -> Document:
    """``doc`` brought from its ``schema_version`` up to version ``to``, one step at a time.

    Raises:
        ValueError: ``doc`` is of a version no step starts from.
    """
    while doc["schema_version"] < to:
        step = STEPS.get(doc["schema_version"])
        if step is None:
            raise ValueError(f"no upgrade from ledger schema {doc['schema_version']}")
        doc = step(doc)
    return doc
