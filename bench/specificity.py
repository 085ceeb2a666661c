"""How fragile the unrelated answers are: what one write, a few writes and plain weight noise
do to the 40 unrelated chat answers that ``bench/sweep.py`` counts as unchanged.

Issue 4 asks that the first 10 greedy tokens of 40 unrelated answers stay the same after 40
writes. This measures where that figure starts from:

- each fact of ``--single`` written alone into the unedited model: how many answers change;
- the pool's first facts written one after another: the unchanged fraction after 1, 2, 5,
  10, 20 and 40 writes;
- Gaussian noise on the edit layers' down_proj weights, of a standard deviation ε times the
  weights' own: how much perturbation the answers take before they change at all;
- each answer's margin: the smallest gap, over its 10 tokens, between the log-probabilities
  of the greedy token and the runner-up (torch backend only), for the answers that changed
  and those that did not.

    python bench/specificity.py [--single 0 1 2 3 4] [--n 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GENERAL_QUESTIONS, chat_answers, load_facts, seen_only  # noqa: E402

from sleeptui.engine import Engine, load_backend  # noqa: E402
from sleeptui.models import resolve  # noqa: E402
from sleeptui.state import StateFolder  # noqa: E402

CHECKPOINTS = (1, 2, 5, 10, 20, 40, 80)
NOISE = (0.01, 0.02, 0.03, 0.05)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--single", type=int, nargs="*", default=list(range(8)))
    p.add_argument("--n", type=int, default=40, help="writes in the cumulative run")
    p.add_argument("--facts", type=Path)
    p.add_argument("--model")
    args = p.parse_args()
    pool = load_facts(args.facts)
    source = resolve(args.model)
    backend = load_backend(source)
    questions = [f.questions[0] for f in pool[200:220]] + list(GENERAL_QUESTIONS)
    with tempfile.TemporaryDirectory() as state:
        folder = StateFolder.open(state)
        engine = Engine(backend, source, folder)
        pristine = {layer: backend.weight(layer) for layer in engine.cfg.layers}
        before = chat_answers(engine, questions, tokens=10)
        margins = answer_margins(engine, questions, before)

        def report(**row) -> None:
            changed = [
                i for i, a in enumerate(chat_answers(engine, questions, 10)) if a != before[i]
            ]
            row["unchanged"] = round(1 - len(changed) / len(questions), 3)
            row["changed"] = len(changed)
            if margins:
                row["margin_changed"] = _median([margins[i] for i in changed])
                row["margin_kept"] = _median([m for i, m in enumerate(margins) if i not in changed])
            print(json.dumps(row), flush=True)

        def reset() -> None:
            for layer, w in pristine.items():
                backend.set_weight(layer, w)

        if margins:
            low = sum(m < 0.5 for m in margins)
            print(
                json.dumps(
                    {
                        "answers": len(margins),
                        "margin_median": _median(margins),
                        "margins_below_0.5": low,
                    }
                ),
                flush=True,
            )
        for eps in NOISE:
            for layer, w in pristine.items():
                noise = np.random.default_rng(layer).standard_normal(w.shape, dtype=np.float32)
                backend.set_weight(layer, w + noise * (eps * float(w.std())))
            report(noise=eps)
            reset()
        for i in args.single:
            engine.remember([seen_only(pool[i])])
            report(single=i, fact=f"{pool[i].subject} {pool[i].relation} {pool[i].object}")
            reset()
        folder.close()
    with tempfile.TemporaryDirectory() as state:
        folder = StateFolder.open(state)
        engine = Engine(backend, source, folder)
        for n, fact in enumerate(pool[: args.n], 1):
            engine.remember([seen_only(fact)])
            if n in CHECKPOINTS or n == args.n:
                report(writes=n)
        folder.close()


def answer_margins(engine: Engine, questions: list[str], answers: list[str]) -> list[float]:
    """Per answer, the smallest log-probability gap between the greedy token and the
    runner-up over its tokens; empty where the backend gives no logits (MLX)."""
    model = getattr(engine.backend, "model", None)
    if model is None:
        return []
    import torch

    b = engine.backend
    out = []
    for q, a in zip(questions, answers, strict=True):
        prompt = b.encode(engine.chat_prompt(q))
        ids = prompt + b.encode(engine.chat_prompt(q) + a)[len(prompt) :]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1 : len(ids) - 1], -1)
        top = logp.topk(2, -1).values
        out.append(round(float((top[:, 0] - top[:, 1]).min()), 3))
    return out


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


if __name__ == "__main__":
    main()
