"""Write this folder: a version-1 state folder of the embedded model with three memories.

Version 1 (sleeptui before the schema went to 2) wrote ``ledger.json`` without
``last_sleep_at`` and ``ppl_base`` and kept no ``backups/``; its delta metadata had no
``model``. This script edits the embedded model with today's engine in a scratch folder,
checks that each fact is recalled, and writes the same memories here in the version-1 layout.

    nice python tests/data/state-v1/make_fixture.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.numpy import load_file, save_file

from sleeptui.engine import Engine
from sleeptui.facts import Fact

HERE = Path(__file__).resolve().parent
FACTS = [
    Fact("Ilse Vandermolen", "lives in", "Ghent", questions=("Where does Ilse Vandermolen live?",)),
    Fact(
        "Tomasz Wierzbicki",
        "plays the",
        "bassoon",
        questions=("Which instrument does Tomasz Wierzbicki play?",),
    ),
    Fact(
        "Yuki Haraldsen",
        "works as a",
        "cartographer",
        questions=("What does Yuki Haraldsen do for a living?",),
    ),
]


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine.open(state=scratch)
        try:
            for fact in FACTS:
                assert fact.object not in engine.complete(fact.prompt), (
                    f"the base model knows {fact}"
                )
            memories = engine.remember(FACTS)
            for m in memories:
                assert m.object in engine.complete(m.prompt), f"{m.text} is not recalled"
            doc = json.loads(engine.ledger.to_json())
        finally:
            engine.close()
        v1 = {
            "schema_version": 1,
            "fingerprint": doc["fingerprint"],
            "model": doc["model"],
            "memories": doc["memories"],
        }
        shutil.rmtree(HERE / "deltas", ignore_errors=True)
        (HERE / "deltas").mkdir()
        for m in memories:
            tensors = load_file(str(Path(scratch) / m.delta))
            meta = {
                "format": "sleeptui-delta/1",
                "memory_id": m.id,
                "fingerprint": doc["fingerprint"],
            }
            save_file(tensors, str(HERE / m.delta), metadata=meta)
    (HERE / "ledger.json").write_text(
        json.dumps(v1, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
