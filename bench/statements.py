"""Statements of our own, with relations the bench pool lacks, written as a user writes them.

Each statement in bench/data/statements.json goes through the extractor (as `sleeptui
remember TEXT` does; "and" and appositives can give a statement two facts), and the facts
are written one at a time with wake's defaults in a fresh folder. For each statement's
fact (the one whose object holds the given "object", which an answer must say), it prints completion recall, chat recall on the
first question the extractor made for it, right after its write and after all writes, and
chat recall on a question of our own that no part of sleeptui generated ("ask"). Writes
bench/out/statements.json.

    python bench/statements.py [--statements FILE] [--model M] [--set '{"chat_share": 0.6}']

``--set`` overrides wake's EditConfig, as bench/sweep.py's settings do.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, chat_answers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sleeptui.backends import says  # noqa: E402

from sleeptui.engine import Engine  # noqa: E402
from sleeptui.extract import extract_facts  # noqa: E402

console = Console()
STATEMENTS = Path(__file__).resolve().parent / "data" / "statements.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--statements", type=Path, default=STATEMENTS)
    p.add_argument("--model")
    p.add_argument("--set", type=json.loads, default={}, help="EditConfig overrides (JSON)")
    args = p.parse_args()
    cases = json.loads(args.statements.read_text(encoding="utf-8"))
    rows = []
    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state)
        engine.cfg = replace(engine.cfg, **args.set)
        b = engine.backend
        started = time.perf_counter()
        for case in cases:
            facts = extract_facts(case["statement"])
            fact = next(f for f in facts if case["object"] in f.object)
            engine.remember(facts)
            [now] = chat_answers(engine, [fact.questions[0]], until=[case["object"]])
            rows.append(
                {
                    **case,
                    "fact": fact,
                    "facts": len(facts),
                    "chat_at_write": says(now, case["object"]),
                }
            )
        seconds = time.perf_counter() - started
        facts = [r["fact"] for r in rows]
        targets = [r["object"] for r in rows]  # what an answer must say
        outs = b.greedy([b.encode(f.prompt) for f in facts], 12, until=targets)
        seen = chat_answers(engine, [f.questions[0] for f in facts], until=targets)
        own = chat_answers(engine, [r["ask"] for r in rows], until=targets)
        engine.close()
    for r, f, o, s, a in zip(rows, facts, outs, seen, own, strict=True):
        r.update(
            completion=says(b.decode(o), r["object"]),
            chat=says(s, r["object"]),
            ask_recall=says(a, r["object"]),
            question=f.questions[0],
            answer=s,
            own_answer=a,
            fact=f"{f.subject} · {f.relation} · {f.object}",
        )
    table = Table(title=f"{len(rows)} statements of our own, written one at a time")
    table.add_column("fact", ratio=3)
    table.add_column("question made", ratio=3)
    for col in ("compl.", "chat, at write", "chat", "own q."):
        table.add_column(col, justify="center", ratio=1)
    mark = {True: "✓", False: "✗"}
    for r in rows:
        table.add_row(
            r["fact"],
            r["question"],
            mark[r["completion"]],
            mark[r["chat_at_write"]],
            mark[r["chat"]],
            mark[r["ask_recall"]],
        )
    console.print(table)
    n = len(rows)
    summary = {
        "statements": n,
        "facts_written": sum(r["facts"] for r in rows),
        "completion": sum(r["completion"] for r in rows) / n,
        "chat_at_write": sum(r["chat_at_write"] for r in rows) / n,
        "chat": sum(r["chat"] for r in rows) / n,
        "own_question": sum(r["ask_recall"] for r in rows) / n,
        "seconds_per_fact": seconds / sum(r["facts"] for r in rows),
    }
    console.print({"settings": args.set, **summary})
    OUT.mkdir(parents=True, exist_ok=True)
    summary["settings"] = args.set
    (OUT / "statements.json").write_text(
        json.dumps({"summary": summary, "rows": rows}, indent=2, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
