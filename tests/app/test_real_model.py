"""The app on the real embedded model: a fact stated in the chat is answered from the weights.

The fact is not in the conversation sent with the question (a stored statement is not a chat
turn), so the answer can only come from the edit.
"""

from __future__ import annotations

import pytest

from sleeptui.app import SleeptuiApp
from sleeptui.app.screens import ConfirmScreen
from tests.app.pilot import has_note, ready, replies, send, wait_until

pytestmark = pytest.mark.model

EDIT_SECONDS = 900
REPLY_SECONDS = 300


def real_app(engine) -> SleeptuiApp:
    """The app over the test's engine, its covariance ready.

    The covariance is sampled once per machine and cached (minutes on a busy CPU); it is the
    engine's cost, not the app's, so it is loaded before the app's clock starts.
    """
    engine.editor()
    return SleeptuiApp(engine_factory=lambda progress: engine)


async def remember_oda(pilot) -> None:
    app = pilot.app
    await send(pilot, "Oda Fjellheim lives in Tromsø.")
    await wait_until(
        pilot, lambda: len(app.panel.table.rows) == 1, timeout=EDIT_SECONDS, what="the new row"
    )
    await wait_until(pilot, lambda: has_note(app, "remembered: Oda Fjellheim · lives in · Tromsø"))
    [memory] = app.engine.memories
    assert str(app.panel.table.get_cell(memory.id, "fact")).startswith("Oda Fjellheim")


async def test_a_stated_fact_is_answered_from_the_weights(engine):
    app = real_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot)
        await remember_oda(pilot)
        await send(pilot, "Where does Oda Fjellheim live?")
        await wait_until(
            pilot,
            lambda: replies(app) and replies(app)[-1].done,
            timeout=REPLY_SECONDS,
            what="the answer",
        )
        answer = replies(app)[-1].text
        print(f"\nanswer: {answer!r}")
        assert "Tromsø" in answer
        question = {"role": "user", "content": "Where does Oda Fjellheim live?"}
        assert app.chat.history[0] == question and len(app.chat.history) == 2  # no fact in context


async def test_forget_removes_the_row(engine):
    app = real_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot)
        await remember_oda(pilot)
        await send(pilot, "/forget Oda Fjellheim")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(
            pilot,
            lambda: app.panel.table.row_count == 0,
            timeout=EDIT_SECONDS,
            what="the row to go",
        )
        await wait_until(pilot, lambda: has_note(app, "forgot: Oda Fjellheim · lives in · Tromsø"))
        assert engine.memories == ()
