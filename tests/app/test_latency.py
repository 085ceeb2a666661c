"""Typing stays responsive while a reply streams and a sleep cycle runs."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

from textual import events

from tests.app.fake_engine import FakeEngine
from tests.app.pilot import fake_app, ready, send, wait_until

PRESSES = 21
LIMIT_MS = 100.0
TOKENS_PER_SECOND = 100  # several times what the embedded model streams on a CPU


async def key_latency_ms(app, key: str) -> float:
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
        app.prompt.focus()
        timings = []
        for _ in range(PRESSES):
            timings.append(await key_latency_ms(app, "x"))
            await asyncio.sleep(0.05)  # a fast typist: 20 keys a second
        busy = app.chat.replying and app.panel.sleeping
        engine.sleep_gate.set()
        await app.chat.stop_reply()
    median = statistics.median(timings)
    print(
        f"\nkey press → prompt while replying and sleeping: median {median:.1f} ms, "
        f"max {max(timings):.1f} ms over {PRESSES} presses"
    )
    assert busy, "the reply and the sleep ran throughout the measurement"
    assert median < LIMIT_MS
