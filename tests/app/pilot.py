"""Helpers for Pilot tests: wait for background work instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from textual import events
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
    """The app over ``engine``, which reports its progress to the app as the real one does."""

    def factory(progress) -> FakeEngine:
        engine.progress = progress
        return engine

    return SleeptuiApp(engine_factory=factory)


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


async def key_latency_ms(app: SleeptuiApp, key: str = "x") -> float:
    """Send a key as the terminal driver would and time it until the prompt holds it."""
    prompt = app.prompt
    expected = prompt.value + key
    started = time.perf_counter()
    app.post_message(events.Key(key, key))
    while prompt.value != expected:
        if time.perf_counter() - started > 2:
            raise AssertionError(f"the key {key!r} never reached the prompt")
        await asyncio.sleep(0.001)
    return (time.perf_counter() - started) * 1000


async def key_latencies_ms(
    app: SleeptuiApp, busy: Callable[[], bool], presses: int, gap: float = 0.05
) -> list[float]:
    """Up to ``presses`` key presses into the prompt, each timed, for as long as ``busy()``.

    The keys come ``gap`` seconds apart (a fast typist); the prompt is cleared afterwards.
    """
    app.prompt.focus()
    timings: list[float] = []
    while busy() and len(timings) < presses:
        timings.append(await key_latency_ms(app))
        await asyncio.sleep(gap)
    app.prompt.value = ""
    return timings
