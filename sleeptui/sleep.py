"""Sleep: Algorithm 1 of the convergence paper, one function per step, and sleep pressure.

A cycle measures perplexity, audits every active memory, reverts each degraded one (and the
healthy ones that recalled only with its help) and re-solves it in place under null-space
constraints that protect the healthy ones (and those already refreshed in this cycle),
measures perplexity again and commits as one transaction: all its refreshes, or as many as
keep the model within the perplexity tolerance, or nothing. A memory is only ever pruned
after failing ``prune_after`` refreshes in a row, and pruning keeps its ledger entry: working
memories are never deleted, and the ledger holds exactly one entry per fact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from sleeptui.ledger import Ledger, Memory, Recall, now

if TYPE_CHECKING:
    from sleeptui.engine import Engine
    from sleeptui.presets import SleepConfig

Progress = Callable[[str, int, int], None]
# Writes a refresh may take to make its memory complete again (see :func:`refresh`).
REFRESH_PASSES = 2


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
    """The perplexity measured after all the refreshes (``ppl_after`` is what was kept)."""
    exposed: int = 0
    """Healthy memories that recalled only with a degraded one's help, refreshed as well."""
    deferred: int = 0
    """Refreshes undone to pass the perplexity check, left for the next cycle."""

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


def expose(
    engine: Engine, healthy: list[Memory], reverted: list[Memory]
) -> tuple[list[Memory], list[Memory]]:
    """Revert ``reverted``, then find the healthy memories that only recalled with their help.

    Memories written without constraints lean on each other: taking a degraded memory's delta
    out can take away part of what made a healthy one recall. Those are reverted and refreshed
    as well, or the cycle would end with new degraded memories. Repeats until no revert
    exposes another (at most ``len(healthy)`` rounds, each one greedy completion per memory).

    Returns:
        (still healthy, exposed), in ledger order.
    """
    for memory in reverted:
        engine.revert(memory)
    exposed: list[Memory] = []
    while healthy:
        lost = [m for m, ok in zip(healthy, engine.completes(healthy), strict=True) if not ok]
        if not lost:
            break
        for memory in lost:
            engine.revert(memory)
        exposed += lost
        healthy = [m for m in healthy if m not in lost]
    return healthy, exposed


def refresh(
    engine: Engine,
    degraded: list[Memory],
    protected: list[Memory],
    progress: Progress | None,
    cancel: threading.Event | None,
) -> dict[str, dict]:
    """Lines 6–9: re-solve each (already reverted) degraded memory with null-space constraints.

    The constraints are the keys of every protected memory and of those refreshed earlier in
    this cycle, so a refresh cannot undo another one. A refresh shifts the residual stream by
    at most ``refresh_clamp_norm`` · ‖h‖ (less than a wake edit), and is checked at once; one
    that does not complete yet gets a second pass from where the first left the model, and
    the memory's delta is the sum of both (rank two per layer, still one entry per fact).
    """
    held = list(zip(protected, engine.keys_of(protected), strict=True))
    new: dict[str, dict] = {}
    editor = engine.refresh_editor()
    for i, memory in enumerate(degraded):
        if cancel is not None and cancel.is_set():
            raise Cancelled
        if progress:
            progress("refresh", i, len(degraded))
        # Memories about the same subject share its keys: v* keeps them instead (as in wake).
        kin = [m.fact for m, _ in held if engine.kept_together(m.fact, [memory.fact])]
        keys = [k for m, k in held if not engine.kept_together(m.fact, [memory.fact])]
        template = engine.holds_template([memory.fact])
        [edit] = editor.write([memory.fact], keys, keep=[kin], hold_template=template)
        factors = edit.factors
        for _ in range(REFRESH_PASSES - 1):
            if engine.completes([memory]) == [True]:
                break
            [edit] = editor.write([memory.fact], keys, keep=[kin], hold_template=template)
            factors = stack_factors(factors, edit.factors)
        new[memory.id] = factors
        held.append((memory, edit.keys))
        engine.remember_keys(memory.id, edit.keys)
    if progress:
        progress("refresh", len(degraded), len(degraded))
    return new


def stack_factors(first: dict, second: dict) -> dict:
    """The factors of ΔW₁ + ΔW₂ per layer: u side by side, v stacked (ranks add)."""
    return {
        layer: (
            np.concatenate([u, second[layer][0]], axis=1),
            np.concatenate([v, second[layer][1]]),
        )
        for layer, (u, v) in first.items()
    }


