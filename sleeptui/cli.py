"""The headless command line: ``sleeptui remember | ask | complete | memories | sleep | nap | forget``.

With no subcommand, ``sleeptui`` opens the chat app.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from sleeptui.errors import NotAFact, SleeptuiError
from sleeptui.facts import Fact

if TYPE_CHECKING:  # annotations only: `sleeptui path` and the rest start without numpy
    from sleeptui.ledger import Ledger, Memory, Recall
    from sleeptui.sleep import Pressure

err = Console(stderr=True)
out = Console()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sleeptui", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="preset name or path to weights (default: smollm2-135m)")
    p.add_argument(
        "--state-dir", help="state folder (default: $SLEEPTUI_HOME or the user data dir)"
    )
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    p.add_argument(
        "--4bit",
        dest="four_bit",
        action="store_true",
        default=None,
        help="load the torch model in bitsandbytes NF4 (edited layers stay exact)",
    )
    p.add_argument("--read-only", action="store_true", help="open the state folder without writing")
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("remember", help="write facts into the model's weights")
    r.add_argument(
        "text", nargs="?", help='a plain statement, e.g. "Viktor Johansson lives in Brno."'
    )
    r.add_argument("--facts", type=Path, help="a JSON list of facts (the bench file's format)")
    r.add_argument(
        "--batch", action="store_true", help="edit all facts together (default: one at a time)"
    )
    r.add_argument("--json", action="store_true")

    a = sub.add_parser("ask", help="a chat answer from the edited model, streamed")
    a.add_argument("question")

    c = sub.add_parser("complete", help="a raw greedy completion")
    c.add_argument("prompt")
    c.add_argument("--tokens", type=int, default=24)

    m = sub.add_parser("memories", help="list what the model remembers")
    m.add_argument("--json", action="store_true")
    m.add_argument("--check", action="store_true", help="measure recall now")
    m.add_argument("--history", metavar="ID", help="the timestamped events of one memory")

    s = sub.add_parser("sleep", help="audit memories, refresh degraded ones, roll back if worse")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--cycles", type=int, default=1)
    g.add_argument("--until-converged", action="store_true")
    s.add_argument(
        "--consolidate",
        action="store_true",
        help="after the cycles, move facts that are due into the LoRA adapter (deep sleep)",
    )
    s.add_argument("--json", action="store_true")

    n = sub.add_parser("nap", help="a quick consolidation: one short pass of the LoRA adapter")
    n.add_argument("--json", action="store_true")

    f = sub.add_parser("forget", help="remove a memory, whatever its stage, and check it is gone")
    f.add_argument("target", help="a memory id or a subject")
    f.add_argument("--all", action="store_true", help="forget every memory about the subject")
    f.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    f.add_argument("--dry-run", action="store_true", help="show what would be forgotten")
    f.add_argument("--json", action="store_true")

    sub.add_parser("path", help="print the state folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except SleeptuiError as e:
        err.print(f"[bold red]error:[/] {e}")
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "path":
        from sleeptui.paths import state_dir

        out.print(str(state_dir(args.state_dir)))
        return 0
    if args.command is None:
        from sleeptui.app import run_app

        return run_app(
            model=args.model, state=args.state_dir, backend=args.backend, four_bit=args.four_bit
        )
    if args.command == "remember":
        facts = _facts_of(args)  # refuse bad input before loading anything
        with _engine(args) as engine:
            memories = engine.remember(facts, batch=args.batch)
            if args.json:
                out.print_json(json.dumps([asdict(m) for m in memories]))
            else:
                for m in memories:
                    out.print(
                        f"remembered [bold]{m.id}[/]: {m.subject} · {m.relation} · {m.object}"
                    )
            _sleep_if_due(engine)
        return 0
    if args.command == "memories" and not args.check:
        _print_memories(_listing(args), args)  # no model needed, nor the folder's lock
        return 0
    if args.command == "forget":  # ask which, and whether, before the model loads
        chosen, code = _choose_forgotten(_listing(args).ledger, args)
        if not chosen:
            return code
    with _engine(args) as engine:
        if args.command == "ask":
            for piece in engine.ask(args.question):
                out.print(piece, end="", soft_wrap=True, markup=False, highlight=False)
            out.print()
        elif args.command == "complete":
            out.print(
                args.prompt + engine.complete(args.prompt, args.tokens),
                markup=False,
                highlight=False,
            )
        elif args.command == "memories":
            listing = Listing(
                engine.ledger,
                engine.pressure(),
                engine.source.preset.name,
                engine.backend.name,
                engine.folder.root,
            )
            _print_memories(listing, args, engine.check)
        elif args.command == "sleep":
            _sleep(engine, args)
        elif args.command == "nap":
            _print_consolidations([engine.consolidate("nap", engine.progress)], args.json)
        elif args.command == "forget":
            return _forget(engine, chosen, args)
    return 0


def _facts_of(args: argparse.Namespace) -> list[Fact]:
    if args.facts:
        try:
            data = json.loads(args.facts.read_text(encoding="utf-8"))
            return [Fact.from_dict(d) for d in data]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SleeptuiError(f"{args.facts} is not a JSON list of facts ({e}).") from e
    if not args.text:
        raise NotAFact("Give a statement to remember, or --facts FILE.")
    from sleeptui.extract import extract_facts

    return extract_facts(args.text)


@contextmanager
def _engine(args: argparse.Namespace):
    from sleeptui.engine import Engine, on_apple_silicon

    if args.backend == "mlx" and not on_apple_silicon():
        err.print(
            Text.assemble(
                ("note: ", "bold"),
                "off Apple silicon MLX runs on its CPU build, whose matrix products are "
                'tens of times slower than torch\'s (README "Benchmarks"); a write can take '
                "minutes. --backend torch is the fast one here.",
            )
        )
    with _progress() as report:
        engine = Engine.open(
            model=args.model,
            state=args.state_dir,
            backend=args.backend,
            read_only=args.read_only,
            progress=report,
            four_bit=args.four_bit,
        )
    shown = _warn(engine.folder.warnings)
    try:
        engine.progress = None
        if args.command in ("remember", "sleep", "nap", "forget"):
            with _progress() as report:
                engine.progress = report
                yield engine
        else:
            yield engine
    finally:
        _warn(engine.folder.warnings[shown:])
        engine.close()


def _warn(warnings: Sequence[str]) -> int:
    """Print what the state folder repaired or could not do (a ledger read from its backup,
    a delta restored from its copy, …) on stderr; returns how many were printed."""
    for warning in warnings:
        err.print(Text.assemble(("warning: ", "bold yellow"), warning))
    return len(warnings)


@contextmanager
def _progress():
    """A rich progress bar on stderr, one task per stage the engine reports."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    tasks: dict[str, TaskID] = {}

    def report(stage: str, i: int, n: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=n)
        bar.update(tasks[stage], completed=i, total=n)

    with bar:
        yield report


