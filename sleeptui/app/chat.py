"""The chat pane: the conversation, streamed replies, and the notes the app adds to it.

Replies are generated in a worker thread that reports through the typed messages declared on
:class:`ChatPane`; the pane is the only thing that touches the message widgets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import RenderableType
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Markdown, Static
from textual.widgets.markdown import MarkdownStream
from textual.worker import get_current_worker

if TYPE_CHECKING:
    from sleeptui.engine import Engine
    from sleeptui.facts import Fact
    from sleeptui.ledger import Memory

CONTEXT_TURNS = 4
"""How many recent question/answer pairs of this run are sent with a question."""


def fact_line(fact: Fact | Memory) -> str:
    """A fact or memory as ``subject · relation · object``."""
    return f"{fact.subject} · {fact.relation} · {fact.object}"


class PromptInput(Input):
    """The message line; Tab takes the suggested completion, or moves on if there is none."""

    BINDINGS = [Binding("tab", "complete", "Complete", show=False, id="complete")]

    def action_complete(self) -> None:
        before = self.value
        if self.cursor_at_end:
            self.action_cursor_right()
        if self.value == before:
            self.screen.focus_next()


class UserMessage(Static):
    """Something the user typed."""

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False)


class AssistantMessage(Markdown):
    """A reply, streamed as Markdown and rendered once more in full when it ends.

    Attributes:
        text: The reply so far.
        done: No more text will be added.
    """

    WAITING = "…"

    def __init__(self) -> None:
        super().__init__(self.WAITING)
        self.text = ""
        self.done = False
        self._stream: MarkdownStream | None = None

    async def write(self, piece: str) -> None:
        if self.done:
            return
        if self._stream is None:
            await self.update("")
            self._stream = Markdown.get_stream(self)
        self.text += piece
        await self._stream.write(piece)

    async def finish(self, stopped: bool = False, error: str | None = None) -> None:
        """Stop streaming and render the whole reply; a stopped one keeps its partial text."""
        if self.done:
            return
        self.done = True
        if self._stream is not None:
            await self._stream.stop()
        body = self.text.strip()
        if stopped:
            body += "\n\n*(stopped)*"
            self.add_class("-stopped")
        if error:
            body += f"\n\n**error:** {error}"
            self.add_class("-error")
        await self.update(body.strip() or "*(no reply)*")


class Note(Static):
    """A line from the app itself: progress, results, errors.

    Attributes:
        text: The note as plain text (``body``, when given, is how it is shown).
    """

    def __init__(self, text: str, kind: str = "info", body: RenderableType | None = None) -> None:
        super().__init__(text if body is None else body, markup=False, classes=f"note -{kind}")
        self.text = text


class RememberedNote(Horizontal):
    """``remembered: Viktor · lives in · Portland`` with an undo button once it is written."""

    @dataclass
    class Undo(Message):
        """The user asked to take the memories back."""

        note: RememberedNote
        memory_ids: tuple[str, ...]

    def __init__(self, facts: list[str]) -> None:
        super().__init__(classes="note -remembered -pending")
        self.facts = facts
        self.memory_ids: tuple[str, ...] = ()

    def compose(self):
        yield Static(f"remembering: {'; '.join(self.facts)} …", markup=False, id="what")
        yield Button("undo", id="undo", compact=True, disabled=True)

    def written(self, memories: list[Memory]) -> None:
        self.memory_ids = tuple(m.id for m in memories)
        lines = "; ".join(f"{fact_line(m)} ({m.id})" for m in memories)
        self.query_one("#what", Static).update(f"remembered: {lines}")
        self.query_one("#undo", Button).disabled = False
        self.remove_class("-pending")

    def failed(self, error: str) -> None:
        self.query_one("#what", Static).update(f"not remembered: {error}")
        self.query_one("#undo", Button).display = False
        self.remove_class("-pending")
        self.add_class("-error")

    def undone(self) -> None:
        self.query_one("#what", Static).update(f"undone: {'; '.join(self.facts)}")
        self.query_one("#undo", Button).display = False
        self.add_class("-undone")

    @on(Button.Pressed, "#undo")
    def _undo(self, event: Button.Pressed) -> None:
        event.stop()
        event.button.disabled = True
        self.post_message(self.Undo(self, self.memory_ids))


@dataclass
class Reply:
    """One reply in flight: its question, its widget and the event that stops it."""

    question: str
    view: AssistantMessage
    stop: threading.Event = field(default_factory=threading.Event)


class ChatPane(VerticalScroll):
    """The conversation of this run. Nothing from earlier runs is kept or sent."""

    @dataclass
    class ReplyPiece(Message):
        reply: Reply
        piece: str

    @dataclass
    class ReplyFinished(Message):
        reply: Reply

    @dataclass
    class ReplyFailed(Message):
        reply: Reply
        error: str

    @dataclass
    class Replied(Message):
        """A reply ended: answered, stopped, or failed with ``error``; bubbles to the app."""

        question: str
        answer: str
        stopped: bool
        error: str | None = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, str]] = []
        self.reply: Reply | None = None

    def on_mount(self) -> None:
        self.anchor()

    @property
    def replying(self) -> bool:
        return self.reply is not None and not self.reply.view.done

    def add(self, widget) -> None:
        self.mount(widget)
        self.anchor()

    def add_user(self, text: str) -> None:
        self.add(UserMessage(text))

    def note(self, text: str, kind: str = "info", body: RenderableType | None = None) -> Note:
        note = Note(text, kind, body)
        self.add(note)
        return note

    def remembering(self, facts: list[str]) -> RememberedNote:
        note = RememberedNote(facts)
        self.add(note)
        return note

    async def ask(self, engine: Engine, question: str) -> Reply:
        """Show an empty reply and start streaming the answer into it."""
        if self.replying:
            await self.stop_reply()
        reply = Reply(question, AssistantMessage())
        self.reply = reply
        self.add(reply.view)
        self._generate(engine, reply, list(self.history))
        return reply

    async def stop_reply(self) -> bool:
        """Stop the reply in flight at once; its partial text stays, marked stopped."""
        reply = self.reply
        if reply is None or reply.view.done:
            return False
        reply.stop.set()
        self.workers.cancel_group(self, "reply")
        await self._complete(reply, stopped=True)
        return True

    @work(thread=True, exclusive=True, group="reply")
    def _generate(self, engine: Engine, reply: Reply, history: list[dict[str, str]]) -> None:
        worker = get_current_worker()
        try:
            pieces = engine.ask(reply.question, history, reply.stop)
            try:
                for piece in pieces:
                    if reply.stop.is_set() or worker.is_cancelled:
                        break
                    self.post_message(self.ReplyPiece(reply, piece))
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
        except Exception as e:  # shown in the reply, never raised into the app
            self.post_message(self.ReplyFailed(reply, str(e) or type(e).__name__))
            return
        self.post_message(self.ReplyFinished(reply))

    @on(ReplyPiece)
    async def _piece(self, message: ReplyPiece) -> None:
        await message.reply.view.write(message.piece)

    @on(ReplyFinished)
    async def _finished(self, message: ReplyFinished) -> None:
        await self._complete(message.reply, stopped=message.reply.stop.is_set())

    @on(ReplyFailed)
    async def _failed(self, message: ReplyFailed) -> None:
        await self._complete(message.reply, stopped=False, error=message.error)

    async def _complete(self, reply: Reply, stopped: bool, error: str | None = None) -> None:
        if reply.view.done:
            return
        answer = reply.view.text.strip()
        if error is None:  # recorded before any await, so the next question always sees it
            turn = [
                {"role": "user", "content": reply.question},
                {"role": "assistant", "content": answer},
            ]
            self.history = [*self.history, *turn][-2 * CONTEXT_TURNS :]
        await reply.view.finish(stopped=stopped, error=error)
        self.post_message(self.Replied(reply.question, answer, stopped, error))
