"""Forget: write 40 facts (wake's defaults), forget 10 of them, and measure what is left.

The issue's protocol: after forgetting 10 of 40 memories, the 10 prompts complete as the
unedited model does and the other 30 keep their recall. The first 10 greedy tokens of each
forgotten prompt are compared with the unedited model's, beside the same comparison for 20
people never written (see common.forget_phase). Writes bench/out/forget.json.

    python bench/forget.py [--n 40] [--forget 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, first_tokens, forget_phase, load_facts, object_nll  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sleeptui.engine import Engine  # noqa: E402

console = Console()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=Path)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--forget", type=int, default=10)
    p.add_argument("--model")
    args = p.parse_args()
    facts = load_facts(args.facts)
    written, controls = facts[: args.n], [f.prompt for f in facts[200:220]]
    with tempfile.TemporaryDirectory() as state:
        engine = Engine.open(model=args.model, state=state)
        unedited = first_tokens(engine, [f.prompt for f in written] + controls)
        unedited_nll = object_nll(engine, written)
        console.print(f"writing {len(written)} facts one at a time")
        engine.remember(written)
        result = forget_phase(engine, unedited, controls, args.forget, unedited_nll)
        result["ledger_entries_after"] = len(engine.ledger.memories)
        engine.close()
    table = Table(title=f"forget {result['forgotten']} of {result['of']}")
    for key in ("metric", "value"):
        table.add_column(key)
    for key, value in result.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "forget.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
