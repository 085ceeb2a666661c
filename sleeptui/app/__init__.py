"""The Textual chat app: ``sleeptui`` with no subcommand."""

from __future__ import annotations

from sleeptui.app.app import SleeptuiApp, open_engine


def run_app(
    model: str | None = None,
    state: str | None = None,
    backend: str = "auto",
    four_bit: bool | None = None,
) -> int:
    """Run the app until the user quits; the exit status is 2 if it could not start."""
    app = SleeptuiApp(engine_factory=open_engine(model, state, backend, four_bit))
    app.run()
    return app.return_code or 0


__all__ = ["SleeptuiApp", "run_app"]
