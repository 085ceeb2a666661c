"""The memory panel, and the workers that change memories: remember, forget, sleep.

The engine takes one mutating operation at a time, so every edit worker holds ``_edits`` while
it runs; an edit asked for during a sleep waits for the cycle to end. Replies do not wait.
Each worker reports through a typed message declared here; the panel updates itself from it and
the message bubbles on to the app, which writes the outcome into the chat.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message

from sleeptui.app.chat import RememberedNote
from sleeptui.app.gauges import ActivityView, PressureGauge
from sleeptui.app.memory_table import MemoryTable
from sleeptui.errors import SleeptuiError

if TYPE_CHECKING:
    from sleeptui.consolidate import ConsolidationReport
    from sleeptui.engine import Engine, ForgetReport
    from sleeptui.facts import Fact
    from sleeptui.ledger import Memory
    from sleeptui.sleep import Pressure, SleepReport

AGE_REFRESH_SECONDS = 30


def describe(error: BaseException) -> str:
    """A user-facing error keeps its message; anything else also names its type."""
    if isinstance(error, SleeptuiError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class MemoryPanel(Vertical):
    """The pressure gauge, the activity view and the table of memories."""

    @dataclass
    class Remembered(Message):
        note: RememberedNote | None
        memories: list[Memory]

    @dataclass
    class RememberFailed(Message):
        note: RememberedNote | None
        error: str

    @dataclass
    class Forgotten(Message):
        reports: list[ForgetReport]
        note: RememberedNote | None

    @dataclass
    class ForgetFailed(Message):
        error: str
        note: RememberedNote | None

    @dataclass
    class EngineProgressed(Message):
        """The engine's own progress: loading at start-up, then writing an edit.

        Posted here by the thread that does the work, so that an edit's last report is
        always handled before its outcome (``Remembered``), which puts the view back.
        """

        stage: str
        i: int
        n: int

    @dataclass
    class SleepProgressed(Message):
        stage: str
        i: int
        n: int

    @dataclass
    class Slept(Message):
        reports: list[SleepReport]
        auto: bool

    @dataclass
    class Napped(Message):
        report: ConsolidationReport

    @dataclass
    class SleepFailed(Message):
        error: str
        cancelled: bool

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.engine: Engine | None = None
        self.sleeping = False
        self.pressure_error: str | None = None
        self._edits = threading.Lock()
        self.cancel_sleep = threading.Event()

    def compose(self) -> ComposeResult:
        yield PressureGauge(id="pressure")
        yield ActivityView(id="activity")
        yield MemoryTable(id="memories")

    @property
    def table(self) -> MemoryTable:
        return self.query_one(MemoryTable)

    @property
    def activity(self) -> ActivityView:
        return self.query_one(ActivityView)

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        self.sync()
        self.set_interval(AGE_REFRESH_SECONDS, lambda: self.table.refresh_ages(engine.memories))

    def sync(self) -> None:
        """Show the engine's committed memories and pressure."""
        if self.engine is None:
            return
        self.table.sync(self.engine.memories)
        self.query_one(PressureGauge).show(self.pressure(), self.pressure_error)

    def pressure(self) -> Pressure | None:
        """The engine's sleep pressure; None (and ``pressure_error`` set) if it cannot say."""
        self.pressure_error = None
        if self.engine is None or not hasattr(self.engine, "pressure"):
            return None
        try:
            return self.engine.pressure()
        except Exception as e:  # shown in the gauge instead of the numbers
            self.pressure_error = describe(e)
            return None

    def memory(self, memory_id: str) -> Memory | None:
        memories = self.engine.memories if self.engine else ()
        return next((m for m in memories if m.id == memory_id), None)

    def wait_for_edits(self, timeout: float) -> bool:
        """Block until no edit runs (used on quit, before the engine is closed)."""
        if self._edits.acquire(timeout=timeout):
            self._edits.release()
            return True
        return False

    # -- workers -------------------------------------------------------------------

    def _engine(self) -> Engine:
        if self.engine is None:
            raise SleeptuiError("The model is still loading; try again in a moment.")
        return self.engine

    @work(thread=True, group="edit")
    def remember(self, facts: Sequence[Fact], note: RememberedNote | None) -> None:
        with self._edits:
            try:
                memories = self._engine().remember(list(facts))
            except Exception as e:  # shown in the chat; the engine committed nothing
                self.post_message(self.RememberFailed(note, describe(e)))
                return
        self.post_message(self.Remembered(note, memories))

    @work(thread=True, group="edit")
    def forget(self, memory_ids: Sequence[str], note: RememberedNote | None = None) -> None:
        reports: list[ForgetReport] = []
        with self._edits:
            try:
                engine = self._engine()
                if not hasattr(engine, "forget"):
                    raise SleeptuiError("This engine cannot forget memories yet.")
                if hasattr(engine, "forget_many"):  # one adapter retrain for them all
                    reports = engine.forget_many(list(memory_ids))
                else:
                    for memory_id in memory_ids:
                        reports.append(engine.forget(memory_id))
            except Exception as e:  # shown in the chat, with what was forgotten before it
                if reports:
                    self.post_message(self.Forgotten(reports, None))
                self.post_message(self.ForgetFailed(describe(e), note))
                return
        self.post_message(self.Forgotten(reports, note))

    def start_sleep(self, until: bool = False, auto: bool = False, nap: bool = False) -> bool:
        """Start a sleep (or a nap: one quick consolidation) unless one runs; the chat stays
        usable meanwhile."""
        if self.sleeping:
            return False
        self.sleeping = True
        self.cancel_sleep.clear()
        self.activity.progress("napping" if nap else "sleeping", "waiting", 0, 0)
        if nap:
            self._nap()
        else:
            self._sleep(until, auto)
        return True

    @work(thread=True, group="edit")
    def _nap(self) -> None:
        def progress(stage: str, i: int, n: int) -> None:
            self.post_message(self.SleepProgressed(stage, i, n))

        with self._edits:
            try:
                engine = self._engine()
                if not hasattr(engine, "consolidate"):
                    raise SleeptuiError("This engine cannot consolidate memories.")
                report = engine.consolidate("nap", progress=progress, cancel=self.cancel_sleep)
            except Exception as e:  # the engine rolls a failed consolidation back
                self.post_message(self.SleepFailed(describe(e), self.cancel_sleep.is_set()))
                return
        self.post_message(self.Napped(report))

    @work(thread=True, group="edit")
    def _sleep(self, until: bool, auto: bool) -> None:
        def progress(stage: str, i: int, n: int) -> None:
            self.post_message(self.SleepProgressed(stage, i, n))

        with self._edits:
            try:
                engine = self._engine()
                if not hasattr(engine, "sleep"):
                    raise SleeptuiError("This engine cannot sleep yet.")
                if until:
                    reports = engine.sleep_until_converged(
                        progress=progress, cancel=self.cancel_sleep
                    )
                else:
                    reports = [engine.sleep(progress=progress, cancel=self.cancel_sleep)]
            except Exception as e:  # the engine rolls a failed cycle back
                self.post_message(self.SleepFailed(describe(e), self.cancel_sleep.is_set()))
                return
        self.post_message(self.Slept(reports, auto))

    # -- the panel's own view of the outcomes ------------------------------------------

    @on(Remembered)
    @on(Forgotten)
    def _changed(self) -> None:
        self.sync()
        if not self.sleeping:
            self.activity.idle()

    @on(EngineProgressed)
    def _engine_progressed(self, message: EngineProgressed) -> None:
        message.stop()
        if self.sleeping:
            return
        if self.engine is None:
            self.activity.progress("loading", message.stage, message.i, message.n)
        elif message.stage != "load":  # a start-up report that came after the engine did
            self.activity.progress("writing", message.stage, message.i, message.n)

    @on(SleepProgressed)
    def _sleep_progressed(self, message: SleepProgressed) -> None:
        if self.sleeping:
            self.activity.progress("sleeping", message.stage, message.i, message.n)

    @on(Slept)
    def _slept(self, message: Slept) -> None:
        self.sleeping = False
        self.sync()
        last = message.reports[-1] if message.reports else None
        if last is not None:
            self.activity.result(
                f"last sleep: recall {last.recall:.0%} · perplexity "
                f"{last.ppl_before:.2f} → {last.ppl_after:.2f}"
                + (" · rolled back" if last.rolled_back else "")
            )
        self.activity.idle()

    @on(Napped)
    def _napped(self, message: Napped) -> None:
        self.sleeping = False
        self.sync()
        r = message.report
        self.activity.result(
            f"last nap: {r.advanced} of {r.due} facts moved toward the adapter · chat recall "
            f"{r.chat_recall:.0%}" + (" · rolled back" if r.rolled_back else "")
        )
        self.activity.idle()

    @on(SleepFailed)
    def _sleep_failed(self) -> None:
        self.sleeping = False
        self.sync()
        self.activity.idle()
