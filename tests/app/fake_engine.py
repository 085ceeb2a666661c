"""A stand-in for :class:`sleeptui.engine.Engine` for UI tests: canned replies, a ledger in memory.

It implements the API the app uses and nothing of what makes memory work; it proves that the
app drives the engine correctly, never that the model remembers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from sleeptui.errors import SleeptuiError, UnknownMemory
from sleeptui.facts import Fact
from sleeptui.ledger import Memory, Recall, now
from sleeptui.sleep import Pressure, SleepReport

REPLY = "I do not know much about that, but here is **a reply** streamed one word at a time."


@dataclass(frozen=True)
class ForgetReport:
    memory: Memory
    verified: bool
    answer_after: str


def wait(gate: threading.Event, stop: threading.Event | None, timeout: float = 10) -> bool:
    """Wait until ``gate`` is set (True), or until ``stop`` is (False), as the app quits."""
    deadline = time.monotonic() + timeout
    while not gate.wait(0.01):
        if (stop is not None and stop.is_set()) or time.monotonic() > deadline:
            return False
    return True


class FakeEngine:
    """Replies stream word by word; ``hold`` (an Event) pauses a reply until a test sets it.

    Attributes:
        asked: Every (question, history) that ask() received.
        sleep_gate: While set to an unset Event, a sleep cycle waits on it before finishing.
        remember_gate: The same for each fact that remember() writes.
        fail_remember, fail_sleep: Raised by remember() / sleep() when set.
    """

    def __init__(
        self,
        memories: Sequence[Fact] = (),
        reply: str = REPLY,
        token_delay: float = 0.0,
        capacity: int = 8,
        threshold: float = 0.7,
        degraded: Sequence[int] = (),
        warnings: Sequence[str] = (),
    ) -> None:
        self.source = SimpleNamespace(preset=SimpleNamespace(name="fake-135m"))
        self.backend = SimpleNamespace(name="fake")
        self.folder = SimpleNamespace(
            root=Path("/tmp/sleeptui-fake/state"), warnings=list(warnings)
        )
        self.reply = reply
        self.token_delay = token_delay
        self.capacity = capacity
        self.threshold = threshold
        self.asked: list[tuple[str, list[dict[str, str]]]] = []
        self.hold: threading.Event | None = None
        self.sleep_gate: threading.Event | None = None
        self.remember_gate: threading.Event | None = None
        self.sleeps = 0
        self.fail_remember: Exception | None = None
        self.fail_sleep: Exception | None = None
        self.closed = False
        self.progress = None
        self._count = 0
        self._memories: tuple[Memory, ...] = ()
        self.remember(list(memories))
        for i in degraded:
            m = self._memories[i]
            self._put(
                replace(m, degraded=True, last_recall=Recall(now(), completion=False, chat=False))
            )

    @property
    def memories(self) -> tuple[Memory, ...]:
        return self._memories

    def remember(self, facts: Sequence[Fact]) -> list[Memory]:
        if self.fail_remember is not None:
            raise self.fail_remember
        written = []
        for n, fact in enumerate(facts):
            if self.progress:
                self.progress("wake", n, len(facts))
            if self.remember_gate is not None:
                self.remember_gate.wait(10)
            self._count += 1
            memory = Memory.new(fact, memory_id=f"m{self._count:04d}")
            self._memories = (*self._memories, memory)
            written.append(memory)
        if self.progress and facts:
            self.progress("wake", len(facts), len(facts))
        return written

    def ask(
        self,
        question: str,
        history: Sequence[dict[str, str]] = (),
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        self.asked.append((question, list(history)))
        for n, word in enumerate(self.reply.split(" ")):
            if stop is not None and stop.is_set():
                return
            if n == 3 and self.hold is not None and not wait(self.hold, stop):
                return
            if self.token_delay:
                time.sleep(self.token_delay)
            yield word if n == 0 else " " + word

    def forget(self, memory_id: str) -> ForgetReport:
        memory = next((m for m in self._memories if m.id == memory_id), None)
        if memory is None:
            raise UnknownMemory(f"No memory has the id {memory_id!r}.")
        self._memories = tuple(m for m in self._memories if m.id != memory_id)
        return ForgetReport(memory, verified=True, answer_after=" the same as everyone else.")

    def sleep(self, progress=None, cancel: threading.Event | None = None) -> SleepReport:
        active = self._memories
        stages = (("perplexity", 1), ("audit", len(active)), ("refresh", len(active)))
        for stage, n in stages:
            for i in range(n + 1):
                if progress:
                    progress(stage, i, n)
        if self.sleep_gate is not None and not wait(self.sleep_gate, cancel):
            raise SleeptuiError("The sleep cycle was cancelled; nothing changed.")
        if self.fail_sleep is not None:
            raise self.fail_sleep
        degraded = sum(m.degraded for m in active)
        for m in active:
            self._put(
                replace(
                    m,
                    stage="consolidated",
                    degraded=False,
                    scale=0.5,
                    last_recall=Recall(now(), completion=True, chat=True),
                )
            )
        self.sleeps += 1
        return SleepReport(
            cycle=1,
            healthy=len(active) - degraded,
            degraded=degraded,
            refreshed=degraded,
            pruned=0,
            recall=1.0,
            chat_recall=1.0,
            ppl_before=21.37,
            ppl_after=21.41,
            rolled_back=False,
            seconds=0.1,
        )

    def sleep_until_converged(self, progress=None, cancel=None) -> list[SleepReport]:
        first = self.sleep(progress, cancel)
        return [first, replace(self.sleep(progress, cancel), converged=True)]

    def pressure(self) -> Pressure:
        active = [m for m in self._memories if m.stage == "wake"]
        degraded = sum(m.degraded for m in self._memories)
        total = len(self._memories)
        value = min(1.0, len(active) / self.capacity + degraded / max(total, 1) / 2)
        return Pressure(
            value=round(value, 3),
            healthy=total - degraded,
            degraded=degraded,
            total=total,
            capacity_left=max(0, self.capacity - len(active)),
            threshold=self.threshold,
            nap_threshold=1.0,  # the fake never naps by itself
        )

    def close(self) -> None:
        self.closed = True

    def _put(self, memory: Memory) -> None:
        self._memories = tuple(memory if m.id == memory.id else m for m in self._memories)
