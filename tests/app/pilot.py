"""Helpers for Pilot tests: wait for background work instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.pilot import Pilot

from sleeptui.app import SleeptuiApp
from tests.app.fake_engine import FakeEngine


async def wait_until(
    pilot: Pilot, predicate: Callable[[], object], timeout: float = 5.0, what: str = ""
) -> None:
    """Let the app run until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await pilot.pause(0.01)


def fake_app(engine: FakeEngine) -> SleeptuiApp:
    return SleeptuiApp(engine_factory=lambda progress: engine)


async def ready(pilot: Pilot) -> None:
    """Wait until the engine is attached and the prompt takes input."""
    app = pilot.app
    await wait_until(
        pilot, lambda: app.engine is not None and not app.prompt.disabled, what="engine"
    )
    await pilot.pause()


async def send(pilot: Pilot, text: str) -> None:
    """Type a message into the prompt and press Enter."""
    app = pilot.app
    app.prompt.focus()
    app.prompt.value = text
    await pilot.press("enter")


def notes(app: SleeptuiApp) -> list[str]:
    """The text of every note the app wrote into the chat, oldest first."""
    from sleeptui.app.chat import Note, RememberedNote

    texts = []
    for widget in app.chat.children:
        if isinstance(widget, Note):
            texts.append(widget.text)
        elif isinstance(widget, RememberedNote):
            texts.append(str(widget.query_one("#what").content))
    return texts


def replies(app: SleeptuiApp) -> list:
    from sleeptui.app.chat import AssistantMessage

    return list(app.chat.query(AssistantMessage))


def has_note(app: SleeptuiApp, fragment: str) -> bool:
    return any(fragment in text for text in notes(app))
