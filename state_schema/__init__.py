"""The documented state-folder format: README.md and ledger.schema.json (package data)."""

from importlib.resources import files


def ledger_schema_text() -> str:
    """The JSON Schema of the ledger, as shipped with the package."""
    return files(__name__).joinpath("ledger.schema.json").read_text(encoding="utf-8")
