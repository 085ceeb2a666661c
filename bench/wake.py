"""Wake capacity: inject facts one at a time, with and without null-space constraints.

Prints single-fact efficacy (each of --single facts written alone), then at N = 1, 5, 10,
20, 40, 80, 120: completion recall, chat recall on the questions
used in optimisation and on unseen paraphrases, perplexity change on held-out text, median
seconds per fact and bytes per memory on disk; then specificity (unrelated answers kept).
Writes bench/out/wake.json and bench/out/wake.png.

    python bench/wake.py [--n 120] [--modes constrained,unconstrained] [--facts FILE]
    python bench/wake.py --n 10 --modes constrained --backend torch,mlx

Several backends (comma-separated) run one after the other on the same facts, in one table,
and the closing line gives each one's median seconds per fact as a ratio to the first's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    GENERAL_QUESTIONS,
    chat_answers,
    chat_recall,
    completion_recall,
    drift_pct,
    load_facts,
    paragraph_nll,
    seen_only,
    unchanged,
    write_outputs,
)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sleeptui.engine import Engine  # noqa: E402

CHECKPOINTS = (1, 5, 10, 20, 40, 80, 120)
console = Console()


def run_single(args, backend: str, facts) -> dict:
    """Each fact written alone into the unedited model, checked, then forgotten."""
    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state, backend=backend)
        hits, chat, seconds = 0, 0, []
        for fact in facts:
            t = time.perf_counter()
            (memory,) = engine.remember([seen_only(fact)])
            seconds.append(time.perf_counter() - t)
            hits += completion_recall(engine, [fact]) == 1.0
            chat += chat_recall(engine, [fact]) == 1.0
            engine.forget(memory.id)
        engine.close()
    row = {
        "n": len(facts),
        "completion": hits / len(facts),
        "chat_seen": chat / len(facts),
        "median_s_per_fact": statistics.median(seconds),
    }
    console.print(f"  {backend} single (each fact alone): {row}")
    return {"rows": [row]}


def run_mode(args, backend: str, facts, constrained: bool, unrelated: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state, backend=backend)
        engine.cfg = replace(engine.cfg, constrain_wake=constrained)
        before = chat_answers(engine, unrelated, tokens=10)
        ppl0 = paragraph_nll(engine)
        rows, seconds = [], []
        for i, fact in enumerate(facts, start=1):
            t = time.perf_counter()
            engine.remember([seen_only(fact)])
            seconds.append(time.perf_counter() - t)
            if i in CHECKPOINTS or i == len(facts):
                written = facts[:i]
                deltas = list((Path(state) / "deltas").glob("*.safetensors"))
                ppl_pct, ppl_se = drift_pct(ppl0, paragraph_nll(engine))
                rows.append(
                    {
                        "n": i,
                        "completion": completion_recall(engine, written),
                        "chat_seen": chat_recall(engine, written),
                        "chat_unseen": chat_recall(engine, written, unseen=True),
                        "ppl_change_pct": ppl_pct,
                        "ppl_change_se": ppl_se,
                        "median_s_per_fact": statistics.median(seconds),
                        "bytes_per_memory": sum(p.stat().st_size for p in deltas) / len(deltas),
                        "specificity": unchanged(
                            before, chat_answers(engine, unrelated, tokens=10)
                        ),
                    }
                )
                mode = "constrained" if constrained else "unconstrained"
                console.print(f"  {backend} {mode} N={i}: {rows[-1]}")
        engine.close()
    return {"rows": rows, "ppl_base": float(np.exp(ppl0[:, 0].sum() / ppl0[:, 1].sum()))}


def run_backend(args, backend: str, pool, facts, unrelated, modes) -> dict:
    """The unedited baseline, then every mode, on one backend."""
    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state, backend=backend)
        baseline = {
            "completion": completion_recall(engine, pool),
            "chat_seen": chat_recall(engine, facts),
        }
        engine.close()
    console.print(
        f"{backend}, unedited model: completion recall {baseline['completion']:.3f} "
        f"over {len(pool)} facts"
    )
    results = {"baseline": baseline}
    for mode in modes:
        if mode == "single":
            results[mode] = run_single(args, backend, pool[: args.single])
        else:
            results[mode] = run_mode(args, backend, facts, mode == "constrained", unrelated)
    return results


def s_per_fact_ratios(by_backend: dict, modes: list[str]) -> dict:
    """Each backend's median seconds per fact over the first's, per mode (last row)."""
    first, *others = by_backend
    return {
        f"{other}/{first}": {
            mode: by_backend[other][mode]["rows"][-1]["median_s_per_fact"]
            / by_backend[first][mode]["rows"][-1]["median_s_per_fact"]
            for mode in modes
        }
        for other in others
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=Path)
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--modes", default="single,constrained,unconstrained")
    p.add_argument("--single", type=int, default=40, help="facts edited alone in single mode")
    p.add_argument("--model")
    p.add_argument(
        "--backend", default="auto", help="auto, torch or mlx; several (torch,mlx) are compared"
    )
    args = p.parse_args()
    pool = load_facts(args.facts)
    facts = pool[: args.n]
    # Unrelated questions: people from the pool who are not injected, and general knowledge.
    others = [f.questions[0] for f in pool[args.n :][:20]]
    unrelated = others + list(GENERAL_QUESTIONS[: 40 - len(others)])

    modes = args.modes.split(",")
    backends = args.backend.split(",")
    by_backend = {b: run_backend(args, b, pool, facts, unrelated, modes) for b in backends}
    results = {"n_unrelated": len(unrelated), "backends": by_backend}
    if len(backends) > 1:
        results["s_per_fact_ratio"] = s_per_fact_ratios(by_backend, modes)

    table = Table(title="wake: one fact at a time")
    for col in (
        "backend",
        "mode",
        "N",
        "completion",
        "chat (seen q)",
        "chat (unseen)",
        "ΔPPL %",
        "s/fact (median)",
        "bytes/memory",
        "unchanged",
    ):
        table.add_column(col, justify="right")

    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "–"

    for backend, result in by_backend.items():
        for mode in modes:
            for r in result[mode]["rows"]:
                table.add_row(
                    backend,
                    mode,
                    str(r["n"]),
                    cell(r, "completion", ".2f"),
                    cell(r, "chat_seen", ".2f"),
                    cell(r, "chat_unseen", ".2f"),
                    f"{cell(r, 'ppl_change_pct', '+.2f')}±{cell(r, 'ppl_change_se', '.2f')}",
                    cell(r, "median_s_per_fact", ".2f"),
                    cell(r, "bytes_per_memory", ".0f"),
                    cell(r, "specificity", ".2f"),
                )
    console.print(table)
    console.print("ΔPPL ± its standard error over the reference text's paragraphs (bootstrap)")
    console.print(
        f"unchanged: fraction of {len(unrelated)} unrelated chat answers (first 10 tokens) "
        "identical to the unedited model's"
    )
    for pair, by_mode in results.get("s_per_fact_ratio", {}).items():
        ratios = ", ".join(f"{mode} {ratio:.2f}×" for mode, ratio in by_mode.items())
        console.print(f"median seconds per fact, {pair} (one run, this machine): {ratios}")

    def plot(ax):
        for backend, result in by_backend.items():
            label = f"{backend} " if len(by_backend) > 1 else ""
            for mode in [m for m in modes if m != "single"]:
                rows = result[mode]["rows"]
                ax.plot(
                    [r["n"] for r in rows],
                    [r["completion"] for r in rows],
                    marker="o",
                    label=f"{label}{mode}: completion",
                )
                ax.plot(
                    [r["n"] for r in rows],
                    [r["chat_seen"] for r in rows],
                    marker="x",
                    ls="--",
                    label=f"{label}{mode}: chat",
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
