"""Start-up failures are shown on an error screen, never raised; quitting from it exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sleeptui.app import SleeptuiApp, open_engine
from sleeptui.app.screens import ErrorScreen
from sleeptui.errors import ModelNotFound, StateLocked
from tests.app.fake_engine import FakeEngine
from tests.app.pilot import fake_app, has_note, ready, wait_until

LOCKED = (
    "The state folder /home/ana/.local/share/sleeptui is in use by another sleeptui (pid 4242). "
    "Close it first, or open this one read-only with --read-only."
)
MISSING = "The model 'smollm2-135m' is not on this machine. sleeptui looked in /models."


def error_shown(app: SleeptuiApp) -> bool:
    """The error screen is up and its message mounted."""
    return isinstance(app.screen, ErrorScreen) and bool(app.screen.query("#error-message"))


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
        await wait_until(pilot, lambda: error_shown(app), what="the error screen")
        assert str(app.screen.query_one("#error-title").content) == title
        assert str(error) in str(app.screen.query_one("#error-message").content)
        assert app.engine is None
        await pilot.press("q")
    assert app.return_code == 2


async def test_what_opening_the_folder_repaired_is_said_in_the_chat():
    repaired = (
        "/home/ana/.local/share/sleeptui/ledger.json is not valid JSON. Read the last good "
        "backup, backups/ledger.3.json, instead; no committed change was lost."
    )
    app = fake_app(FakeEngine(warnings=[repaired]))
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await wait_until(pilot, lambda: has_note(app, repaired), what="the warning")
        assert has_note(app, "Ready: fake-135m")


HOLD = """
import sys
from sleeptui.state import StateFolder
folder = StateFolder.open(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
folder.close()
"""


async def test_a_state_folder_held_by_another_sleeptui_is_shown_and_left_alone(tmp_path):
    state = tmp_path / "state"
    model = tmp_path / "model"  # the lock is taken before any weights are read
    model.mkdir()
    (model / "config.json").write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(state)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        before = sorted(p.name for p in state.iterdir())
        app = SleeptuiApp(engine_factory=open_engine(str(model), str(state), "auto"))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: error_shown(app), what="the error screen")
            message = str(app.screen.query_one("#error-message").content)
            assert str(app.screen.query_one("#error-title").content) == "The state folder is in use"
            assert f"{state} is in use by another sleeptui (process {holder.pid})" in message
            assert "--read-only" in message
            await pilot.press("q")
        assert app.return_code == 2
        assert holder.poll() is None and sorted(p.name for p in state.iterdir()) == before
    finally:
        holder.stdin.close()
        holder.wait(10)


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
