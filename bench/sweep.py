"""Hyperparameter sweep: write N facts one at a time under each setting, on one loaded model.

Each setting is a JSON object of EditConfig overrides; the weights go back to the unedited
model between settings. Prints one JSON line per setting: completion and chat recall of the N
facts, unseen-paraphrase recall, perplexity change (with its standard error over the
reference text's paragraphs), the fraction of 40 unrelated chat answers
(first 10 tokens) left unchanged (also for the pool's 20 unwritten people and the 20 general
questions apart), how much less likely the unedited model's answers to them became (mean NLL
change per token of question and answer, in nats: a finer measure than "unchanged", which a
near-tie flips), and the median seconds per fact.

    python bench/sweep.py 20 '{}' '{"lam": 1000}' '{"clamp_norm": 0.75, "lam": 1e4}'
"""

from __future__ import annotations

import argparse
import json
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
    drift_pct,
    edited_layers,
    load_facts,
    paragraph_nll,
    seen_only,
    text_paragraphs,
    unchanged,
)

from sleeptui.engine import Engine, load_backend  # noqa: E402
from sleeptui.models import resolve  # noqa: E402
from sleeptui.state import StateFolder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int)
    p.add_argument("settings", nargs="+", help="JSON objects of EditConfig overrides")
    p.add_argument("--facts", type=Path)
    p.add_argument("--model")
    p.add_argument("--text", type=Path, help="also report the drift on this text's paragraphs")
    args = p.parse_args()
    pool = load_facts(args.facts)
    facts = pool[: args.n]
    if args.n > 200:
        p.error("N is at most 200: facts 200–219 of the pool are the unrelated people")
    if len(pool) < 220:
        p.error(f"the facts file has {len(pool)} facts; entries 200–219 are the unrelated people")
    source = resolve(args.model)
    backend = load_backend(source)
    unrelated = [f.questions[0] for f in pool[200:220]] + list(GENERAL_QUESTIONS)
    settings = [json.loads(text) for text in args.settings]
    other = text_paragraphs(args.text) if args.text else None
    pristine = before = ppl0 = other0 = answers = nll0 = None
    for changes in settings:
        with tempfile.TemporaryDirectory() as state:
            folder = StateFolder.open(state)
            engine = Engine(backend, source, folder)
            if pristine is None:
                layers = edited_layers(engine.cfg.layers, settings)
                pristine = {layer: backend.weight(layer) for layer in layers}
                before = chat_answers(engine, unrelated, tokens=10)
                ppl0 = paragraph_nll(engine)
                other0 = paragraph_nll(engine, other) if other else None
                answers = [
                    engine.chat_prompt(q) + a for q, a in zip(unrelated, before, strict=True)
                ]
                nll0 = [backend.nll(answers[:20]), backend.nll(answers[20:])]
            engine.cfg = replace(engine.cfg, **changes)
            seconds = []
            for fact in facts:
                t = time.perf_counter()
                engine.remember([seen_only(fact)])
                seconds.append(time.perf_counter() - t)
            after = chat_answers(engine, unrelated, tokens=10)
            ppl_pct, ppl_se = drift_pct(ppl0, paragraph_nll(engine))
            row = {
                "settings": changes,
                "n": len(facts),
                "completion": completion_recall(engine, facts),
                "chat_seen": chat_recall(engine, facts),
                "chat_unseen": round(chat_recall(engine, facts, unseen=True), 3),
                "ppl_change_pct": round(ppl_pct, 2),
                "ppl_change_se": round(ppl_se, 2),
                "unchanged": unchanged(before, after),
                "unchanged_people": unchanged(before[:20], after[:20]),
                "unchanged_general": unchanged(before[20:], after[20:]),
                "answer_nll_people": nll_change(backend.nll(answers[:20]), nll0[0]),
                "answer_nll_general": nll_change(backend.nll(answers[20:]), nll0[1]),
                "median_s_per_fact": round(statistics.median(seconds), 2),
            }
            if other:
                pct, se = drift_pct(other0, paragraph_nll(engine, other))
                row["text_ppl_change_pct"], row["text_ppl_change_se"] = round(pct, 2), round(se, 2)
            print(json.dumps(row), flush=True)
            folder.close()
        for layer, w in pristine.items():
            backend.set_weight(layer, w)


def nll_change(after: tuple[float, int], before: tuple[float, int]) -> float:
    """Mean NLL change per token between two ``Backend.nll`` totals of the same texts."""
    return round((after[0] - before[0]) / before[1], 4)


if __name__ == "__main__":
    main()
