"""Sleep: Algorithm 1 of the convergence paper, one function per step, and sleep pressure.

A cycle measures perplexity, audits every active memory, reverts each degraded one and
re-solves it in place under null-space constraints that protect the healthy ones (and those
already refreshed in this cycle), measures perplexity again and commits the whole cycle as
one transaction — or rolls it back if the model got worse. A memory is only ever pruned after
failing ``prune_after`` refreshes in a row, and pruning keeps its ledger entry: working
memories are never deleted, and the ledger holds exactly one entry per fact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sleeptui.ledger import Ledger, Memory, Recall, now

if TYPE_CHECKING:
    from sleeptui.engine import Engine

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SleepReport:
    """What one cycle did (the paper's Table 6 columns and more)."""

    cycle: int
    healthy: int
    degraded: int
    refreshed: int
    pruned: int
    recall: float
    chat_recall: float
    ppl_before: float
    ppl_after: float
    rolled_back: bool
    seconds: float
    converged: bool = False
    pruned_ids: tuple[str, ...] = ()
    ppl_tried: float | None = None
    """The perplexity measured after the refreshes (= ``ppl_after`` unless rolled back)."""

    @property
    def ppl_change(self) -> float:
        return self.ppl_after / self.ppl_before - 1


@dataclass(frozen=True)
class Pressure:
    """How much sleep is needed, in [0, 1], and what it is made of."""

    value: float
    healthy: int
    degraded: int
    total: int
    capacity_left: int
    threshold: float
    nap_threshold: float

    @property
    def due(self) -> bool:
        return self.total > 0 and self.value >= self.threshold


class Cancelled(Exception):
    """The cycle was cancelled before it committed; nothing changed."""


def audit(engine: Engine, memories: tuple[Memory, ...], progress: Progress | None) -> list[Recall]:
    """Line 2–4: measure each memory's recall (completion and chat)."""
    if progress:
        progress("audit", 0, len(memories))
    recalls = engine.check(memories)
    if progress:
        progress("audit", len(memories), len(memories))
    return recalls


def refresh(
    engine: Engine,
    degraded: list[Memory],
    protected: list[Memory],
    progress: Progress | None,
    cancel: threading.Event | None,
) -> dict[str, dict]:
    """Lines 6–9: revert each degraded memory, then re-solve it with null-space constraints.

    The constraints are the keys of every healthy memory and of those refreshed earlier in
    this cycle, so a refresh cannot undo another one.
    """
    for memory in degraded:
        engine.revert(memory)
    keys = engine.keys_of(protected)
    new: dict[str, dict] = {}
    for i, memory in enumerate(degraded):
        if cancel is not None and cancel.is_set():
            raise Cancelled
        if progress:
            progress("refresh", i, len(degraded))
        [edit] = engine.editor().write([memory.fact], constraints=keys)
        new[memory.id] = edit.factors
        keys.append(edit.keys)
        engine.remember_keys(memory.id, edit.keys)
    if progress:
        progress("refresh", len(degraded), len(degraded))
    return new


def run_cycle(
    engine: Engine,
    cycle: int = 1,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> SleepReport:
    """One sleep cycle as a transaction: it commits whole or is rolled back whole."""
    cfg = engine.sleep_cfg
    started = time.perf_counter()
    snapshot = engine.snapshot()
    if progress:
        progress("perplexity", 0, 2)
    ppl_before = engine.perplexity()
    active = tuple(m for m in engine.memories if m.scale > 0)
    recalls = audit(engine, active, progress)
    healthy = [m for m, r in zip(active, recalls, strict=True) if r.completion]
    degraded = [m for m, r in zip(active, recalls, strict=True) if not r.completion]
    to_prune = [m for m in degraded if _failed_refreshes(m) >= cfg.prune_after]
    to_refresh = [m for m in degraded if m not in to_prune]
    try:
        for m in to_prune:
            engine.revert(m)
        new_factors = refresh(engine, to_refresh, healthy, progress, cancel)
        if progress:
            progress("perplexity", 1, 2)
        ppl_after = engine.perplexity()
        after = audit(engine, active, None) if to_refresh or to_prune else recalls
    except BaseException:
        engine.restore(snapshot)
        raise
    rolled_back = ppl_after / ppl_before - 1 > cfg.ppl_tolerance
    if rolled_back:
        engine.restore(snapshot)
        after = recalls
    else:
        ledger = _updated_ledger(
            engine.ledger, active, recalls, after, new_factors, to_prune, ppl_before
        )
        engine.commit_cycle(ledger, new_factors, [m.id for m in to_prune], snapshot)
    if progress:
        progress("perplexity", 2, 2)
    n = max(1, len(active))
    return SleepReport(
        cycle=cycle,
        healthy=len(healthy),
        degraded=len(degraded),
        refreshed=0 if rolled_back else len(to_refresh),
        pruned=0 if rolled_back else len(to_prune),
        recall=sum(r.completion for r in after) / n,
        chat_recall=sum(r.chat for r in after) / n,
        ppl_before=ppl_before,
        ppl_after=ppl_before if rolled_back else ppl_after,
        rolled_back=rolled_back,
        seconds=time.perf_counter() - started,
        pruned_ids=tuple(m.id for m in to_prune) if not rolled_back else (),
        ppl_tried=ppl_after,
    )


def _updated_ledger(
    ledger: Ledger,
    active: tuple[Memory, ...],
    before: list[Recall],
    after: list[Recall],
    refreshed: dict[str, dict],
    pruned: list[Memory],
    ppl_before: float,
) -> Ledger:
    """Every audited memory's entry, updated in place: recall, degraded flag, history."""
    pruned_ids = {m.id for m in pruned}
    for memory, first, last in zip(active, before, after, strict=True):
        m = memory.with_event("audited", completion=first.completion, chat=first.chat)
        if memory.id in refreshed:
            # A refresh writes the fact whole, so a consolidating memory starts over at 1.0.
            m = replace(m, scale=1.0, stage="wake").with_event(
                "refreshed", completion=last.completion, chat=last.chat
            )
        if memory.id in pruned_ids:
            m = (
                replace(m, scale=0.0)
                .with_event(
                    "pruned", reason=f"failed {_failed_refreshes(memory)} refreshes in a row"
                )
                .with_event("scale changed", scale=0.0)
            )
        m = replace(m, last_recall=last, degraded=not last.completion)
        ledger = ledger.upsert(m)
    return replace(ledger, last_sleep_at=now(), ppl_base=ledger.ppl_base or ppl_before)


def _failed_refreshes(memory: Memory) -> int:
    """Refreshes in a row after which the memory still did not recall."""
    count = 0
    for event in reversed(memory.events):
        if event.kind == "refreshed":
            if event.detail.get("completion"):
                break
            count += 1
        elif event.kind in ("remembered", "pruned"):
            break
    return count


def pressure(engine: Engine) -> Pressure:
    """Sleep pressure: degraded count blended with edit-count, time and perplexity terms."""
    cfg = engine.sleep_cfg
    active = [m for m in engine.memories if m.scale > 0]
    degraded = sum(m.degraded for m in active)
    since = engine.ledger.last_sleep_at
    new = [m for m in active if since is None or m.created_at > since]
    hours = 0.0
    start = since or min((m.created_at for m in active), default=None)
    if start:
        hours = (datetime.now(UTC) - datetime.fromisoformat(start)).total_seconds() / 3600
    drift = engine.last_ppl_drift()
    terms = (
        cfg.w_degraded * min(1.0, degraded / max(cfg.degraded_full, 0.1 * len(active)))
        + cfg.w_edits * min(1.0, len(new) / cfg.wake_capacity)
        + cfg.w_time * min(1.0, hours / cfg.hours_full)
        + cfg.w_ppl * min(1.0, max(0.0, drift) / cfg.ppl_tolerance)
    )
    return Pressure(
        value=round(min(1.0, terms), 3),
        healthy=len(active) - degraded,
        degraded=degraded,
        total=len(active),
        capacity_left=max(0, cfg.wake_capacity - len(new)),
        threshold=cfg.threshold,
        nap_threshold=cfg.nap_threshold,
    )
