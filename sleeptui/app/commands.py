"""Slash commands as a small table, their completion, and the same actions in the palette."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.padding import Padding
from rich.text import Text
from textual.app import SystemCommand
from textual.suggester import Suggester

if TYPE_CHECKING:
    from sleeptui.app.app import SleeptuiApp

Handler = Callable[["SleeptuiApp", str], Awaitable[None] | None]


@dataclass(frozen=True)
class SlashCommand:
    """One command: ``name`` as typed, ``usage`` and ``help`` as listed by ``/help``."""

    name: str
    usage: str
    help: str
    run: Handler


def _help(app: SleeptuiApp, arg: str) -> None:
    app.show_help()


def _sleep(app: SleeptuiApp, arg: str) -> None:
    if arg not in ("", "until"):
        app.chat.note("usage: /sleep [until]", "error")
        return
    app.start_sleep(until=arg == "until")


def _nap(app: SleeptuiApp, arg: str) -> None:
    app.start_nap()


def _forget(app: SleeptuiApp, arg: str) -> None:
    app.request_forget(arg or None)


def _remember(app: SleeptuiApp, arg: str) -> None:
    if arg:
        app.remember_explicit(arg)
    else:
        app.prefill("/remember ")


def _memories(app: SleeptuiApp, arg: str) -> None:
    app.action_focus_memories()


def _model(app: SleeptuiApp, arg: str) -> None:
    app.show_model()


def _quit(app: SleeptuiApp, arg: str) -> None:
    app.exit()


COMMANDS: tuple[SlashCommand, ...] = (
    SlashCommand("/help", "/help", "list these commands", _help),
    SlashCommand(
        "/remember",
        "/remember <fact>",
        "store one statement, e.g. /remember Viktor lives in Oslo",
        _remember,
    ),
    SlashCommand(
        "/forget",
        "/forget [id | subject]",
        "delete memories (asks first); no argument: the selected row",
        _forget,
    ),
    SlashCommand(
        "/sleep", "/sleep [until]", "run one sleep cycle; 'until': cycles until converged", _sleep
    ),
    SlashCommand(
        "/nap", "/nap", "a quick consolidation: due facts move from MEMIT into the adapter", _nap
    ),
    SlashCommand(
        "/memories",
        "/memories",
        "focus the memory table (f or delete there forgets a row)",
        _memories,
    ),
    SlashCommand("/model", "/model", "show the model, backend and state folder", _model),
    SlashCommand("/quit", "/quit", "leave sleeptui", _quit),
)
BY_NAME = {c.name: c for c in COMMANDS}

PALETTE: tuple[tuple[str, str, str], ...] = (
    ("Sleep: one cycle", "Audit the memories and refresh degraded ones", "/sleep"),
    ("Sleep until converged", "Sleep cycles until no memory is degraded", "/sleep until"),
    ("Nap", "Move facts that are due from MEMIT into the LoRA adapter", "/nap"),
    (
        "Forget the selected memory",
        "Delete the memory selected in the table (asks first)",
        "/forget",
    ),
    ("Remember a fact…", "Type a statement to store", "/remember"),
    ("Show memories", "Focus the memory table", "/memories"),
    ("Model and state folder", "Which model, backend and state folder are in use", "/model"),
    ("Slash commands", "List the slash commands", "/help"),
)
"""(title, help, slash command) of each palette entry: the palette runs the same commands."""


async def dispatch(app: SleeptuiApp, text: str) -> None:
    """Run a typed slash command, or say that there is no such command."""
    name, _, arg = text.strip().partition(" ")
    command = BY_NAME.get(name.lower())
    if command is None:
        app.chat.note(f"Unknown command {name}; /help lists the commands.", "error")
        return
    result = command.run(app, arg.strip())
    if inspect.isawaitable(result):
        await result


def help_text() -> tuple[str, RenderableType]:
    """The command list as plain text and as shown: each help line indented under its usage."""
    title, last = "Slash commands (Tab completes them):", "Anything else is a chat message."
    plain = [title]
    shown: list[RenderableType] = [Text(title)]
    for c in COMMANDS:
        plain += [c.usage, f"    {c.help}"]
        shown += [Text(c.usage, style="bold"), Padding(Text(c.help), (0, 0, 0, 4))]
    return "\n".join([*plain, last]), Group(*shown, Text(last))


def palette(app: SleeptuiApp) -> Iterator[SystemCommand]:
    for title, help, text in PALETTE:
        yield SystemCommand(title, help, partial(dispatch, app, text))


class SlashSuggester(Suggester):
    """Completes command names, ``/sleep until``, and ``/forget`` with memory subjects."""

    def __init__(self, subjects: Callable[[], Iterable[str]]) -> None:
        super().__init__(use_cache=False, case_sensitive=False)
        self.subjects = subjects

    async def get_suggestion(self, value: str) -> str | None:
        if not value.startswith("/"):
            return None
        candidates = [*BY_NAME, "/sleep until", *(f"/forget {s}" for s in self.subjects())]
        return next(
            (c for c in candidates if c.casefold().startswith(value) and c.casefold() != value),
            None,
        )
