"""The sleep-pressure gauge and the progress view of whatever the engine is doing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.widgets import Static

if TYPE_CHECKING:
    from sleeptui.sleep import Pressure

BAR_WIDTH = 12


def bar(fraction: float, width: int = BAR_WIDTH, style: str = "green") -> Text:
    """A text bar, ``█████░░░░░``, filled to ``fraction`` in [0, 1]."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


class PressureGauge(Static):
    """How much the model needs sleep, and what the memories are made of."""

    def show(self, pressure: Pressure | None, error: str | None = None) -> None:
        if error is not None:
            self.update(Text(f"sleep pressure unavailable: {error}", style="red"))
            return
        if pressure is None:
            self.update(Text("sleep pressure: not reported by this engine", style="dim"))
            return
        style = (
            "red"
            if pressure.due
            else "yellow"
            if pressure.value >= pressure.threshold / 2
            else "green"
        )
        head = Text.assemble(
            "sleep pressure ", bar(pressure.value, style=style), f" {pressure.value:.0%}"
        )
        if pressure.due:
            head.append(" due", style=style)
        counts = Text.assemble(
            ("healthy ", "dim"),
            (str(pressure.healthy), "green"),
            ("  degraded ", "dim"),
            (str(pressure.degraded), "red" if pressure.degraded else ""),
            ("  total ", "dim"),
            str(pressure.total),
        )
        capacity = Text.assemble(
            ("wake capacity left ", "dim"),
            str(pressure.capacity_left),
            ("  sleeps at ", "dim"),
            f"{pressure.threshold:.0%}",
        )
        self.update(Text("\n").join([head, counts, capacity]))


class ActivityView(Static):
    """Progress of a sleep cycle or an edit: stage, step i/n, and the cycle's result.

    Attributes:
        hidden_by_user: The user hid the view; it stays hidden until shown again.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.hidden_by_user = False
        self.active = False
        self._result: Text | None = None

    def progress(self, title: str, stage: str, i: int, n: int) -> None:
        self.active = True
        line = Text.assemble((f"{title} ", "bold"), (stage, "cyan"), f" {i}/{n} " if n else " ")
        if n:
            line.append_text(bar(i / n, width=10, style="cyan"))
        self.update(line if self._result is None else Text("\n").join([line, self._result]))
        self._show()

    def result(self, text: str) -> None:
        """Keep a finished cycle's numbers on view (recall, perplexity) until the next one."""
        self._result = Text(text, style="dim")
        self.update(self._result)

    def idle(self) -> None:
        """The work ended: only the last cycle's result (if any) stays on view."""
        self.active = False
        self.update(self._result or "")
        self._show()

    def toggle(self) -> None:
        self.hidden_by_user = not self.hidden_by_user
        self._show()

    def _show(self) -> None:
        self.display = not self.hidden_by_user and (self.active or self._result is not None)
