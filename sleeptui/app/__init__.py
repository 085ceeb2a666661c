"""The Textual chat app: ``sleeptui`` with no subcommand."""

from __future__ import annotations

from sleeptui.app.app import SleeptuiApp


def run_app(model: str | None = None, state: str | None = None, backend: str = "auto") -> int:
    """Run the app until the user quits; the exit status is 2 if it could not start."""
    app = SleeptuiApp(model=model, state=state, backend=backend)
    app.run()
    return app.return_code or 0


__all__ = ["SleeptuiApp", "run_app"]
