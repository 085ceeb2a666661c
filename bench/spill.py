"""How much each memory of a state folder spills onto text, in write order.

A memory's delta at a layer, ΔW = u @ v, adds ΔW x to every token whose down_proj input is x.
Over text with second moment Ĉ (eq. 2, the model's own samples) its mean squared spill-over
is tr(ΔW Ĉ ΔWᵀ) = tr((uᵀu)(v Ĉ vᵀ)). This prints that energy per memory, summed over the
edit layers and averaged over each ten memories in ledger (write) order, and how far the
memories add up coherently: tr(D Ĉ Dᵀ) for D = Σ ΔW against the sum of the memories' own
(1.0 = the memories' spill-overs are uncorrelated; above it, they push the same way).

    python bench/spill.py [--state-dir DIR] [--model M]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sleeptui.engine import Engine  # noqa: E402

GROUP = 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir")
    p.add_argument("--model")
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
    finally:
        engine.close()


if __name__ == "__main__":
    main()