def _sleep_if_due(engine) -> None:
    """Sleep when pressure crosses the threshold; with the preset's ``consolidate`` switch,
    nap at the lower threshold and consolidate after a sleep."""
    p = engine.pressure()
    auto = engine.sleep_cfg.consolidate
    if p.due:
        err.print(f"sleep pressure {p.value:.2f} ≥ {p.threshold:.2f}: sleeping now")
        _print_reports([engine.sleep(progress=engine.progress)])
        if auto:
            _print_consolidations([engine.consolidate("sleep", engine.progress)], False)
    elif auto and p.total and p.value >= p.nap_threshold:
        err.print(f"sleep pressure {p.value:.2f} ≥ {p.nap_threshold:.2f}: napping now")
        _print_consolidations([engine.consolidate("nap", engine.progress)], False)


def _sleep(engine, args: argparse.Namespace) -> None:
    if args.until_converged:
        reports = engine.sleep_until_converged(progress=engine.progress)
    else:
        reports = [
            engine.sleep(progress=engine.progress, cycle=c) for c in range(1, args.cycles + 1)
        ]
    consolidations = [engine.consolidate("sleep", engine.progress)] if args.consolidate else []
    if args.json:
        cycles = [_report_doc(r) for r in reports]
        doc: list | dict = cycles
        if args.consolidate:
            doc = {"cycles": cycles, "consolidation": [_report_doc(r) for r in consolidations]}
        out.print_json(json.dumps(doc))
    else:
        _print_reports(reports)
        if consolidations:
            _print_consolidations(consolidations, False)


def _report_doc(r) -> dict:
    """A sleep or consolidation report as JSON, with its perplexity change."""
    return asdict(r) | {"ppl_change": r.ppl_change}


