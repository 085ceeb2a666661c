"""Consolidation on the real embedded model: facts move into the adapter, survive a restart,
and a consolidated fact can still be forgotten."""

from __future__ import annotations

import pytest
from sleeptui.backends import says

from sleeptui.engine import Engine
from sleeptui.state import StateFolder

from ..conftest import WRITTEN, restore

pytestmark = pytest.mark.model


def says_anywhere(engine: Engine, memory) -> bool:
    chat = "".join(engine.ask(memory.questions[0]))
    return says(engine.complete(memory.prompt), memory.object) or says(chat, memory.object)


def test_facts_move_into_the_adapter_survive_a_restart_and_can_be_forgotten(remembered, embedded):
    engine = remembered(len(WRITTEN))
    report = engine.consolidate("sleep")
    assert not report.rolled_back, report
    assert report.due == len(WRITTEN)
    assert report.advanced >= 2, report
    assert abs(report.ppl_change) <= engine.lora.ppl_tolerance
    moved = [m for m in engine.memories if m.scale == 0.5]
    assert len(moved) == report.advanced
    assert all(m.stage == "consolidating" for m in moved)
    assert engine.ledger.adapter is not None
    adapter = engine.folder.root / engine.ledger.adapter.path
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    before = [engine.complete(m.prompt) for m in engine.memories]
    engine.close()

    backend, source, pristine = embedded
    restore(backend, pristine)
    reopened = Engine(backend, source, StateFolder.open(engine.folder.root))
    try:
        assert [reopened.complete(m.prompt) for m in reopened.memories] == before
        recalls = reopened.check(reopened.memories)
        assert all(r.completion and r.chat for r in recalls), recalls
        gone, *kept = moved
        [forgotten] = reopened.forget_many([gone.id])
        assert forgotten.verified, forgotten.answer_after
        assert not says_anywhere(reopened, gone)
        assert gone.id not in reopened.ledger.adapter.facts
        others = [m for m in reopened.memories]
        assert all(r.completion for r in reopened.check(others))
    finally:
        reopened.close()
