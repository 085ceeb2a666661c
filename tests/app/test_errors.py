"""Start-up failures are shown on an error screen, never raised; quitting from it exits 2."""

from __future__ import annotations

import pytest

from sleeptui.app import SleeptuiApp
from sleeptui.app.screens import ErrorScreen
from sleeptui.errors import ModelNotFound, StateLocked
from tests.app.pilot import wait_until

LOCKED = (
    "The state folder /home/ana/.local/share/sleeptui is in use by another sleeptui (pid 4242). "
    "Close it first, or open this one read-only with --read-only."
)
MISSING = "The model 'smollm2-135m' is not on this machine. sleeptui looked in /models."


def failing(error: Exception):
    def factory(progress):
        raise error

    return factory


@pytest.mark.parametrize(
    ("error", "title"),
    [
        (StateLocked(LOCKED), "The state folder is in use"),
        (ModelNotFound(MISSING), "The model could not be loaded"),
        (RuntimeError("CUDA out of memory"), "sleeptui could not start"),
    ],
)
async def test_a_start_up_failure_is_shown_on_an_error_screen(error, title):
    app = SleeptuiApp(engine_factory=failing(error))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(
            pilot, lambda: isinstance(app.screen, ErrorScreen), what="the error screen"
        )
        assert str(app.screen.query_one("#error-title").content) == title
        assert str(error) in str(app.screen.query_one("#error-message").content)
        assert app.engine is None
        await pilot.press("q")
    assert app.return_code == 2


async def test_progress_while_loading_is_shown():
    import threading

    from tests.app.fake_engine import FakeEngine

    release = threading.Event()
    engine = FakeEngine()

    def slow(progress):
        progress("load", 1, 4)
        release.wait(5)
        return engine

    app = SleeptuiApp(engine_factory=slow)
    async with app.run_test(size=(80, 24)) as pilot:
        activity = app.panel.activity
        await wait_until(pilot, lambda: "loading load 1/4" in str(activity.content))
        assert app.prompt.disabled
        release.set()
        await wait_until(pilot, lambda: not app.prompt.disabled)
        assert not activity.display
    assert engine.closed


async def test_a_failing_pressure_reading_is_shown_in_the_gauge():
    from sleeptui.errors import StateError
    from tests.app.fake_engine import FakeEngine
    from tests.app.pilot import fake_app, ready

    engine = FakeEngine()

    def unreadable():
        raise StateError("ledger.json is not valid JSON.")

    engine.pressure = unreadable
    app = fake_app(engine)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        gauge = str(app.panel.query_one("#pressure").content)
        assert gauge == "sleep pressure unavailable: ledger.json is not valid JSON."
        assert not app.prompt.disabled
