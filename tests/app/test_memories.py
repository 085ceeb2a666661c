"""The memory panel: forgetting (after asking), sleeping beside the chat, automatic sleep."""

from __future__ import annotations

import threading

from sleeptui.app.screens import ConfirmScreen
from sleeptui.facts import Fact
from tests.app.fake_engine import FakeEngine
from tests.app.pilot import fake_app, has_note, notes, ready, replies, send, wait_until

FACTS = [
    Fact("Viktor Johansson", "lives in", "Brno"),
    Fact("Anna Berg", "works as a", "nurse"),
    Fact("Viktor Johansson", "plays the", "cello"),
]


async def test_forget_by_subject_asks_first_and_removes_the_rows():
    engine = FakeEngine(FACTS)
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/forget viktor johansson")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the question")
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(0.1)
        assert len(engine.memories) == 3 and app.panel.table.row_count == 3

        await send(pilot, "/forget Viktor Johansson")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "Forget these 2 memories?" in str(app.screen.query_one("#question").content)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.panel.table.row_count == 1, what="two rows to go")
        assert list(app.panel.table.rows) == ["m0002"]
        assert [m.id for m in engine.memories] == ["m0002"]
        await wait_until(
            pilot, lambda: has_note(app, "forgot: Viktor Johansson · plays the · cello")
        )


async def test_forget_the_selected_row_from_the_table():
    engine = FakeEngine(FACTS)
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/memories")
        assert app.focused is app.panel.table
        await pilot.press("down", "f")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "(m0002)" in str(app.screen.query_one("#detail").content)
        await pilot.click("#yes")
        await wait_until(pilot, lambda: "m0002" not in app.panel.table.rows)
        assert [m.id for m in engine.memories] == ["m0001", "m0003"]


async def test_forget_of_an_unknown_memory_says_so():
    engine = FakeEngine(FACTS)
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/forget Nobody")
        await wait_until(pilot, lambda: has_note(app, "No memory has the id or subject 'Nobody'"))
        assert not isinstance(app.screen, ConfirmScreen) and len(engine.memories) == 3


async def test_sleep_shows_progress_and_updates_the_table_while_a_reply_streams():
    engine = FakeEngine(FACTS, degraded=[1])
    engine.sleep_gate = threading.Event()  # the cycle waits here until the reply is done
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        activity = app.panel.activity
        assert not activity.display
        await send(pilot, "/sleep")
        await wait_until(
            pilot, lambda: "refresh 3/3" in str(activity.content), what="sleep progress"
        )
        assert activity.display and app.panel.sleeping

        await send(pilot, "What is sleep for?")
        await wait_until(
            pilot, lambda: replies(app) and replies(app)[-1].done, what="a reply during sleep"
        )
        assert app.panel.sleeping and engine.sleeps == 0
        assert str(app.panel.table.get_cell("m0002", "recall")) == "✗✗"
        assert str(app.panel.table.get_cell("m0002", "fact").style) == "red"  # degraded

        await pilot.press("ctrl+g")
        assert not activity.display
        await pilot.press("ctrl+g")
        assert activity.display

        engine.sleep_gate.set()
        await wait_until(pilot, lambda: not app.panel.sleeping, what="the cycle to end")
        assert all(str(app.panel.table.get_cell(m.id, "recall")) == "✓✓" for m in engine.memories)
        assert str(app.panel.table.get_cell("m0002", "fact").style) == ""  # refreshed
        # The panel handles the report first; the app's note follows when the message reaches it.
        await wait_until(pilot, lambda: has_note(app, "slept: "), what="the sleep's note")
        assert has_note(app, "slept: 2 healthy, 1 degraded, 1 refreshed, 0 pruned · recall 100%")
        assert "perplexity 21.37 → 21.41" in str(activity.content)


async def test_an_edit_s_progress_goes_when_it_is_written_and_the_last_sleep_stays():
    engine = FakeEngine(FACTS)
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        activity = app.panel.activity
        await send(pilot, "/sleep")
        await wait_until(pilot, lambda: not app.panel.sleeping, what="the cycle to end")
        result = str(activity.content)
        assert result.startswith("last sleep: recall 100%")
        engine.remember_gate = threading.Event()
        await send(pilot, "Ingrid plays the cello.")
        await wait_until(pilot, lambda: str(activity.content).startswith("writing wake 0/1"))
        engine.remember_gate.set()
        await wait_until(pilot, lambda: has_note(app, "remembered: Ingrid"), what="the edit")
        await pilot.pause(0.1)
        assert str(activity.content) == result and activity.display


async def test_sleep_until_converged_reports_the_cycles():
    engine = FakeEngine(FACTS)
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/sleep until")
        await wait_until(pilot, lambda: has_note(app, "converged after 2 cycles"))
        assert engine.sleeps == 2


async def test_a_failed_sleep_is_shown():
    from sleeptui.errors import StateError

    engine = FakeEngine(FACTS)
    engine.fail_sleep = StateError("Could not write to /state (disk full); nothing was changed.")
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/sleep")
        await wait_until(
            pilot, lambda: has_note(app, "sleep failed and was rolled back: Could not write")
        )
        assert not app.panel.sleeping
        assert str(app.panel.table.get_cell("m0001", "recall")) == "—"  # nothing measured


async def test_sleep_starts_by_itself_when_pressure_crosses_the_threshold():
    engine = FakeEngine(FACTS[:1], capacity=4, threshold=0.6)  # 25% per new memory
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        assert not engine.pressure().due
        await send(pilot, "Ingrid plays the cello.")
        await wait_until(pilot, lambda: len(engine.memories) == 2)
        await pilot.pause(0.1)
        assert engine.sleeps == 0 and not any("Sleep pressure" in n for n in notes(app))
        await send(pilot, "Ingrid lives in Bergen.")
        await wait_until(pilot, lambda: has_note(app, "Sleep pressure reached 75% (threshold 60%)"))
        await wait_until(pilot, lambda: engine.sleeps == 1 and not app.panel.sleeping)


async def test_commands_complete_and_are_in_the_palette():
    engine = FakeEngine(FACTS)
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await pilot.press("/", "s", "l")
        await pilot.press("tab")
        assert app.prompt.value == "/sleep"
        app.prompt.value = "/forget V"
        app.prompt.cursor_position = len("/forget V")
        await pilot.pause(0.1)
        await pilot.press("tab")
        assert app.prompt.value == "/forget Viktor Johansson"
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in (
            "Sleep: one cycle",
            "Sleep until converged",
            "Forget the selected memory",
            "Remember a fact…",
            "Show memories",
            "Model and state folder",
            "Slash commands",
        ):
            assert title in titles


async def test_help_model_and_unknown_commands_answer_in_the_chat():
    engine = FakeEngine()
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/help")
        await send(pilot, "/model")
        await send(pilot, "/dream")
        await wait_until(pilot, lambda: has_note(app, "Unknown command /dream"))
        assert has_note(app, "/forget [id | subject]")
        assert has_note(
            app, "model fake-135m · backend fake · state folder /tmp/sleeptui-fake/state"
        )


async def test_the_memory_panel_collapses():
    app = fake_app(FakeEngine(FACTS))
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        assert app.panel.display and app.panel.table.compact
        chat_width = app.chat.size.width
        await pilot.press("ctrl+b")
        assert not app.panel.display
        await pilot.pause()
        assert app.chat.size.width > chat_width + 30
