"""The chat app: a conversation beside the memories, over one engine loaded in the background.

The app never imports the engine module at start-up: the default factory imports it in the
loader worker, and tests pass their own ``engine_factory``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input
from textual.worker import get_current_worker

from sleeptui.app.chat import ChatPane, PromptInput, RememberedNote, fact_line
from sleeptui.app.commands import SlashSuggester, dispatch, help_text, palette
from sleeptui.app.memory_panel import MemoryPanel, describe
from sleeptui.app.memory_table import MemoryTable
from sleeptui.app.screens import ConfirmScreen, ErrorScreen
from sleeptui.errors import ModelNotFound, NotAFact, StateLocked
from sleeptui.extract import extract_facts

if TYPE_CHECKING:
    from sleeptui.engine import Engine
    from sleeptui.facts import Fact

Progress = Callable[[str, int, int], None]
EngineFactory = Callable[[Progress], "Engine"]
"""Builds the engine, reporting load progress; called once, in a worker thread."""

QUIT_WAIT_SECONDS = 60.0
"""On quit, how long to wait for an edit in flight before the state folder is closed anyway."""


def open_engine(
    model: str | None, state: str | None, backend: str, four_bit: bool | None = None
) -> EngineFactory:
    def factory(progress: Progress) -> Engine:
        from sleeptui.engine import Engine

        return Engine.open(
            model=model, state=state, backend=backend, progress=progress, four_bit=four_bit
        )

    return factory


class SleeptuiApp(App[None]):
    """Chat with a model whose memories live in its weights."""

    TITLE = "sleeptui"
    CSS_PATH = "sleeptui.tcss"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS = [
        Binding("escape", "stop_reply", "Stop", id="stop_reply"),
        Binding("ctrl+b", "toggle_memories", "Memories", id="toggle_memories"),
        Binding("ctrl+g", "toggle_progress", "Progress", id="toggle_progress"),
        Binding("f1", "help", "Help", id="help"),
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
    ]
    CHAT_ACTIONS = frozenset(
        {"stop_reply", "toggle_memories", "toggle_progress", "help", "focus_memories"}
    )
    """Actions that only mean something on the chat screen once the engine is loaded."""

    @dataclass
    class EngineReady(Message):
        engine: Engine

    @dataclass
    class EngineFailed(Message):
        title: str
        message: str

    def __init__(
        self,
        engine_factory: EngineFactory | None = None,
        model: str | None = None,
        state: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.engine_factory = engine_factory or open_engine(model, state, backend)
        self.engine: Engine | None = None
        self.last_subject: str | None = None
        self._was_due = False

    def compose(self) -> ComposeResult:
        self.chat = ChatPane(id="chat")
        self.panel = MemoryPanel(id="panel")
        self.prompt = PromptInput(
            placeholder="loading the model…",
            suggester=SlashSuggester(self._subjects),
            disabled=True,
            id="prompt",
        )
        yield Header(show_clock=False, icon="☾")
        with Horizontal(id="main"):
            with Vertical(id="conversation"):
                yield self.chat
                yield self.prompt
            yield self.panel
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "loading…"
        self._loading = self.chat.note("Loading the model… (the first start can take a minute)")
        self._load()

    def on_unmount(self) -> None:
        """Stop what runs, let an edit in flight commit, then release the state folder."""
        if self.chat.reply is not None:
            self.chat.reply.stop.set()
        self.panel.cancel_sleep.set()
        if self.engine is not None and self.panel.wait_for_edits(QUIT_WAIT_SECONDS):
            self.engine.close()  # else an edit still writes: the lock goes when the process does

    # -- loading -------------------------------------------------------------------

    def _loading_progressed(self, stage: str, i: int, n: int) -> None:
        # To the panel: in order with its edits' outcomes.
        self.panel.post_message(MemoryPanel.EngineProgressed(stage, i, n))

    @work(thread=True, group="load")
    def _load(self) -> None:
        try:
            engine = self.engine_factory(self._loading_progressed)
        except StateLocked as e:
            self.post_message(self.EngineFailed("The state folder is in use", str(e)))
            return
        except ModelNotFound as e:
            self.post_message(self.EngineFailed("The model could not be loaded", str(e)))
            return
        except Exception as e:  # any other failure is shown on the error screen
            self.post_message(self.EngineFailed("sleeptui could not start", describe(e)))
            return
        if get_current_worker().is_cancelled:  # the app quit while the model loaded
            engine.close()
            return
        self.post_message(self.EngineReady(engine))

    @on(EngineReady)
    def _engine_ready(self, message: EngineReady) -> None:
        engine = self.engine = message.engine
        self.sub_title = f"{engine.source.preset.name} · {engine.backend.name}"
        self.panel.attach(engine)
        self.panel.activity.idle()
        self._loading.remove()
        prompt = self.prompt
        prompt.disabled = False
        prompt.placeholder = "State a fact or ask · /help"
        prompt.focus()
        count = len(engine.memories)
        self.chat.note(
            f"Ready: {engine.source.preset.name} with {count} memor{'y' if count == 1 else 'ies'}. "
            "Say a fact to remember it; ask a question to get an answer."
        )
        for warning in engine.folder.warnings:  # what opening the folder had to repair
            self.chat.note(warning, "warning")
        self._sleep_if_due()

    @on(EngineFailed)
    def _engine_failed(self, message: EngineFailed) -> None:
        self.sub_title = "not started"
        self.push_screen(ErrorScreen(message.title, message.message))

    # -- chat ------------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    async def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.clear()
        if not text or self.engine is None:
            return
        if text.startswith("/"):
            await dispatch(self, text)
        else:
            await self.say(text)

    async def say(self, text: str) -> None:
        """A chat message: its statements of fact are remembered; anything else is answered."""
        self.chat.add_user(text)
        try:
            facts = extract_facts(text, self.last_subject)
        except NotAFact:
            facts = []
        if facts:
            self.remember(facts)
        if (not facts or "?" in text) and self.engine is not None:
            await self.chat.ask(self.engine, text)
            self.refresh_bindings()

    def remember(self, facts: list[Fact]) -> None:
        self.last_subject = facts[-1].subject
        self.panel.remember(facts, self.chat.remembering([fact_line(f) for f in facts]))

    def remember_explicit(self, text: str) -> None:
        self.chat.add_user(f"/remember {text}")
        try:
            facts = extract_facts(text, self.last_subject)
        except NotAFact as e:
            self.chat.note(str(e), "error")
            return
        self.remember(facts)

    # -- memories --------------------------------------------------------------------

    def request_forget(self, target: str | None) -> None:
        """Forget by id or subject (the selected row if none), after asking."""
        memories = self.engine.memories if self.engine else ()
        if target is None:
            target = self.panel.table.selected_id
            if target is None:
                self.chat.note(
                    "usage: /forget <id | subject>  (the table has no selected row)", "error"
                )
                return
        matches = [m for m in memories if m.id == target] or [
            m for m in memories if m.subject.casefold() == target.casefold()
        ]
        if not matches:
            self.chat.note(f"No memory has the id or subject {target!r}.", "error")
            return
        ids = [m.id for m in matches]
        detail = "\n".join(f"• {fact_line(m)}  ({m.id})" for m in matches)
        question = (
            "Forget this memory?" if len(matches) == 1 else f"Forget these {len(matches)} memories?"
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self.chat.note(f"forgetting {', '.join(ids)}…")
                self.panel.forget(ids)

        self.push_screen(ConfirmScreen(question, detail, yes="Forget"), answered)

    @on(RememberedNote.Undo)
    def _undo(self, message: RememberedNote.Undo) -> None:
        self.panel.forget(message.memory_ids, message.note)

    @on(MemoryTable.ForgetRequested)
    def _forget_row(self, message: MemoryTable.ForgetRequested) -> None:
        self.request_forget(message.memory_id)

    @on(ChatPane.Replied)
    def _replied(self) -> None:
        if not self.screen_stack:  # the reply ended as the app closed
            return
        self.refresh_bindings()
        self.panel.table.refresh_ages(self.engine.memories if self.engine else ())

    @on(MemoryPanel.Remembered)
    def _remembered(self, message: MemoryPanel.Remembered) -> None:
        if message.note is not None:
            message.note.written(message.memories)
        self._sleep_if_due()

    @on(MemoryPanel.RememberFailed)
    def _remember_failed(self, message: MemoryPanel.RememberFailed) -> None:
        if message.note is not None:
            message.note.failed(message.error)
        else:
            self.chat.note(f"not remembered: {message.error}", "error")

    @on(MemoryPanel.Forgotten)
    def _forgotten(self, message: MemoryPanel.Forgotten) -> None:
        if message.note is not None:
            message.note.undone()
        for r in message.reports:
            check = (
                "the model no longer says it"
                if r.verified
                else f"but the model still completes it as “{r.answer_after.strip()}”"
            )
            self.chat.note(
                f"forgot: {fact_line(r.memory)} — {check}", "info" if r.verified else "warning"
            )

    @on(MemoryPanel.ForgetFailed)
    def _forget_failed(self, message: MemoryPanel.ForgetFailed) -> None:
        self.chat.note(f"forget failed: {message.error}", "error")

    # -- sleep -------------------------------------------------------------------------

    def start_sleep(self, until: bool = False) -> None:
        if self.panel.start_sleep(until):
            what = "cycles until converged" if until else "one cycle"
            self.chat.note(f"sleeping ({what}); the chat stays usable meanwhile")
        else:
            self.chat.note("Already sleeping.")

    def start_nap(self) -> None:
        if self.panel.start_sleep(nap=True):
            self.chat.note(
                "napping: facts MEMIT holds move toward the LoRA adapter; the chat "
                "stays usable meanwhile"
            )
        else:
            self.chat.note("Already sleeping.")

    @on(MemoryPanel.Napped)
    def _napped(self, message: MemoryPanel.Napped) -> None:
        r = message.report
        if r.rolled_back:
            self.chat.note(
                f"nap rolled back: perplexity would have risen {100 * (r.ppl_tried / r.ppl_before - 1):+.1f}%; "
                "nothing changed",
                "warning",
            )
        else:
            stages = " · ".join(f"{k}: {v}" for k, v in r.stages.items())
            self.chat.note(
                f"napped: {r.advanced} of {r.due} facts advanced (MEMIT scale {stages}) · chat "
                f"recall {r.chat_recall:.0%} · perplexity {r.ppl_before:.2f} → {r.ppl_after:.2f} "
                f"· {r.seconds:.1f}s"
            )

    def _sleep_if_due(self) -> None:
        """Sleep on our own when the pressure crosses its threshold."""
        pressure = self.panel.pressure()
        due = pressure is not None and pressure.due
        if pressure and due and not self._was_due and self.panel.start_sleep(auto=True):
            self.chat.note(
                f"Sleep pressure reached {pressure.value:.0%} (threshold {pressure.threshold:.0%}): "
                "sleeping now; the chat stays usable."
            )
        self._was_due = due

    @on(MemoryPanel.Slept)
    def _slept(self, message: MemoryPanel.Slept) -> None:
        for r in message.reports:
            if r.rolled_back:
                rise = f" ({100 * (r.ppl_tried / r.ppl_before - 1):+.2f}%)" if r.ppl_tried else ""
                self.chat.note(
                    f"sleep rolled back: perplexity would have risen too much{rise}; "
                    "nothing changed",
                    "warning",
                )
                continue
            self.chat.note(
                f"slept: {r.healthy} healthy, {r.degraded} degraded, {r.refreshed} refreshed, "
                f"{r.pruned} pruned · recall {r.recall:.0%} · perplexity {r.ppl_before:.2f} → "
                f"{r.ppl_after:.2f} · {r.seconds:.1f}s"
                + (f" · {r.deferred} left for the next cycle (perplexity)" if r.deferred else "")
            )
        if len(message.reports) > 1 or (message.reports and message.reports[-1].converged):
            state = "converged" if message.reports[-1].converged else "not converged"
            self.chat.note(f"{state} after {len(message.reports)} cycles")
        pressure = self.panel.pressure()
        self._was_due = pressure is not None and pressure.due

    @on(MemoryPanel.SleepFailed)
    def _sleep_failed(self, message: MemoryPanel.SleepFailed) -> None:
        if message.cancelled:
            self.chat.note("sleep cancelled; nothing changed", "warning")
        else:
            self.chat.note(f"sleep failed and was rolled back: {message.error}", "error")

    # -- commands --------------------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if self.engine is not None:
            yield from palette(self)

    def show_help(self) -> None:
        text, body = help_text()
        self.chat.note(text, body=body)

    def show_model(self) -> None:
        e = self.engine
        if e is None:
            self.chat.note("The model is still loading.")
            return
        self.chat.note(
            f"model {e.source.preset.name} · backend {e.backend.name} · state folder {e.folder.root}"
        )

    def prefill(self, text: str) -> None:
        self.prompt.value = text
        self.prompt.cursor_position = len(text)
        self.prompt.focus()

    def _subjects(self) -> list[str]:
        memories = self.engine.memories if self.engine else ()
        return list(dict.fromkeys(m.subject for m in memories))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.CHAT_ACTIONS and (self.engine is None or len(self.screen_stack) != 1):
            return False
        if action == "stop_reply" and not self.chat.replying:
            return None  # shown, dimmed: there is nothing to stop
        return True

    async def action_stop_reply(self) -> None:
        await self.chat.stop_reply()

    def action_toggle_memories(self) -> None:
        self.panel.display = not self.panel.display

    def action_toggle_progress(self) -> None:
        self.panel.activity.toggle()

    def action_focus_memories(self) -> None:
        self.panel.display = True
        self.panel.table.focus()

    def action_help(self) -> None:
        self.show_help()
