"""Ledger schema 1 → 2: the top-level fields ``last_sleep_at`` and ``ppl_base``.

Version 2 records when the last sleep cycle committed (``last_sleep_at``, ISO-8601 UTC, null
before the first) and the perplexity of the held-out text before the first edit (``ppl_base``,
null until measured). A version-1 ledger has neither, so both start as null: the engine
measures ``ppl_base`` before the next edit when the ledger has no memories, and otherwise the
next sleep cycle sets both (until then, perplexity drift is reported as 0).
Some version-1 ledgers written by development builds already carry the fields; their values
are kept.
"""

from __future__ import annotations

from typing import Any


def upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """A version-2 copy of the version-1 document ``doc`` (which is left as it is)."""
    return {
        **doc,
        "schema_version": 2,
        "last_sleep_at": doc.get("last_sleep_at"),
        "ppl_base": doc.get("ppl_base"),
    }
