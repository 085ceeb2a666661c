"""Sleep convergence: the convergence paper's damage → recovery protocol on the embedded model.

Phase A: inject facts one at a time *without* constraints until at least 3 are degraded (at T
facts), and on up to 3·T facts; then sleep until converged (0 degraded two cycles running,
at most 10). Phase B: inject 25% more and sleep again. Then 20 idle cycles with no new facts,
to show there is no pruning death spiral. Last, forget 10 memories: their prompts' first
tokens are compared with the unedited model's, beside never-written controls, and the others'
recall before and after (common.forget_phase). Prints the
per-cycle table (the paper's Table 6 columns plus chat recall, perplexity and seconds), writes
bench/out/sleep.json and .png.

    python bench/sleep.py [--max-facts 60] [--idle 20] [--forget 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    OUT,
    drift_pct,
    first_tokens,
    forget_phase,
    load_facts,
    object_nll,
    paragraph_nll,
    write_outputs,
)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sleeptui.engine import Engine  # noqa: E402

console = Console()
PARTIAL = OUT / "sleep.partial.jsonl"  # one line per cycle as it ends: a killed run keeps its rows


def log_row(row: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with PARTIAL.open("a") as f:
        f.write(json.dumps(row) + "\n")


def inject(engine: Engine, facts, until_degraded: int | None, limit: int) -> tuple[int, float]:
    """Write facts unconstrained; stop once ``until_degraded`` are degraded (then go on to 3×)."""
    written, target = 0, limit
    for fact in facts[:limit]:
        engine.remember([fact])
        written += 1
        if until_degraded and target == limit:
            recalls = engine.check(engine.memories)
            if sum(not r.completion for r in recalls) >= until_degraded:
                target = min(limit, 3 * written)
                console.print(
                    f"  {until_degraded} degraded at T = {written} facts; injecting up to {target}"
                )
        if written >= target:
            break
    recalls = engine.check(engine.memories)
    return written, sum(r.completion for r in recalls) / len(recalls)


def sleep_phase(
    engine: Engine, name: str, rows: list, max_cycles: int, stop_converged: bool = True
) -> None:
    for cycle in range(1, max_cycles + 1):
        r = engine.sleep(cycle=cycle)
        rows.append(
            {
                "phase": name,
                **asdict(r),
                "ppl_change": r.ppl_change,
                "entries": len(engine.ledger.memories),
                "facts": len({(m.subject, m.relation) for m in engine.ledger.memories}),
            }
        )
        console.print(
            f"  {name} cycle {cycle}: recall {r.recall:.3f} degraded {r.degraded} exposed {r.exposed} "
            f"refreshed {r.refreshed} deferred {r.deferred} pruned {r.pruned} "
            f"ΔPPL {100 * r.ppl_change:+.2f}% {r.seconds:.1f}s"
            + (
                f" ROLLED BACK (tried ΔPPL {100 * (r.ppl_tried / r.ppl_before - 1):+.2f}%)"
                if r.rolled_back
                else ""
            )
        )
        log_row(rows[-1])
        prev = [x for x in rows if x["phase"] == name]
        if (
            stop_converged
            and len(prev) >= 2
            and prev[-1]["degraded"] == 0
            and prev[-2]["degraded"] == 0
        ):
            break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=Path)
    p.add_argument("--max-facts", type=int, default=60)
    p.add_argument("--idle", type=int, default=20)
    p.add_argument("--forget", type=int, default=10)
    p.add_argument("--model")
    args = p.parse_args()
    facts = load_facts(args.facts)
    rows: list[dict] = []
    PARTIAL.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state)
        engine.cfg = replace(engine.cfg, constrain_wake=False)  # the paper's wake: unconstrained
        ppl0 = paragraph_nll(engine)
        # What the unedited model says after each prompt: where a forgotten one must return.
        pool = facts[: args.max_facts + args.max_facts // 4 + 1]
        controls = [f.prompt for f in facts[200:220]]  # people no phase writes
        unedited = first_tokens(engine, [f.prompt for f in pool] + controls)
        unedited_nll = object_nll(engine, pool)
        n_a, start_a = inject(engine, facts, until_degraded=3, limit=args.max_facts)
        console.print(f"phase A: {n_a} facts, recall before sleep {start_a:.3f}")
        sleep_phase(engine, "A", rows, 10)
        n_b = max(1, round(0.25 * n_a))
        _, start_b = inject(engine, facts[n_a:], until_degraded=None, limit=n_b)
        console.print(f"phase B: +{n_b} facts, recall before sleep {start_b:.3f}")
        sleep_phase(engine, "B", rows, 10)
        sleep_phase(engine, "idle", rows, args.idle, stop_converged=False)
        ppl_end = paragraph_nll(engine)
        entries, distinct = len(engine.ledger.memories), len({m.id for m in engine.ledger.memories})
        forget = (
            forget_phase(engine, unedited, controls, args.forget, unedited_nll)
            if args.forget
            else None
        )
        if forget:
            console.print(f"forget: {forget}")
            log_row({"phase": "forget", **forget})
        engine.close()

    table = Table(title=f"sleep: phase A {n_a} facts, phase B +{n_b}, {args.idle} idle cycles")
    for col in (
        "phase",
        "cycle",
        "recall",
        "chat",
        "degraded",
        "refreshed",
        "exposed",
        "deferred",
        "pruned",
        "ΔPPL %",
        "s",
        "entries",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["phase"],
            str(r["cycle"]),
            f"{r['recall']:.3f}",
            f"{r['chat_recall']:.3f}",
            str(r["degraded"]),
            str(r["refreshed"]),
            str(r["exposed"]),
            str(r["deferred"]),
            str(r["pruned"]),
            f"{100 * r['ppl_change']:+.2f}",
            f"{r['seconds']:.1f}",
            str(r["entries"]),
        )
    console.print(table)
    idle = [r for r in rows if r["phase"] == "idle"]
    a_cycles = [r for r in rows if r["phase"] == "A"]
    drift, drift_se = drift_pct(ppl0, ppl_end)
    ppl_end_value = float(np.exp(ppl_end[:, 0].sum() / ppl_end[:, 1].sum()))
    summary = {
        "phase_a_facts": n_a,
        "phase_a_start_recall": start_a,
        "phase_a_cycles_to_098": next(
            (i + 1 for i, r in enumerate(a_cycles) if r["recall"] >= 0.98), None
        ),
        "phase_b_facts": n_b,
        "phase_b_start_recall": start_b,
        "idle_start_recall": idle[0]["recall"] if idle else None,
        "idle_end_recall": idle[-1]["recall"] if idle else None,
        "ledger_entries": entries,
        "distinct_ids": distinct,
        "facts_written": n_a + n_b,
        "ppl_drift_end_to_end_pct": drift,
        "ppl_drift_end_to_end_se": drift_se,
        # Wake's own drift left out: from the model as phase A's injection left it.
        "ppl_drift_over_sleep_pct": (
            100 * (ppl_end_value / rows[0]["ppl_before"] - 1) if rows else None
        ),
        "median_cycle_seconds": statistics.median(r["seconds"] for r in rows),
        "forget": forget,
    }
    console.print(summary)

    def plot(ax):
        ax.plot(
            range(1, len(rows) + 1),
            [r["recall"] for r in rows],
            marker="o",
            label="completion recall",
        )
        ax.plot(
            range(1, len(rows) + 1),
            [r["chat_recall"] for r in rows],
            marker="x",
            ls="--",
            label="chat recall",
        )
        ax.set_xlabel("sleep cycle (A, B, idle)")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.05)
        ax.legend()
        ax.set_title("sleeptui sleep convergence")

    paths = write_outputs("sleep", {"rows": rows, "summary": summary}, plot)
    console.print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
