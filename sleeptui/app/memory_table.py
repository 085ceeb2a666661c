"""The table of memories: one row per ledger entry, keyed by memory id, updated cell by cell."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from sleeptui.ledger import Memory, Recall

COLUMNS = (
    ("fact", "fact"),
    ("stage", "stage"),
    ("scale", "scale"),
    ("degraded", "deg"),
    ("recall", "recall"),
    ("age", "age"),
)
"""(key, label) of each column, in order."""

WIDTHS = {"stage": 12, "scale": 5, "degraded": 3, "recall": 6, "age": 4}
"""Room kept for the other columns' widest values ("consolidated", "✓✓ 59m"); facts get the rest."""

COMPACT_COLUMNS = ("fact", "recall")
"""The columns kept when the table is narrow: what the model was told and whether it still says
it; a degraded memory's fact is shown in red."""

COMPACT_BELOW = 56
"""Table widths under this many cells get the compact columns."""

MIN_FACT_WIDTH = 12

MAX_FACT_LINES = 3
"""A fact wraps onto up to this many lines of its row; a longer one ends in an ellipsis."""

STAGE_STYLE = {"wake": "yellow", "consolidating": "cyan", "consolidated": "green"}


def ago(iso: str, at: datetime | None = None) -> str:
    """A short age: ``now``, ``5m``, ``3h``, ``2d``."""
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return "?"
    seconds = ((at or datetime.now(UTC)) - then).total_seconds()
    if seconds < 60:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return "now"


def recall_cell(recall: Recall | None, with_age: bool = True) -> Text:
    """Completion and chat recall as two marks, with how long ago they were measured."""
    if recall is None:
        return Text("—", style="dim")
    text = Text()
    for ok in (recall.completion, recall.chat):
        text.append("✓" if ok else "✗", style="green" if ok else "red")
    return text.append(f" {ago(recall.at)}", style="dim") if with_age else text


def cells(memory: Memory, compact: bool, fact_width: int) -> dict[str, Text | str]:
    """The cell values of one memory's row, by column key; long facts wrap, then end in an
    ellipsis."""
    style = "dim strike" if memory.scale == 0 else "red" if memory.degraded and compact else ""
    fact = Text(memory.text, style=style)
    fact.truncate(fact_width * MAX_FACT_LINES - 1, overflow="ellipsis")
    values: dict[str, Text | str] = {
        "fact": fact,
        "stage": Text(memory.stage, style=STAGE_STYLE.get(memory.stage, "")),
        "scale": f"{memory.scale:.2f}",
        "degraded": Text("yes", style="bold red") if memory.degraded else Text("no", style="dim"),
        "recall": recall_cell(memory.last_recall, with_age=not compact),
        "age": ago(memory.created_at),
    }
    return {key: values[key] for key in (COMPACT_COLUMNS if compact else values)}


def same(a: Text | str, b: Text | str) -> bool:
    """Equal text and style (rich's ``==`` ignores a Text's base style)."""
    if isinstance(a, Text) and isinstance(b, Text):
        return (a.plain, str(a.style), a.spans) == (b.plain, str(b.style), b.spans)
    return a == b


def layout(width: int) -> tuple[bool, int]:
    """(compact, fact width) for a table ``width`` cells wide (2 cells of padding per column)."""
    compact = width < COMPACT_BELOW
    widths = {**WIDTHS, "recall": len("recall")} if compact else WIDTHS  # marks only: ✓✓
    others = sum(w + 2 for key, w in widths.items() if not compact or key in COMPACT_COLUMNS)
    return compact, max(MIN_FACT_WIDTH, width - others - 2 - 2)  # - its padding, the scrollbar


class MemoryTable(DataTable):
    """What the model remembers. ``delete`` or ``f`` asks to forget the selected row."""

    BINDINGS = [Binding("delete,f", "forget_selected", "Forget", id="forget")]

    @dataclass
    class ForgetRequested(Message):
        memory_id: str

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._memories: tuple[Memory, ...] = ()
        self.compact, self.fact_width = False, 32
        self._add_columns()

    def _add_columns(self) -> None:
        for key, label in COLUMNS:
            if not self.compact or key in COMPACT_COLUMNS:
                self.add_column(label, key=key, width=self.fact_width if key == "fact" else None)

    def on_resize(self, event: events.Resize) -> None:
        """A new width may mean other columns: the one time the table is rebuilt."""
        if layout(event.size.width) == (self.compact, self.fact_width):
            return
        self.compact, self.fact_width = layout(event.size.width)
        selected = self.selected_id
        self.clear(columns=True)
        self._add_columns()
        self.sync(self._memories)
        if selected is not None and selected in self.rows:
            self.move_cursor(row=self.get_row_index(selected))

    def sync(self, memories: Sequence[Memory]) -> None:
        """Add new rows, drop removed ones and update only the cells that changed."""
        self._memories = tuple(memories)
        ids = {m.id for m in memories}
        for key in [k for k in self.rows if k.value not in ids]:
            self.remove_row(key)
        for memory in memories:
            values = cells(memory, self.compact, self.fact_width)
            if memory.id not in self.rows:
                self.add_row(*values.values(), key=memory.id, height=None)
                continue
            for column, value in values.items():
                if not same(self.get_cell(memory.id, column), value):
                    self.update_cell(memory.id, column, value, update_width=True)

    def refresh_ages(self, memories: Sequence[Memory]) -> None:
        for memory in memories:
            if memory.id in self.rows:
                values = cells(memory, self.compact, self.fact_width)
                for column in ("age", "recall"):
                    if column in values:
                        self.update_cell(memory.id, column, values[column])

    @property
    def selected_id(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value

    def action_forget_selected(self) -> None:
        memory_id = self.selected_id
        if memory_id is not None:
            self.post_message(self.ForgetRequested(memory_id))
