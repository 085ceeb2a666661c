"""Consolidation: facts move from MEMIT into the LoRA adapter on the embedded model.

Writes N facts one at a time (constrained wake), then runs deep-sleep consolidations until
every fact has reached MEMIT scale 0.0 or stopped advancing (at most --cycles). Per cycle:
the stage histogram (how many facts at scale 1.0 / 0.5 / 0.1 / 0.0), completion and chat
recall, perplexity against the unedited model, seconds. Then a fresh process-like restart
(the folder reopened by a new engine) and the same measurements; then forgetting --forget
consolidated facts at once, and whether any of them is still answered beyond what the
unedited model says by itself. Writes bench/out/consolidate.json.

    python bench/consolidate.py [--n 20] [--cycles 6] [--forget 5] [--offset 100]
                                [--save-state DIR | --resume DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_facts, write_outputs  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sleeptui.backends import says  # noqa: E402

from sleeptui import consolidate  # noqa: E402
from sleeptui.engine import Engine  # noqa: E402

console = Console()


def measure(engine: Engine, label: str, ppl_base: float, seconds: float, extra: dict) -> dict:
    memories = consolidate.living(engine.ledger)
    recalls = engine.check(memories)
    n = max(1, len(recalls))
    ppl = engine.perplexity()
    row = {
        "step": label,
        **consolidate.stage_histogram(engine.ledger),
        "completion": sum(r.completion for r in recalls) / n,
        "chat": sum(r.chat for r in recalls) / n,
        "ppl": ppl,
        "ppl_drift": ppl / ppl_base - 1,
        "seconds": seconds,
        **extra,
    }
    console.print(
        f"{label:>10}  1.0:{row['1.0']:>3} 0.5:{row['0.5']:>3} 0.1:{row['0.1']:>3} "
        f"0.0:{row['0.0']:>3}  completion {row['completion']:.2f}  chat {row['chat']:.2f}  "
        f"ΔPPL {100 * row['ppl_drift']:+.2f}%  {seconds:.1f}s  {extra}"
    )
    return row


def answers(engine: Engine, prompt: str, question: str) -> tuple[str, str]:
    """The greedy completion of ``prompt`` and the chat answer to ``question``."""
    return engine.complete(prompt), "".join(engine.ask(question))


def cycles(engine: Engine, facts, n_cycles: int, ppl_base: float, rows: list[dict]) -> None:
    """Wake on ``facts``, then consolidation cycles until every fact is at 0.0 or stuck."""
    t = time.perf_counter()
    engine.remember(facts)
    rows.append(measure(engine, "wake", ppl_base, time.perf_counter() - t, {}))
    for cycle in range(1, n_cycles + 1):
        r = engine.consolidate("sleep", cycle=cycle)
        rows.append(
            measure(
                engine,
                f"cycle {cycle}",
                ppl_base,
                r.seconds,
                {
                    "due": r.due,
                    "advanced": r.advanced,
                    "rolled_back": r.rolled_back,
                    "cycle_ppl_change": r.ppl_tried / r.ppl_before - 1,
                    "loss": [round(r.loss_first, 3), round(r.loss_last, 3)],
                },
            )
        )
        if all(m.scale == 0 for m in consolidate.living(engine.ledger)):
            break


def forget(engine: Engine, n: int, unedited: dict, ppl_base: float, rows: list[dict]) -> None:
    """Forget ``n`` consolidated facts at once; is any still answered beyond what the
    unedited model says by itself?"""
    done = [m for m in engine.memories if m.stage == "consolidated"][:n]
    if not done:
        return
    t = time.perf_counter()
    reports = engine.forget_many([m.id for m in done])
    seconds = time.perf_counter() - t
    still, guessed = [], []
    for m in done:
        now = answers(engine, m.prompt, m.questions[0])
        said = any(says(a, m.object) for a in now)
        by_itself = any(says(a, m.object) for a in unedited[m.prompt])
        console.print(
            f"  forgot {m.subject} {m.relation} {m.object}: says it now {said}, the unedited "
            f"model says it {by_itself}; now {now[0][:60]!r} / {now[1][:80]!r}"
        )
        if said:
            (guessed if by_itself else still).append(m.id)
    extra = {
        "forgotten_still_answered": len(still),
        "answered_as_unedited": len(guessed),
        "verified": sum(r.verified for r in reports),
        "repaired": reports[0].repaired,
    }
    rows.append(measure(engine, f"forget {len(done)}", ppl_base, seconds, extra))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--cycles", type=int, default=6)
    ap.add_argument("--forget", type=int, default=5)
    ap.add_argument("--offset", type=int, default=100, help="first fact of the pool to use")
    ap.add_argument("--facts", type=Path, default=None)
    ap.add_argument("--lr", type=float, default=None, help="override the preset's LoRA lr")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--save-state", type=Path, help="copy the folder here after the cycles")
    ap.add_argument("--resume", type=Path, help="skip to the restart, from a --save-state folder")
    args = ap.parse_args()
    facts = load_facts(args.facts)[args.offset : args.offset + args.n]
    rows: list[dict] = []
    changes = {k: v for k, v in (("lr", args.lr), ("epochs", args.epochs)) if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        engine = Engine.open(None, state, backend="torch")
        engine.lora = replace(engine.lora, **changes)
        console.print(f"LoRA settings: {engine.lora}")
        ppl_base = engine.perplexity()
        # What the unedited model says by itself: a forgotten fact it guesses is no failure.
        unedited = {f.prompt: answers(engine, f.prompt, f.questions[0]) for f in facts}
        if not args.resume:
            cycles(engine, facts, args.cycles, ppl_base, rows)
        engine.close()
        if args.resume:
            shutil.rmtree(state)
            shutil.copytree(args.resume, state)
        elif args.save_state:
            shutil.rmtree(args.save_state, ignore_errors=True)
            shutil.copytree(state, args.save_state, ignore=shutil.ignore_patterns(".lock*"))
        engine = Engine.open(None, state, backend="torch")
        engine.lora = replace(engine.lora, **changes)
        rows.append(measure(engine, "restart", ppl_base, 0.0, {}))
        forget(engine, args.forget, unedited, ppl_base, rows)
        engine.close()
    table = Table(title=f"consolidation, {args.n} facts (MEMIT scale histogram)")
    cols = ["step", "1.0", "0.5", "0.1", "0.0", "completion", "chat", "ppl_drift", "seconds"]
    for c in cols:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(
            row["step"],
            *(str(row[k]) for k in ("1.0", "0.5", "0.1", "0.0")),
            f"{row['completion']:.2f}",
            f"{row['chat']:.2f}",
            f"{100 * row['ppl_drift']:+.2f}%",
            f"{row['seconds']:.1f}",
        )
    console.print(table)

    def plot(ax) -> None:
        steps = [row["step"] for row in rows]
        bottom = [0] * len(rows)
        for key in ("1.0", "0.5", "0.1", "0.0"):
            ax.bar(steps, [row[key] for row in rows], bottom=bottom, label=f"scale {key}")
            bottom = [b + row[key] for b, row in zip(bottom, rows, strict=True)]
        twin = ax.twinx()
        twin.plot(steps, [row["chat"] for row in rows], "k-o", label="chat recall")
        twin.set_ylim(0, 1.05)
        ax.set_ylabel("facts")
        twin.set_ylabel("chat recall")
        ax.legend(loc="lower left", fontsize=8)
        ax.tick_params(axis="x", rotation=30)

    doc = {"args": vars(args) | {"facts": str(args.facts)}, "rows": rows}
    write_outputs("consolidate", doc, plot)


if __name__ == "__main__":
    main()
