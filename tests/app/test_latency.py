"""Typing stays responsive while a reply streams and a sleep cycle runs.

This test streams Markdown faster than any CPU model would, to load the UI itself; the same
measurement on the real model, with a real reply and a real sleep cycle, is in
``test_real_model.py``.
"""

from __future__ import annotations

import statistics
import threading

from tests.app.fake_engine import FakeEngine
from tests.app.pilot import fake_app, key_latencies_ms, ready, send, wait_until

PRESSES = 21
LIMIT_MS = 100.0
TOKENS_PER_SECOND = 100  # several times what the embedded model streams on a CPU


async def test_a_key_press_shows_in_the_prompt_within_100_ms_while_busy():
    reply = " ".join(f"word{n} *emphasis* and `code`." for n in range(1000))
    engine = FakeEngine([], reply=reply, token_delay=1 / TOKENS_PER_SECOND)
    engine.sleep_gate = threading.Event()
    app = fake_app(engine)
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot)
        await send(pilot, "/sleep")
        await send(pilot, "Write a long answer?")
        await wait_until(pilot, lambda: app.chat.replying and len(app.chat.reply.view.text) > 200)
        timings = await key_latencies_ms(
            app, lambda: app.chat.replying and app.panel.sleeping, PRESSES
        )
        engine.sleep_gate.set()
        await app.chat.stop_reply()
    median = statistics.median(timings)
    print(
        f"\nkey press → prompt while replying and sleeping: median {median:.1f} ms, "
        f"max {max(timings):.1f} ms over {PRESSES} presses"
    )
    assert len(timings) == PRESSES, "the reply and the sleep ran throughout the measurement"
    assert median < LIMIT_MS
