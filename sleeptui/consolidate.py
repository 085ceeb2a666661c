"""Consolidation: facts move from MEMIT into one LoRA adapter, each on its own schedule.

A consolidation (a *nap*, one short pass, or the deep-sleep version with more epochs) is one
transaction, like a sleep cycle:

1. measure perplexity and audit the memories MEMIT holds; those that recall are *due*;
2. take the due facts' MEMIT deltas out of the weights, so that the adapter has to hold each
   fact alone, and train the adapter (peft) on chat Q&A and completion pairs of the due facts,
   with replay of the facts it already holds; a KL term holds the model's predictions to
   what they were on text it writes itself and on the same relations about other people
   ("Aino Moreau lives in"), so that it learns these facts and not "everyone lives there";
   the adapter is warm-started from the previous one, and is trained on the model as it is
   now, every other memory applied (the paper's cumulative fusing);
3. put each due fact's delta back at the next scale of the schedule 1.0 → 0.5 → 0.1 → 0.0;
   a fact keeps that scale only if it still recalls in chat and by completion, otherwise it
   goes back to its scale (its MEMIT delta keeps it alive) and tries again next time;
4. measure perplexity again and roll everything back if it rose past the tolerance; otherwise
   commit the ledger, the adapter's files and the removal of deltas that reached 0.0.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from sleeptui import renderings
from sleeptui.adapter import Adapter, LoraSettings
from sleeptui.backends import Rendering
from sleeptui.covariance import OPENERS, REQUESTS
from sleeptui.facts import Fact
from sleeptui.ledger import AdapterRecord, Ledger, Memory, now

if TYPE_CHECKING:
    from sleeptui.engine import Engine

Progress = Callable[[str, int, int], None]
SCHEDULE = (1.0, 0.5, 0.1, 0.0)
"""The MEMIT scale of a fact as it consolidates; it moves one step per successful cycle."""
REPLAY_TOKENS = 48
# Made-up people for the specificity anchor: each fact's relation is also asked about one of
# them, and the model must keep answering that as it did before.
_FIRST = ("Aino", "Bruno", "Dalia", "Emre", "Farah", "Goran", "Hedda", "Ivo", "Jora", "Kalle")
_LAST = ("Moreau", "Okafor", "Lindqvist", "Nakamura", "Quispe", "Petrov", "Rasmussen", "Zielinski")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ConsolidationReport:
    """What one consolidation did.

    Attributes:
        kind: ``nap`` or ``sleep``.
        due: Memories that were trained into the adapter this time.
        advanced: Of those, the ones that moved one step down the schedule.
        stages: How many memories stand at each MEMIT scale afterwards (``"1.0"``…``"0.0"``).
        recall, chat_recall: Over every memory that should recall (not pruned), afterwards.
        ppl_tried: The perplexity measured with the new adapter (= ``ppl_after`` unless the
            consolidation was rolled back).
        loss_first, loss_last: Training loss of the first and last step.
    """

    cycle: int
    kind: str
    due: int
    advanced: int
    stages: dict[str, int]
    recall: float
    chat_recall: float
    ppl_before: float
    ppl_after: float
    ppl_tried: float
    rolled_back: bool
    seconds: float
    loss_first: float
    loss_last: float

    @property
    def ppl_change(self) -> float:
        return self.ppl_after / self.ppl_before - 1


def next_scale(scale: float) -> float:
    """The schedule's next value below ``scale``."""
    return next(s for s in SCHEDULE if s < scale - 1e-9)


def weight_names(settings: LoraSettings, n_layers: int) -> list[str]:
    """The Hugging Face names of the weights the adapter acts on."""
    layers = settings.layers or range(n_layers)
    return [
        f"model.layers.{layer}.{'self_attn' if t in _ATTENTION else 'mlp'}.{t}.weight"
        for layer in layers
        for t in settings.targets
    ]


def examples(engine: Engine, memories: Sequence[Memory]) -> list[Rendering]:
    """Training pairs of each memory: its completion, and each question answered in chat."""
    b = engine.backend
    out = []
    for m in memories:
        out.append(renderings.completion(b, "", m.fact))
        out += [renderings.chat_turn(b, q, m.fact) for q in m.questions]
    return out


