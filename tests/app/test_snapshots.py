"""How the main screens look at 80×24 and 160×48, with a fake engine (review SVGs by eye)."""

from __future__ import annotations

import threading

import pytest

from sleeptui.app import SleeptuiApp
from sleeptui.app.screens import ConfirmScreen, ErrorScreen
from sleeptui.errors import StateLocked
from sleeptui.facts import Fact
from tests.app.fake_engine import FakeEngine
from tests.app.pilot import fake_app, has_note, replies, send, wait_until
from tests.app.pilot import ready as engine_ready

SIZES = [(80, 24), (160, 48)]
FACTS = [
    Fact("Viktor Johansson", "lives in", "Brno"),
    Fact("Anna Berg", "works as a", "nurse"),
    Fact("Ingrid", "has a dog named", "Rex"),
]
REPLY = "Oslo is the capital of **Norway**. It lies at the head of the Oslofjord."


async def ready(pilot) -> None:
    """The engine attached, and the prompt's cursor steady (a blinking one is a coin toss)."""
    await engine_ready(pilot)
    pilot.app.prompt.cursor_blink = False


def engine() -> FakeEngine:
    return FakeEngine(FACTS, reply=REPLY, degraded=[1])


async def conversation(pilot) -> None:
    app = pilot.app
    await ready(pilot)
    await send(pilot, "Oda Fjellheim lives in Tromsø.")
    await wait_until(pilot, lambda: has_note(app, "remembered: Oda"))
    await send(pilot, "What is the capital of Norway?")
    await wait_until(pilot, lambda: replies(app) and replies(app)[-1].done)
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_beside_the_memories(snap_compare, size):
    assert snap_compare(fake_app(engine()), terminal_size=size, run_before=conversation)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sleep_in_progress(snap_compare, size):
    fake = engine()
    fake.sleep_gate = threading.Event()

    async def sleeping(pilot) -> None:
        await ready(pilot)
        await send(pilot, "/sleep")
        await wait_until(pilot, lambda: "refresh 3/3" in str(pilot.app.panel.activity.content))
        await pilot.pause()

    try:
        assert snap_compare(fake_app(fake), terminal_size=size, run_before=sleeping)
    finally:
        fake.sleep_gate.set()


def test_a_stopped_reply(snap_compare):
    fake = engine()
    fake.hold = threading.Event()

    async def stopped(pilot) -> None:
        app = pilot.app
        await ready(pilot)
        await send(pilot, "What is the capital of Norway?")
        await wait_until(pilot, lambda: replies(app) and replies(app)[-1].text.count(" ") >= 2)
        await pilot.press("escape")
        await pilot.pause()

    try:
        assert snap_compare(fake_app(fake), terminal_size=(80, 24), run_before=stopped)
    finally:
        fake.hold.set()


def test_forget_asks_first(snap_compare):
    async def forgetting(pilot) -> None:
        await ready(pilot)
        await send(pilot, "/forget Viktor Johansson")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))
        await pilot.pause()

    assert snap_compare(fake_app(engine()), terminal_size=(80, 24), run_before=forgetting)


def test_help(snap_compare):
    async def helping(pilot) -> None:
        await ready(pilot)
        await send(pilot, "/help")
        await pilot.pause()

    assert snap_compare(fake_app(engine()), terminal_size=(80, 24), run_before=helping)


def test_locked_state_folder(snap_compare):
    def locked(progress):
        raise StateLocked(
            "The state folder /home/ana/.local/share/sleeptui is in use by another sleeptui "
            "(pid 4242). Close it first, or open this one read-only with --read-only."
        )

    async def failed(pilot) -> None:
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ErrorScreen))
        await pilot.pause()

    assert snap_compare(
        SleeptuiApp(engine_factory=locked), terminal_size=(80, 24), run_before=failed
    )