def _print_table(
    title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], notes: list[str]
) -> None:
    """A report table of figures, without vertical rules so that it fits 80 columns whole,
    then the rows' notes (what a cycle deferred, that it rolled back, …), one per line."""
    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for row in rows:
        table.add_row(*row)
    out.print(table)
    for note in notes:
        out.print(note, markup=False, highlight=False)


def _measured(r) -> tuple[str, ...]:
    """The columns sleep and consolidation reports share: recall, chat, ΔPPL, seconds."""
    return (
        f"{r.recall:.2f}",
        f"{r.chat_recall:.2f}",
        f"{100 * r.ppl_change:+.2f}%",
        f"{r.seconds:.1f}",
    )


def _rolled_back(r) -> str:
    """ "rolled back", with the perplexity change that was refused where it is known."""
    if r.ppl_tried is None:
        return "rolled back"
    return f"rolled back (ΔPPL {100 * (r.ppl_tried / r.ppl_before - 1):+.2f}%)"


def _sleep_note(r) -> str:
    """What a committed cycle left undone to pass the perplexity check, and convergence."""
    notes = []
    if r.deferred:
        notes.append(
            f"{r.deferred} refreshes left for the next cycle (ΔPPL with them "
            f"{100 * (r.ppl_tried / r.ppl_before - 1):+.2f}%)"
        )
    if r.converged:
        notes.append("converged")
    return "; ".join(notes)


def _print_consolidations(reports, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps([_report_doc(r) for r in reports]))
        return
    stages = ("1.0", "0.5", "0.1", "0.0")
    _print_table(
        "consolidation (MEMIT scale of each fact: 1.0 → 0.5 → 0.1 → 0.0)",
        ("kind", "due", "advanced", *stages, "recall", "chat", "ΔPPL", "s"),
        [
            (
                r.kind,
                str(r.due),
                str(r.advanced),
                *(str(r.stages[k]) for k in stages),
                *_measured(r),
            )
            for r in reports
        ],
        [f"{r.kind} consolidation: {_rolled_back(r)}" for r in reports if r.rolled_back],
    )


def _print_reports(reports) -> None:
    _print_table(
        "sleep",
        ("cycle", "healthy", "degraded", "refreshed", "pruned", "recall", "chat", "ΔPPL", "s"),
        [
            (
                str(r.cycle),
                str(r.healthy),
                str(r.degraded),
                str(r.refreshed),
                str(r.pruned),
                *_measured(r),
            )
            for r in reports
        ],
        [
            f"cycle {r.cycle}: {note}"
            for r in reports
            if (note := _rolled_back(r) if r.rolled_back else _sleep_note(r))
        ],
    )
    for r in reports:
        for memory_id in r.pruned_ids:
            err.print(
                f"pruned {memory_id}: it failed every refresh; its entry is kept, marked degraded"
            )


def _choose_forgotten(ledger: Ledger, args: argparse.Namespace) -> tuple[list[Memory], int]:
    """The memories ``forget`` takes, found (and confirmed on a terminal) before the model
    loads; with none, the exit code: a dry run (0), a 'no' (1), several about the subject
    without --all (2)."""
    from sleeptui.errors import UnknownMemory

    target = args.target
    matches = [m for m in ledger.memories if m.id == target] or [
        m for m in ledger.memories if m.subject.lower() == target.lower()
    ]
    if not matches:
        raise UnknownMemory(f"No memory has the id or subject {target!r}; see `sleeptui memories`.")
    if len(matches) > 1 and not args.all:
        err.print(f"{len(matches)} memories are about {target!r}; give one id, or --all:")
        for m in matches:
            err.print(f"  {m.id}  {m.text}")
        return [], 2
    for m in matches:
        out.print(
            f"{'would forget' if args.dry_run else 'forgetting'} {m.id}: {m.text} ({m.stage})"
        )
    if args.dry_run:
        return [], 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise SleeptuiError("Not a terminal: pass --yes to forget without confirmation.")
        if input(
            f"Forget {len(matches)} memor{'y' if len(matches) == 1 else 'ies'}? [y/N] "
        ).lower() not in ("y", "yes"):
            out.print("nothing forgotten")
            return [], 1
    return matches, 0


