"""sleeptui: a terminal chat agent whose memories live in the model's own weights."""

from sleeptui import offline as _offline  # noqa: F401  (before anything imports transformers)

__version__ = "0.1.0"
