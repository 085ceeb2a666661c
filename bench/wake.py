"""Wake capacity: inject facts one at a time, with and without null-space constraints.

Prints, at N = 1, 5, 10, 20, 40, 80, 120: completion recall, chat recall on the questions
used in optimisation and on unseen paraphrases, perplexity change on held-out text, median
seconds per fact and bytes per memory on disk; then specificity (unrelated answers kept).
Writes bench/out/wake.json and bench/out/wake.png.

    python bench/wake.py [--n 120] [--modes constrained,unconstrained] [--facts FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    GENERAL_QUESTIONS,
    chat_answers,
    chat_recall,
    completion_recall,
    load_facts,
    seen_only,
    write_outputs,
)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sleeptui.engine import Engine  # noqa: E402

CHECKPOINTS = (1, 5, 10, 20, 40, 80, 120)
console = Console()


def run_mode(args, facts, constrained: bool, unrelated: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state, backend=args.backend)
        engine.cfg = replace(engine.cfg, constrain_wake=constrained)
        before = chat_answers(engine, unrelated, tokens=10)
        ppl0 = engine.perplexity()
        rows, seconds = [], []
        for i, fact in enumerate(facts, start=1):
            t = time.perf_counter()
            engine.remember([seen_only(fact)])
            seconds.append(time.perf_counter() - t)
            if i in CHECKPOINTS or i == len(facts):
                written = facts[:i]
                deltas = list((Path(state) / "deltas").glob("*.safetensors"))
                rows.append(
                    {
                        "n": i,
                        "completion": completion_recall(engine, written),
                        "chat_seen": chat_recall(engine, written),
                        "chat_unseen": chat_recall(engine, written, unseen=True),
                        "ppl_change_pct": 100 * (engine.perplexity() / ppl0 - 1),
                        "median_s_per_fact": statistics.median(seconds),
                        "bytes_per_memory": sum(p.stat().st_size for p in deltas) / len(deltas),
                    }
                )
                console.print(
                    f"  {'constrained' if constrained else 'unconstrained'} N={i}: {rows[-1]}"
                )
        after = chat_answers(engine, unrelated, tokens=10)
        specificity = sum(a == b for a, b in zip(before, after, strict=True)) / len(unrelated)
        engine.close()
    return {"rows": rows, "specificity": specificity, "ppl_base": ppl0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=Path)
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--modes", default="constrained,unconstrained")
    p.add_argument("--model")
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    pool = load_facts(args.facts)
    facts = pool[: args.n]
    # Unrelated questions: people from the pool who are not injected, and general knowledge.
    others = [f.questions[0] for f in pool[args.n :][:20]]
    unrelated = others + list(GENERAL_QUESTIONS[: 40 - len(others)])

    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state, backend=args.backend)
        baseline = {
            "completion": completion_recall(engine, pool),
            "chat_seen": chat_recall(engine, facts),
        }
        engine.close()
    console.print(
        f"unedited model: completion recall {baseline['completion']:.3f} over {len(pool)} facts"
    )

    results = {"baseline": baseline, "n_unrelated": len(unrelated)}
    for mode in args.modes.split(","):
        results[mode] = run_mode(args, facts, mode == "constrained", unrelated)

    table = Table(title="wake: one fact at a time")
    for col in (
        "mode",
        "N",
        "completion",
        "chat (seen q)",
        "chat (unseen)",
        "ΔPPL %",
        "s/fact (median)",
        "bytes/memory",
    ):
        table.add_column(col, justify="right")
    for mode in args.modes.split(","):
        for r in results[mode]["rows"]:
            table.add_row(
                mode,
                str(r["n"]),
                f"{r['completion']:.2f}",
                f"{r['chat_seen']:.2f}",
                f"{r['chat_unseen']:.2f}",
                f"{r['ppl_change_pct']:+.2f}",
                f"{r['median_s_per_fact']:.2f}",
                f"{r['bytes_per_memory']:.0f}",
            )
    console.print(table)
    for mode in args.modes.split(","):
        console.print(
            f"specificity ({mode}): {results[mode]['specificity']:.3f} of {len(unrelated)} unrelated answers unchanged"
        )

    def plot(ax):
        for mode in args.modes.split(","):
            rows = results[mode]["rows"]
            ax.plot(
                [r["n"] for r in rows],
                [r["completion"] for r in rows],
                marker="o",
                label=f"{mode}: completion",
            )
            ax.plot(
                [r["n"] for r in rows],
                [r["chat_seen"] for r in rows],
                marker="x",
                ls="--",
                label=f"{mode}: chat",
            )
        ax.set_xscale("log")
        ax.set_xlabel("facts injected (N)")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.05)
        ax.legend()
        ax.set_title("sleeptui wake capacity")

    paths = write_outputs("wake", results, plot)
    console.print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
