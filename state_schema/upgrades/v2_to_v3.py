"""Ledger schema 2 → 3: the top-level field ``adapter``.

Version 3 records the LoRA adapter that sleep consolidation trains (its folder under
``adapters/``, the SHA-256 of its two files in peft's format, the ids of the memories it
holds and when it was trained), or null when there is none. No version-2 folder has an
adapter, so the step adds ``"adapter": null``; memories' ``stage`` and ``scale`` fields already
existed in version 2 and keep their values.
"""

from __future__ import annotations

from typing import Any


def upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """A version-3 copy of the version-2 document ``doc`` (which is left as it is)."""
    return {**doc, "schema_version": 3, "adapter": doc.get("adapter")}