def run_cycle(
    engine: Engine,
    cycle: int = 1,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> SleepReport:
    """One sleep cycle as a transaction: what it keeps is committed at once, the rest undone.

    If the perplexity check fails, the cycle keeps as many of its refreshes as pass it (see
    :func:`within_tolerance`); the memories whose refresh was undone keep an empty delta and
    their entry, marked degraded, for the next cycle. When no refresh passes, the cycle is
    rolled back whole.
    """
    cfg = engine.sleep_cfg
    started = time.perf_counter()
    snapshot = engine.snapshot()
    if progress:
        progress("perplexity", 0, 2)
    ppl_before = engine.committed_perplexity()
    ppl_base = engine.base_perplexity()  # measured here only once per model (then cached)
    active = tuple(m for m in engine.memories if m.scale > 0)
    recalls = audit(engine, active, progress)
    healthy = [m for m, r in zip(active, recalls, strict=True) if r.completion]
    degraded = [m for m, r in zip(active, recalls, strict=True) if not r.completion]
    to_prune = [m for m in degraded if _failed_refreshes(m) >= cfg.prune_after]
    to_refresh = [m for m in degraded if m not in to_prune]
    try:
        protected, exposed = expose(engine, healthy, to_prune + to_refresh)
        # The exposed recalled until this cycle: they are put right first, so that a cycle
        # that can keep only part of its work keeps theirs.
        to_refresh = exposed + to_refresh
        new_factors = refresh(engine, to_refresh, protected, progress, cancel)
        if progress:
            progress("perplexity", 1, 2)
        changed = bool(to_refresh or to_prune)
        ppl_tried = ppl_after = engine.perplexity() if changed else ppl_before
        rolled_back = ppl_after / ppl_before - 1 > cfg.ppl_tolerance
        deferred: list[Memory] = []
        if rolled_back and len(to_refresh) > 1:
            kept, ppl_after = within_tolerance(
                engine, to_refresh, new_factors, ppl_before, cfg.ppl_tolerance, progress
            )
            # The memories past the k kept stay reverted: none of them recalls in this state
            # (each was degraded, or exposed), and the next cycle refreshes them.
            deferred = to_refresh[kept:]
            to_refresh = to_refresh[:kept]
            new_factors = {m.id: new_factors[m.id] for m in to_refresh}
            rolled_back = kept == 0
        after = audit(engine, active, None) if changed and not rolled_back else recalls
    except BaseException:
        engine.restore(snapshot)
        raise
    if rolled_back:
        engine.restore(snapshot)
    else:
        ledger = _updated_ledger(
            engine.ledger, active, recalls, after, new_factors, to_prune, ppl_base, deferred
        )
        writes = new_factors | {m.id: {} for m in deferred}  # an empty delta: edits nothing
        engine.commit_cycle(ledger, writes, [m.id for m in to_prune], snapshot)
        engine.note_perplexity(ppl_after)
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
        ppl_tried=ppl_tried,
        exposed=len(exposed),
        deferred=0 if rolled_back else len(deferred),
    )


def within_tolerance(
    engine: Engine,
    refreshed: list[Memory],
    new: dict[str, dict],
    ppl_before: float,
    tolerance: float,
    progress: Progress | None,
) -> tuple[int, float]:
    """The most refreshes, in the order they were written, that pass the perplexity check.

    Each refresh was solved on the weights the ones before it left, with the later memories
    reverted, so undoing the last n − k refreshes gives back exactly the state after the k-th.
    Bisection over k, one perplexity measurement per step; the weights are left at the k found.

    Returns:
        (k, the perplexity at k).
    """
    at = len(refreshed)

    def move_to(k: int) -> None:
        nonlocal at
        for m in refreshed[k:at]:
            engine.apply_factors(new[m.id], -1.0)
        for m in refreshed[at:k]:
            engine.apply_factors(new[m.id], 1.0)
        at = k

    lo, hi, ppl_lo = 0, len(refreshed), ppl_before
    steps = max(1, (len(refreshed) - 1).bit_length())
    while hi - lo > 1:
        if progress:
            progress("perplexity gate", steps - (hi - lo - 1).bit_length(), steps)
        mid = (lo + hi) // 2
        move_to(mid)
        ppl = engine.perplexity()
        if ppl / ppl_before - 1 <= tolerance:
            lo, ppl_lo = mid, ppl
        else:
            hi = mid
    move_to(lo)
    return lo, ppl_lo


def _updated_ledger(
    ledger: Ledger,
    active: tuple[Memory, ...],
    before: list[Recall],
    after: list[Recall],
    refreshed: dict[str, dict],
    pruned: list[Memory],
    ppl_base: float | None,
    deferred: Sequence[Memory] = (),
) -> Ledger:
    """Every audited memory's entry, updated in place: recall, degraded flag, history."""
    pruned_ids = {m.id for m in pruned}
    deferred_ids = {m.id for m in deferred}
    for memory, first, last in zip(active, before, after, strict=True):
        m = memory.with_event("audited", completion=first.completion, chat=first.chat)
        if memory.id in refreshed:
            # A refresh writes the fact whole, so a consolidating memory starts over at 1.0.
            m = replace(m, scale=1.0, stage="wake").with_event(
                "refreshed", completion=last.completion, chat=last.chat
            )
        if memory.id in deferred_ids:
            # Its delta is now empty; the refresh that will write it again starts at 1.0.
            m = replace(m, scale=1.0, stage="wake").with_event(
                "refresh deferred", reason="over the perplexity tolerance; next cycle"
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
    return replace(ledger, last_sleep_at=now(), ppl_base=ppl_base)


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
    """The sleep pressure of the engine's memories (see :func:`pressure_of`)."""
    return pressure_of(engine.ledger, engine.sleep_cfg, engine.last_ppl_drift())


def pressure_of(ledger: Ledger, cfg: SleepConfig, drift: float = 0.0) -> Pressure:
    """Sleep pressure: degraded count blended with edit-count, time and perplexity terms.

    ``drift`` is the relative perplexity change last measured (0 when none was, as in a
    process that has not measured it).
    """
    active = [m for m in ledger.memories if m.scale > 0]
    degraded = sum(m.degraded for m in active)
    since = ledger.last_sleep_at
    new = [m for m in active if since is None or m.created_at > since]
    hours = 0.0
    start = since or min((m.created_at for m in active), default=None)
    if start:
        hours = (datetime.now(UTC) - datetime.fromisoformat(start)).total_seconds() / 3600
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
