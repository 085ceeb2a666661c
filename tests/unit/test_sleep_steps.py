"""The bookkeeping of a sleep cycle's steps, on stand-ins for the engine.

Which memory recalls, and what the perplexity is, are decided here by rules (memory B
recalls only while A's delta is in the weights; each refresh costs so much perplexity), so
that the control flow of :func:`sleeptui.sleep.expose` and :func:`within_tolerance` can be
checked exactly. That memories really recall after a cycle is shown on the real model in
tests/e2e/test_sleep.py and measured by bench/sleep.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from sleeptui.facts import Fact
from sleeptui.ledger import Memory
from sleeptui.sleep import expose, stack_factors, within_tolerance


def memory(name: str) -> Memory:
    return Memory.new(
        Fact(name, "lives in", "Oslo", f"{name} lives in", (f"Where does {name} live?",))
    )


@dataclass
class LeaningEngine:
    """Memories whose recall depends on other memories' deltas being applied."""

    applied: set[str]
    leans_on: dict[str, str]  # memory → the memory whose delta it needs
    reverted: list[str] = field(default_factory=list)
    probes: int = 0

    def revert(self, m: Memory) -> None:
        self.applied.discard(m.subject)
        self.reverted.append(m.subject)

    def completes(self, memories) -> list[bool]:
        self.probes += 1
        return [
            m.subject in self.applied and self.leans_on.get(m.subject, m.subject) in self.applied
            for m in memories
        ]


def test_reverting_a_degraded_memory_exposes_the_healthy_ones_that_leaned_on_it():
    a, b, c, d = (memory(n) for n in ("Aino", "Bruno", "Chiara", "Dmitri"))
    # B needs A's delta; C needs B's; D stands alone.
    engine = LeaningEngine(
        {"Aino", "Bruno", "Chiara", "Dmitri"}, {"Bruno": "Aino", "Chiara": "Bruno"}
    )
    healthy, exposed = expose(engine, [b, c, d], [a])
    assert [m.subject for m in exposed] == ["Bruno", "Chiara"]  # C falls once B is reverted
    assert [m.subject for m in healthy] == ["Dmitri"]
    assert engine.reverted == ["Aino", "Bruno", "Chiara"]  # each exposed one is reverted too
    assert engine.probes == 3  # B falls, then C, then nothing more


def test_nothing_is_exposed_when_the_healthy_stand_alone():
    a, b = memory("Aino"), memory("Bruno")
    engine = LeaningEngine({"Aino", "Bruno"}, {})
    healthy, exposed = expose(engine, [b], [a])
    assert (healthy, exposed, engine.reverted) == ([b], [], ["Aino"])


def test_stacked_factors_add_their_updates():
    rng = np.random.default_rng(0)
    first = {3: (rng.normal(size=(6, 1)), rng.normal(size=(1, 4)))}
    second = {3: (rng.normal(size=(6, 1)), rng.normal(size=(1, 4)))}
    [(u, v)] = stack_factors(first, second).values()
    assert (u.shape, v.shape) == ((6, 2), (2, 4))
    np.testing.assert_allclose(u @ v, first[3][0] @ first[3][1] + second[3][0] @ second[3][1])


@dataclass
class CountingEngine:
    """Weights as a vector, each refresh a unit vector of its own, so that the perplexity can
    be made a function of which refreshes are in."""

    weights: np.ndarray
    ppl_of: object
    measured: int = 0

    def apply_factors(self, factors: dict, scale: float) -> None:
        for u, v in factors.values():
            self.weights = self.weights + scale * (u @ v).ravel()

    def perplexity(self) -> float:
        self.measured += 1
        return self.ppl_of(self.weights)


def unit(i: int, n: int) -> dict:
    v = np.zeros((1, n))
    v[0, i] = 1.0
    return {3: (np.ones((1, 1)), v)}


def test_a_failed_gate_keeps_the_most_refreshes_that_pass_it():
    memories = [memory(n) for n in ("Aino", "Bruno", "Chiara", "Dmitri", "Emil")]
    new = {m.id: unit(i, len(memories)) for i, m in enumerate(memories)}
    # After the cycle every refresh is in; each costs +0.4% perplexity.
    engine = CountingEngine(np.ones(len(memories)), lambda w: 20.0 * (1 + 0.004 * w.sum()))
    kept, ppl = within_tolerance(engine, memories, new, 20.0, 0.01, None)
    assert kept == 2 and ppl == pytest.approx(20.0 * 1.008)
    # The first two refreshes stay in the weights, the last three are undone.
    np.testing.assert_array_equal(engine.weights, [1, 1, 0, 0, 0])
    assert engine.measured <= 3  # bisection over 5: at most ⌈log2 5⌉ measurements


def test_when_no_refresh_passes_the_gate_all_are_undone():
    memories = [memory(n) for n in ("Aino", "Bruno", "Chiara")]
    new = {m.id: unit(i, 3) for i, m in enumerate(memories)}
    engine = CountingEngine(np.ones(3), lambda w: 25.0 + w.sum())
    kept, ppl = within_tolerance(engine, memories, new, 25.0, 0.01, None)
    assert (kept, ppl) == (0, 25.0)
    np.testing.assert_array_equal(engine.weights, [0, 0, 0])