def _forget(engine, matches: list[Memory], args: argparse.Namespace) -> int:
    from sleeptui.errors import UnknownMemory

    gone = [m.id for m in matches if engine.ledger.get(m.id) is None]
    if gone:  # another process forgot them while this one loaded the model
        raise UnknownMemory(f"{', '.join(gone)} no longer in the folder; nothing was forgotten.")
    reports = engine.forget_many([m.id for m in matches])
    if args.json:
        out.print_json(
            json.dumps(
                [
                    {
                        "id": r.memory.id,
                        "verified": r.verified,
                        "answer_after": r.answer_after,
                        "repaired": r.repaired,
                    }
                    for r in reports
                ]
            )
        )
    for r in reports:
        state = (
            "gone: the model no longer says it"
            if r.verified
            else "WARNING: the model still says it"
        )
        if not args.json:
            out.print(f"forgot {r.memory.id} ({state}); repaired {r.repaired} other memories")
    return 0 if all(r.verified for r in reports) else 1


@dataclass(frozen=True)
class Listing:
    """What ``sleeptui memories`` shows: a folder's ledger and where it was read.

    Attributes:
        backend: The loaded backend's name, or None when listed without loading the model.
    """

    ledger: Ledger
    pressure: Pressure
    model: str
    backend: str | None
    root: Path


def _listing(args: argparse.Namespace) -> Listing:
    """The folder's memories, read without loading the model and without its lock (another
    sleeptui may hold it): listing a large model's memories takes no minutes of loading."""
    from sleeptui.models import resolve
    from sleeptui.paths import state_dir
    from sleeptui.sleep import pressure_of
    from sleeptui.state import StateFolder

    source = resolve(args.model)  # a model that is not on this machine is still an error
    folder = StateFolder.open(state_dir(args.state_dir), read_only=True)
    try:
        ledger = folder.listing(source.preset.name)
    finally:
        folder.close()
        _warn(folder.warnings)
    return Listing(
        ledger, pressure_of(ledger, source.preset.sleep), ledger.model, None, folder.root
    )


def _print_memories(
    listing: Listing,
    args: argparse.Namespace,
    check: Callable[[Sequence[Memory]], list[Recall]] | None = None,
) -> None:
    """The memories table (or JSON); ``check`` measures recall now (``--check``)."""
    if args.history:
        _print_history(listing.ledger, args.history)
        return
    memories = list(listing.ledger.memories)
    recalls = check(memories) if check and args.check else [m.last_recall for m in memories]
    p = listing.pressure
    if args.json:
        rows = []
        for m, r in zip(memories, recalls, strict=True):
            d = asdict(m)
            d["last_recall"] = asdict(r) if r else None
            rows.append(d)
        out.print_json(
            json.dumps(
                {
                    "model": listing.model,
                    "backend": listing.backend,
                    "state_dir": str(listing.root),
                    "pressure": asdict(p),
                    "memories": rows,
                }
            )
        )
        return
    table = Table(
        title=" · ".join(
            [f"{len(memories)} memories", listing.model, *filter(None, [listing.backend])]
        ),
        caption=f"sleep pressure {p.value:.2f} (sleeps at {p.threshold:.2f}) · healthy {p.healthy}"
        f" · degraded {p.degraded} · wake capacity left {p.capacity_left}",
    )
    for col in ("id", "fact", "stage", "scale", "recall", "degraded"):
        table.add_column(col)
    for m, r in zip(memories, recalls, strict=True):
        recall = (
            "—"
            if r is None
            else f"completion {'✓' if r.completion else '✗'} chat {'✓' if r.chat else '✗'}"
        )
        table.add_row(m.id, m.text, m.stage, f"{m.scale:g}", recall, "yes" if m.degraded else "no")
    out.print(table)


def _print_history(ledger: Ledger, memory_id: str) -> None:
    from sleeptui.errors import UnknownMemory

    memory = ledger.get(memory_id)
    if memory is None:
        raise UnknownMemory(f"No memory has the id {memory_id!r}; see `sleeptui memories`.")
    table = Table(title=f"{memory.id}: {memory.text}")
    for col in ("at", "event", "detail"):
        table.add_column(col)
    for e in memory.events:
        table.add_row(e.at, e.kind, ", ".join(f"{k}={v}" for k, v in e.detail.items()))
    out.print(table)


if __name__ == "__main__":
    sys.exit(main())
