"""sleeptui: a terminal chat agent whose memories live in the model's own weights."""

__version__ = "0.1.0"
