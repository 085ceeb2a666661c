"""The app on the real embedded model: a fact stated in the chat is answered from the weights,
while a sleep cycle runs beside the reply; Esc stops a reply; /forget takes the fact out.

The fact is not in the conversation sent with the question (a stored statement is not a chat
turn), so the answer can only come from the edit. Key presses are timed while the model works.
"""

from __future__ import annotations

import statistics
import threading

import pytest

from sleeptui import sleep as sleep_steps
from sleeptui.app import SleeptuiApp
from sleeptui.app.screens import ConfirmScreen
from tests.app.pilot import has_note, key_latencies_ms, ready, replies, send, wait_until

pytestmark = pytest.mark.model

EDIT_SECONDS = 900
REPLY_SECONDS = 300
PRESSES = 15
LIMIT_MS = 100.0
QUESTION = "Where does Oda Fjellheim live?"
STORY = "Tell me a long story about a lighthouse keeper and his dog."


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


def report(what: str, timings: list[float]) -> float:
    median = statistics.median(timings)
    print(
        f"\nkey press → prompt while {what}: median {median:.1f} ms, "
        f"max {max(timings):.1f} ms over {len(timings)} presses"
    )
    return median


async def test_a_fact_is_answered_from_the_weights_while_a_sleep_runs_and_esc_stops_a_reply(
    engine, monkeypatch
):
    # A cycle over one memory can end before a loaded machine streams the reply's first
    # token. The cycle's audit waits until the reply has streamed: if a sleep blocked replies,
    # neither would go on, and the wait runs out with the assertion below failing.
    reply_streamed = threading.Event()
    audit = sleep_steps.audit

    def audit_once_the_reply_streams(*args, **kwargs):
        reply_streamed.wait(timeout=REPLY_SECONDS)
        return audit(*args, **kwargs)

    monkeypatch.setattr(sleep_steps, "audit", audit_once_the_reply_streams)
    app = real_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot)
        await remember_oda(pilot)
        [memory] = engine.memories
        table, activity = app.panel.table, app.panel.activity
        assert str(table.get_cell(memory.id, "recall")) == "—"  # not measured yet

        # A sleep cycle starts and shows its progress; the question is answered meanwhile.
        await send(pilot, "/sleep")
        await wait_until(
            pilot,
            lambda: "sleeping perplexity" in str(activity.content),
            timeout=EDIT_SECONDS,
            what="sleep progress",
        )
        await send(pilot, QUESTION)
        streamed_while_sleeping: list[bool] = []

        def look() -> None:
            streamed_while_sleeping.append(app.panel.sleeping and bool(replies(app)[-1].text))
            if streamed_while_sleeping[-1]:
                reply_streamed.set()

        watch = app.set_interval(0.01, look)
        sleeping_ms = await key_latencies_ms(app, lambda: app.panel.sleeping, PRESSES)
        await wait_until(
            pilot, lambda: replies(app)[-1].done, timeout=REPLY_SECONDS, what="the answer"
        )
        answer = replies(app)[-1].text
        print(f"\nanswer during sleep: {answer!r}")
        assert "Tromsø" in answer
        assert app.chat.history[0] == {"role": "user", "content": QUESTION}  # no fact in context
        assert len(engine.memories) == 1  # the question was not stored

        await wait_until(
            pilot, lambda: not app.panel.sleeping, timeout=EDIT_SECONDS, what="the cycle to end"
        )
        watch.stop()
        assert any(streamed_while_sleeping), "the reply streamed while the cycle ran"
        # The panel handles the report first; the app's note follows when the message reaches it.
        await wait_until(
            pilot,
            lambda: has_note(app, "slept: ") or has_note(app, "sleep rolled back"),
            what="the sleep's note",
        )
        assert has_note(app, "slept: ")
        assert str(table.get_cell(memory.id, "recall")).startswith(("✓", "✗"))  # measured now
        assert "last sleep: recall" in str(activity.content)

        # A long reply streams; keys still show at once; Esc stops it and keeps what it said.
        await send(pilot, STORY)
        await wait_until(
            pilot,
            lambda: app.chat.replying and len(app.chat.reply.view.text.split()) >= 3,
            timeout=REPLY_SECONDS,
            what="the story to start",
        )
        replying_ms = await key_latencies_ms(app, lambda: app.chat.replying, PRESSES)
        view = app.chat.reply.view
        await pilot.press("escape")
        assert view.done and view.has_class("-stopped")
        partial = view.text
        await wait_until(
            pilot,
            lambda: not any(w.group == "reply" and w.is_running for w in app.workers),
            what="the generation to stop",
        )
        await pilot.pause(0.2)
        assert view.text == partial and partial.strip()
        assert view.source.startswith(partial.strip()) and view.source.endswith("*(stopped)*")
        assert app.chat.history[-1] == {"role": "assistant", "content": partial.strip()}

    assert report("a sleep cycle runs", sleeping_ms) < LIMIT_MS
    assert report("a reply streams", replying_ms) < LIMIT_MS
    assert len(sleeping_ms) >= 5 and len(replying_ms) >= 5


async def test_forget_removes_the_row_and_the_model_no_longer_says_it(engine):
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
        assert has_note(app, "Tromsø — the model no longer says it")
        assert engine.memories == ()
