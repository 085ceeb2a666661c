"""Unit-test fixtures."""

from __future__ import annotations

import pytest

from sleeptui import engine


@pytest.fixture(autouse=True)
def short_reference(monkeypatch):
    """Unit tests check how drift is measured and acted on, not how precisely: they measure
    it on the reference text's first 10 paragraphs (about 470 tokens on the embedded model,
    17,000 on the tiny Llamas' byte tokenizer) instead of all 36. The e2e tests use it all."""
    text = "\n\n".join(engine._reference().split("\n\n")[:10])
    monkeypatch.setattr(engine, "_reference", lambda: text)
