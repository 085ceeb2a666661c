"""Chatting: statements are remembered, questions answered, replies streamed and stoppable."""

from __future__ import annotations

import threading

from sleeptui.app.chat import RememberedNote
from sleeptui.facts import Fact
from tests.app.fake_engine import REPLY, FakeEngine
from tests.app.pilot import fake_app, has_note, notes, ready, replies, send, wait_until


async def test_a_statement_is_remembered_and_not_answered():
    engine = FakeEngine()
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Viktor lives in Portland.")
        await wait_until(pilot, lambda: "m0001" in app.panel.table.rows, what="the new row")
        await wait_until(pilot, lambda: has_note(app, "remembered: Viktor · lives in · Portland"))
        assert [m.text for m in engine.memories] == ["Viktor lives in Portland"]
        assert str(app.panel.table.get_cell("m0001", "fact")).startswith("Viktor lives in Por")
        assert engine.asked == [] and replies(app) == []


async def test_a_question_is_answered_and_not_stored():
    engine = FakeEngine()
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Where does Viktor live?")
        await wait_until(pilot, lambda: replies(app) and replies(app)[-1].done, what="the reply")
        assert engine.asked[0][0] == "Where does Viktor live?"
        assert replies(app)[-1].text == REPLY
        assert replies(app)[-1].source == REPLY
        assert engine.memories == () and app.panel.table.row_count == 0
        assert not any("remembered" in n for n in notes(app))


async def test_he_refers_to_the_last_named_subject_across_messages():
    engine = FakeEngine()
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Viktor lives in Portland.")
        await wait_until(pilot, lambda: len(engine.memories) == 1)
        await send(pilot, "He works as a baker.")
        await wait_until(pilot, lambda: len(engine.memories) == 2)
        assert engine.memories[1].subject == "Viktor"
        await wait_until(pilot, lambda: has_note(app, "Viktor · works as a · baker"))


async def test_recent_turns_are_the_context_and_statements_are_not():
    engine = FakeEngine(reply="Fine.")
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Viktor lives in Portland.")
        for n in range(6):
            await send(pilot, f"Question number {n}?")
            await wait_until(
                pilot, lambda n=n: len(replies(app)) == n + 1 and replies(app)[-1].done
            )
        first, history = engine.asked[0][1], engine.asked[-1][1]
        assert first == []
        assert len(history) == 8  # the last four turns
        assert history[-2:] == [
            {"role": "user", "content": "Question number 4?"},
            {"role": "assistant", "content": "Fine."},
        ]
        assert not any("Portland" in turn["content"] for _, h in engine.asked for turn in h)


async def test_escape_stops_a_reply_at_once_and_keeps_the_partial_text():
    engine = FakeEngine()
    engine.hold = threading.Event()  # the reply pauses after three words
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Tell me something?")
        await wait_until(pilot, lambda: replies(app) and replies(app)[-1].text.count(" ") >= 2)
        view = replies(app)[-1]
        await pilot.press("escape")
        assert view.done and view.has_class("-stopped")
        partial = view.text
        engine.hold.set()
        await pilot.pause(0.2)
        assert view.text == partial and partial and partial != REPLY
        assert view.source.endswith("*(stopped)*")
        assert view.source.startswith(partial.strip())
        await wait_until(pilot, lambda: app.chat.history, what="the stopped turn in the history")
        assert app.chat.history[-1] == {"role": "assistant", "content": partial.strip()}


async def test_remember_command_refuses_a_question():
    engine = FakeEngine([Fact("Anna", "works as a", "nurse")])
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/remember Where does Viktor live?")
        await wait_until(pilot, lambda: has_note(app, "Not stored: that is a question"))
        await pilot.pause(0.1)
        assert [m.subject for m in engine.memories] == ["Anna"]
        assert list(app.panel.table.rows) == ["m0001"]
        assert engine.asked == []


async def test_remember_command_stores_a_fact():
    engine = FakeEngine()
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "/remember Ingrid plays the cello")
        await wait_until(pilot, lambda: "m0001" in app.panel.table.rows)
        assert engine.memories[0].object == "cello"


async def test_undo_forgets_what_was_just_remembered():
    engine = FakeEngine()
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Viktor lives in Portland.")
        await wait_until(pilot, lambda: "m0001" in app.panel.table.rows)
        note = app.chat.query_one(RememberedNote)
        await wait_until(pilot, lambda: not note.query_one("#undo").disabled)
        await pilot.click("#undo")
        await wait_until(pilot, lambda: "m0001" not in app.panel.table.rows, what="the row to go")
        assert engine.memories == ()
        await wait_until(pilot, lambda: note.has_class("-undone"))


async def test_a_failed_edit_is_shown_and_nothing_is_added():
    from sleeptui.errors import StateError

    engine = FakeEngine()
    engine.fail_remember = StateError(
        "Could not write to /state (No space left); nothing was changed."
    )
    app = fake_app(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        await send(pilot, "Viktor lives in Portland.")
        await wait_until(pilot, lambda: has_note(app, "not remembered: Could not write to /state"))
        assert app.panel.table.row_count == 0
