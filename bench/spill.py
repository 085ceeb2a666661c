"""How much each memory of a state folder spills onto text, in write order.

A memory's delta at a layer, ΔW = u @ v, adds ΔW x to every token whose down_proj input is x.
Over text with second moment Ĉ (eq. 2, the model's own samples) its mean squared spill-over
is tr(ΔW Ĉ ΔWᵀ) = tr((uᵀu)(v Ĉ vᵀ)). This prints that energy per memory, summed over the
edit layers and averaged over each ten memories in ledger (write) order, and how far the
memories add up coherently: tr(D Ĉ Dᵀ) for D = Σ ΔW against the sum of the memories' own
(1.0 = the memories' spill-overs are uncorrelated; above it, they push the same way).

With ``--chat``, it also measures where the memories act in chat turns they were never
about: at every token of the unrelated questions of ``bench/sweep.py`` (the pool's people
200–219 and the general questions), and of the first 10 tokens of the model's answer, the
relative change of each edit layer's MLP output, ‖D x‖ / ‖W_base x‖ (D = Σ scale · u @ v),
by part of the turn, against the same at the written subjects' last token in their own
chat questions.

    python bench/spill.py [--state-dir DIR] [--model M] [--chat]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GENERAL_QUESTIONS, chat_answers, load_facts  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sleeptui.engine import Engine  # noqa: E402
from sleeptui.renderings import subject_positions  # noqa: E402

GROUP = 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir")
    p.add_argument("--model")
    p.add_argument("--chat", action="store_true", help="also the relative change in chat turns")
    args = p.parse_args()
    engine = Engine.open(args.model, args.state_dir, read_only=True)
    try:
        cov = {layer: np.asarray(c, dtype=np.float64) for layer, c in engine.covariance().items()}
        memories = [m for m in engine.memories if m.scale > 0 and engine.factors_of(m)]
        if not memories:
            sys.exit("no memory with a delta in this folder")
        own = np.zeros(len(memories))
        table = Table("layer", "Σ own", "of the sum", "ratio")
        total_own = total_sum = 0.0
        for layer, c in cov.items():
            d_out, d_in = np.shape(engine.backend.weight(layer))
            us, vs = [], []
            for m in memories:
                # A memory written at other edit layers adds nothing here.
                u, v = engine.factors_of(m).get(layer, (np.zeros((d_out, 1)), np.zeros((1, d_in))))
                us.append(np.asarray(u, np.float64) * m.scale)
                vs.append(np.asarray(v, np.float64))
            u_all, v_all = np.concatenate(us, axis=1), np.concatenate(vs)
            gram_u, gram_v = u_all.T @ u_all, v_all @ c @ v_all.T  # rank r per memory
            ranks = np.cumsum([0] + [u.shape[1] for u in us])
            per = np.array(
                [
                    np.sum(gram_u[a:b, a:b] * gram_v[a:b, a:b])
                    for a, b in zip(ranks[:-1], ranks[1:], strict=True)
                ]
            )
            together = float(np.sum(gram_u * gram_v))
            own += per
            total_own += per.sum()
            total_sum += together
            table.add_row(
                str(layer), f"{per.sum():.4g}", f"{together:.4g}", f"{together / per.sum():.3f}"
            )
        table.add_row("all", f"{total_own:.4g}", f"{total_sum:.4g}", f"{total_sum / total_own:.3f}")
        console = Console()
        console.print(table)
        order = Table("memories (write order)", "mean spill-over per memory")
        for start in range(0, len(memories), GROUP):
            chunk = own[start : start + GROUP]
            order.add_row(f"{start + 1}–{start + len(chunk)}", f"{chunk.mean():.3g}")
        console.print(order)
        if args.chat:
            console.print(chat_table(engine, memories))
    finally:
        engine.close()


PARTS = ("system and user header", "question", "assistant header", "answer (10 tokens)")


def chat_table(engine: Engine, memories: list) -> Table:
    """Mean ‖D x‖ / ‖W_base x‖ per edit layer, by part of unrelated chat turns, and at the
    written subjects' last token."""
    b = engine.backend
    pool = load_facts()
    questions = [f.questions[0] for f in pool[200:220]] + list(GENERAL_QUESTIONS)
    answers = chat_answers(engine, questions, 10)
    rows, positions, parts = [], [], []
    for question, answer in zip(questions, answers, strict=True):
        text = engine.chat_prompt(question)
        at = text.index(question)
        ids = b.encode(text)
        head, tail = len(b.encode(text[:at])), len(b.encode(text[at + len(question) :]))
        full = ids + b.encode(answer)[:10]
        sizes = (head, len(ids) - head - tail, tail, len(full) - len(ids))
        rows.append(full)
        positions.append(list(range(len(full))))
        parts += [part for part, n in zip(PARTS, sizes, strict=True) for _ in range(n)]
    own_rows, own_at = [], []
    for m in memories:
        text = engine.chat_prompt(m.questions[0]) if m.questions else m.prompt
        at = subject_positions(b, text, m.subject)
        if at:
            own_rows.append(b.encode(text))
            own_at.append(at[-1:])
    layers = sorted(engine.cfg.layers)
    keys, _ = b.probe(rows, positions, layers, None)
    own_keys, _ = b.probe(own_rows, own_at, layers, None)
    table = Table("tokens", *(f"layer {layer}" for layer in layers))
    change: dict[str, list[str]] = {part: [] for part in (*PARTS, "written subjects")}
    parts_arr = np.array(parts)
    for layer in layers:
        w = np.asarray(b.weight(layer), np.float64)
        d = np.zeros_like(w)
        for m in memories:
            f = engine.factors_of(m).get(layer)
            if f is not None:
                d += m.scale * np.asarray(f[0], np.float64) @ np.asarray(f[1], np.float64)
        base = w - d
        for part, x in [(p, keys[layer][parts_arr == p]) for p in PARTS] + [
            ("written subjects", own_keys[layer])
        ]:
            x = np.asarray(x, np.float64)
            ratio = np.linalg.norm(x @ d.T, axis=1) / np.linalg.norm(x @ base.T, axis=1)
            change[part].append(f"{ratio.mean():.3f}")
    for part, cells in change.items():
        table.add_row(part, *cells)
    table.title = "relative change of the MLP output, ‖D x‖ / ‖W_base x‖"
    return table


if __name__ == "__main__":
    main()