def replay(engine: Engine, n: int, seed: int) -> list[Rendering]:
    """Text the model writes itself (fixed seed): chat answers to everyday requests and plain
    prose from short openers, half each. Training holds the model's next-token distribution
    on every position of these to what it was before (a KL term), so that the adapter learns
    the facts without bending the rest of the model."""
    b = engine.backend
    chats = [engine.chat_prompt(REQUESTS[(seed + i) % len(REQUESTS)]) for i in range(n - n // 2)]
    prose = [OPENERS[(seed + i) % len(OPENERS)] for i in range(n // 2)]
    rows = b.sample(chats + prose, REPLAY_TOKENS, seed)
    return [Rendering(tuple(row), (), tuple(range(1, len(row)))) for row in rows if len(row) > 1]


def neighbours(engine: Engine, memories: Sequence[Memory], seed: int) -> list[Rendering]:
    """Each memory's relation about a made-up person, by completion and in chat, with the
    memory's object as the text the anchor reads (the model must not come to say it)."""
    b = engine.backend
    subjects = {m.subject for m in engine.memories}
    names = [f"{f} {last}" for last in _LAST for f in _FIRST]
    names = [n for n in names if n not in subjects]
    out = []
    for i, m in enumerate(memories):
        name = names[(seed * 7 + i) % len(names)]
        other = Fact(name, m.relation, m.object, prompt=m.prompt.replace(m.subject, name))
        out.append(renderings.completion(b, "", other))
        question = next((q for q in m.questions if m.subject in q), None)
        if question:
            out.append(renderings.chat_turn(b, question.replace(m.subject, name), other))
    return out


def held(ledger: Ledger) -> list[Memory]:
    """Memories the current adapter was trained to hold and that are still in the ledger."""
    if ledger.adapter is None:
        return []
    ids = set(ledger.adapter.facts)
    return [m for m in ledger.memories if m.id in ids]


def train(
    engine: Engine,
    memories: Sequence[Memory],
    general: list[Rendering],
    epochs: int,
    init: Adapter | None,
    progress: Progress | None,
    cancel: threading.Event | None,
    seed: int | None = None,
    unsay: Sequence[Memory] = (),
) -> tuple[Adapter, list[float]]:
    """Train an adapter to hold ``memories`` alone: their MEMIT deltas and the current adapter
    are out of the weights (the caller's business). The model is held to its own
    distribution on ``general``, on the facts' relations about other people
    (:func:`neighbours`) and on ``unsay``'s own prompts and questions: forgotten memories,
    their deltas already reverted, so that the adapter cannot bring a forgotten object back
    through what it learnt from similar facts. ``seed`` orders the examples (each cycle its
    own, so a retry is not a repeat)."""
    settings = replace(engine.lora, epochs=epochs, seed=engine.lora.seed if seed is None else seed)
    losses: list[float] = []

    def step(i: int, n: int, loss: float) -> None:
        losses.append(loss)
        if progress:
            progress("train", i, n)

    anchor = general + neighbours(engine, memories, settings.seed) + examples(engine, unsay)
    adapter = engine.backend.train_lora(
        examples(engine, memories), settings, init, step, cancel, anchor=anchor
    )
    return adapter, losses


def run(
    engine: Engine,
    kind: str = "nap",
    cycle: int = 1,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> ConsolidationReport:
    """One consolidation as a transaction (see the module's docstring)."""
    settings = engine.lora
    started = time.perf_counter()
    epochs = settings.nap_epochs if kind == "nap" else settings.epochs
    snapshot = engine.snapshot(adapter=True)
    if progress:
        progress("perplexity", 0, 2)
    ppl_before = engine.perplexity()
    active = tuple(m for m in engine.memories if m.scale > 0)
    if progress:
        progress("audit", 0, len(active))
    recalls = engine.check(active)
    due = [m for m, r in zip(active, recalls, strict=True) if r.completion]
    keep = held(engine.ledger)
    train_on = due + [m for m in keep if m not in due]
    if not due:  # nothing MEMIT holds is ready to move: the adapter stays as it is
        stages = stage_histogram(engine.ledger)
        recall = _final_recall(engine)
        return ConsolidationReport(
            cycle,
            kind,
            0,
            0,
            stages,
            *recall,
            ppl_before,
            ppl_before,
            ppl_before,
            False,
            time.perf_counter() - started,
            float("nan"),
            float("nan"),
        )
    try:
        # Replay text is written by the model as it is now, before anything is taken out.
        general = replay(engine, settings.replay_samples, settings.seed + cycle)
        for m in due:
            engine.revert(m)
        old = engine.adapter
        engine.set_adapter(None)
        adapter, losses = train(
            engine, train_on, general, epochs, old, progress, cancel, seed=settings.seed + cycle
        )
        engine.set_adapter(adapter)
        for m in due:
            engine.apply_scale(m, next_scale(m.scale))
        if progress:
            progress("check", 0, len(due))
        after = engine.check(due)
        advanced = [m for m, r in zip(due, after, strict=True) if r.completion and r.chat]
        for m in due:
            if m not in advanced:
                engine.apply_scale(m, m.scale, current=next_scale(m.scale))
        if progress:
            progress("perplexity", 1, 2)
        ppl_after = engine.perplexity()
    except BaseException:
        engine.restore(snapshot)
        raise
    rolled_back = ppl_after / ppl_before - 1 > settings.ppl_tolerance
    if rolled_back:
        engine.restore(snapshot)
        ledger = engine.ledger
    else:
        ledger = _updated_ledger(engine, due, advanced, adapter, train_on)
        engine.commit_consolidation(ledger, adapter, snapshot)
    final = _final_recall(engine)
    if progress:
        progress("perplexity", 2, 2)
    return ConsolidationReport(
        cycle=cycle,
        kind=kind,
        due=len(due),
        advanced=0 if rolled_back else len(advanced),
        stages=stage_histogram(ledger),
        recall=final[0],
        chat_recall=final[1],
        ppl_before=ppl_before,
        ppl_after=ppl_before if rolled_back else ppl_after,
        ppl_tried=ppl_after,
        rolled_back=rolled_back,
        seconds=time.perf_counter() - started,
        loss_first=losses[0] if losses else float("nan"),
        loss_last=losses[-1] if losses else float("nan"),
    )


def stage_histogram(ledger: Ledger) -> dict[str, int]:
    counts = Counter(f"{m.scale:.1f}" for m in ledger.memories if not _pruned(m))
    return {f"{s:.1f}": counts.get(f"{s:.1f}", 0) for s in SCHEDULE}


def living(ledger: Ledger) -> list[Memory]:
    """Memories that should recall: MEMIT holds them, or the adapter does (not pruned)."""
    return [m for m in ledger.memories if not _pruned(m)]


def _pruned(m: Memory) -> bool:
    return m.scale == 0 and m.stage != "consolidated"


def _final_recall(engine: Engine) -> tuple[float, float]:
    memories = living(engine.ledger)
    recalls = engine.check(memories)
    n = max(1, len(recalls))
    return sum(r.completion for r in recalls) / n, sum(r.chat for r in recalls) / n


def _updated_ledger(
    engine: Engine,
    due: list[Memory],
    advanced: list[Memory],
    adapter: Adapter,
    trained_on: list[Memory],
) -> Ledger:
    ledger = engine.ledger
    ids = {m.id for m in advanced}
    for m in due:
        if m.id in ids:
            scale = next_scale(m.scale)
            stage = "consolidated" if scale == 0 else "consolidating"
            m = replace(m, scale=scale, stage=stage).with_event("scale changed", scale=scale)
        else:
            m = m.with_event("consolidation tried", scale=m.scale)
        ledger = ledger.upsert(m)
    return replace(ledger, adapter=adapter_record(engine.adapter_files(adapter), trained_on))


def adapter_record(files: dict[str, bytes], trained_on: Sequence[Memory]) -> AdapterRecord:
    """The ledger's record of an adapter with these files, trained to hold ``trained_on``."""
    from sleeptui.adapter import WEIGHTS

    return AdapterRecord(
        path=f"adapters/{_sha(files[WEIGHTS])[:16]}",
        files={name: _sha(data) for name, data in files.items()},
        facts=tuple(m.id for m in trained_on),
        trained_at=now(),
    )


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
