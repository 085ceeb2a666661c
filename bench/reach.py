"""How far an edit reaches into real text, per unit it achieves, for each shrinkage of Ĉ.

A rank-one MEMIT update at a layer is ΔW = r vᵀ with v ∝ Ĉ⁻¹k for the fact's key k (eq. 3
for one fact). On a token whose down_proj input is x it adds r·(vᵀx); on the key it adds
r·(vᵀk). The reach of the edit into a text is E[(vᵀx)²] / (vᵀk)², the mean squared
spill-over per unit achieved, measured here over the tokens of ``--text`` for the bench
facts' keys (median over facts), for Ĉ shrunk by each ``--shrink`` towards its mean variance
(``memit.inverse_covariance``). "own" is the same quantity over Ĉ itself: what the solve
believes it costs. A text the project never fits anything to (the default is this machine's
GPL-3 text) chooses the shrinkage; the perplexity reference stays held out.

    python bench/reach.py [--text FILE] [--facts FILE] [--n 40] [--shrink 0,0.3,0.5,0.7,0.9]
                           [--cov-tokens T]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_facts, seen_only  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sleeptui import memit  # noqa: E402
from sleeptui.engine import Engine  # noqa: E402

GPL = Path("/usr/share/common-licenses/GPL-3")


def reach(c_inv: np.ndarray, keys: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Per key column (d_in × n): E[(vᵀx)²] / (vᵀk)² for x with second moment ``cov``."""
    v = c_inv @ keys
    achieved = np.einsum("dn,dn->n", keys, v)
    return np.einsum("dn,de,en->n", v, cov, v) / achieved**2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=GPL, help="paragraphs separated by blank lines")
    p.add_argument("--facts", type=Path)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--shrink", default="0,0.3,0.5,0.7,0.9")
    p.add_argument("--model")
    p.add_argument("--cov-tokens", type=int, help="sample Ĉ from this many tokens (cached)")
    args = p.parse_args()
    if not args.text.is_file():
        p.error(f"no text at {args.text}: pass --text FILE (paragraphs separated by blank lines)")
    shrinks = [float(s) for s in args.shrink.split(",")]
    paragraphs = [t for t in args.text.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    facts = [seen_only(f) for f in load_facts(args.facts)[: args.n]]

    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state)
        if args.cov_tokens:
            engine.cfg = replace(engine.cfg, cov_tokens=args.cov_tokens)
        backend, cfg = engine.backend, engine.cfg
        cov = engine.covariance()
        rows = [backend.encode(t) for t in paragraphs]
        text_keys, _ = backend.probe(rows, [list(range(len(r))) for r in rows], cfg.layers, None)
        fact_keys = engine.editor().keys(facts)
        engine.close()

    n_tokens = sum(len(r) for r in rows)
    table = Table(
        title=f"reach × 1e4 into {args.text.name} ({n_tokens} tokens), {len(facts)} facts"
    )
    table.add_column("layer")
    table.add_column("own, no shrink")
    for s in shrinks:
        table.add_column(f"shrink {s:g}")
    for layer in cfg.layers:
        x = text_keys[layer].astype(np.float64)
        text_cov = x.T @ x / len(x)
        c = memit.to_numpy(cov[layer]).astype(np.float64)
        k = np.concatenate([fk[layer] for fk in fact_keys]).T  # (d_in × columns)
        own = np.median(reach(memit.inverse_covariance(c), k, c))
        cells = [
            np.median(reach(memit.inverse_covariance(c, shrink=s), k, text_cov)) for s in shrinks
        ]
        table.add_row(str(layer), f"{1e4 * own:.2f}", *(f"{1e4 * v:.2f}" for v in cells))
    Console().print(table)


if __name__ == "__main__":
    main()
