"""Ledger schema versions: a committed version-1 folder opens, upgrades and keeps every memory.

``tests/data/state-v1/`` was written by ``make_fixture.py`` beside it: three memories of the
embedded model in the version-1 layout (no ``last_sleep_at``/``ppl_base``, no backups).
"""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sleeptui.state_schema import ledger_schema_text
from sleeptui.state_schema.upgrades import STEPS, upgrade

from sleeptui.ledger import SCHEMA_VERSION, Ledger
from sleeptui.state import Shapes, StateFolder

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "state-v1"
SHAPES = Shapes(d_model=576, d_ff=1536, n_layers=30)  # the embedded model, SmolLM2-135M
V1 = json.loads((FIXTURE / "ledger.json").read_text(encoding="utf-8"))


@pytest.fixture
def v1_folder(tmp_path) -> Path:
    root = tmp_path / "state"
    shutil.copytree(FIXTURE, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".lock", ".holder")
    }


def _assert_intact(folder: StateFolder, ledger: Ledger) -> None:
    """Every memory of the fixture, field for field, with the factors of its file."""
    assert len(ledger.memories) == len(V1["memories"]) == 3
    for memory, entry in zip(ledger.memories, V1["memories"], strict=True):
        got = json.loads(json.dumps(asdict(memory)))
        assert got == entry
        factors = folder.read_delta(memory, SHAPES)
        stored = load_file(str(FIXTURE / entry["delta"]))
        assert factors and len(stored) == 2 * len(factors)
        for layer, (u, v) in factors.items():
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            np.testing.assert_array_equal(u, stored[name + ".u"])
            np.testing.assert_array_equal(v, stored[name + ".v"])


def test_the_fixture_is_a_version_1_folder():
    assert V1["schema_version"] == 1
    assert "last_sleep_at" not in V1 and "ppl_base" not in V1
    assert not (FIXTURE / "backups").exists()
    assert sorted(p.name for p in (FIXTURE / "deltas").iterdir()) == sorted(
        Path(m["delta"]).name for m in V1["memories"]
    )


def test_a_version_1_folder_opens_upgraded_with_every_memory_intact(v1_folder):
    before = _files(v1_folder)
    with StateFolder.open(v1_folder) as folder:
        ledger = folder.ledger(V1["fingerprint"], V1["model"])
        assert (ledger.last_sleep_at, ledger.ppl_base) == (None, None)
        _assert_intact(folder, ledger)
        assert folder.warnings == []
    # Opening does not rewrite the ledger: that waits for the next commit.
    assert _files(v1_folder) == before


def test_the_next_commit_writes_the_upgraded_ledger_as_the_current_version(v1_folder):
    with StateFolder.open(v1_folder) as folder:
        folder.commit(folder.ledger(V1["fingerprint"], V1["model"]), {})
    doc = json.loads((v1_folder / "ledger.json").read_text(encoding="utf-8"))
    assert doc["schema_version"] == SCHEMA_VERSION == 3
    assert (doc["last_sleep_at"], doc["ppl_base"], doc["adapter"]) == (None, None, None)
    assert doc["memories"] == V1["memories"]
    # The first commit backs up every delta the version-1 folder had.
    assert len(list((v1_folder / "backups" / "deltas").iterdir())) == 3
    with StateFolder.open(v1_folder, read_only=True) as folder:
        _assert_intact(folder, folder.ledger(V1["fingerprint"], V1["model"]))
        assert folder.warnings == []


def test_the_written_ledger_follows_the_published_json_schema(v1_folder):
    jsonschema = pytest.importorskip("jsonschema")
    with StateFolder.open(v1_folder) as folder:
        folder.commit(folder.ledger(V1["fingerprint"], V1["model"]), {})
    schema = json.loads(ledger_schema_text())
    jsonschema.validate(json.loads((v1_folder / "ledger.json").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(V1, schema)  # the schema describes the current version only


def test_read_only_open_of_a_version_1_folder_reads_it_and_writes_nothing(v1_folder):
    before = _files(v1_folder)
    with StateFolder.open(v1_folder, read_only=True) as folder:
        _assert_intact(folder, folder.ledger(V1["fingerprint"], V1["model"]))
    assert _files(v1_folder) == before


def test_a_version_1_ledger_that_already_has_the_new_fields_keeps_their_values():
    doc = {**V1, "last_sleep_at": "2025-01-02T03:04:05+00:00", "ppl_base": 17.25}
    ledger = Ledger.from_json(json.dumps(doc))
    assert (ledger.last_sleep_at, ledger.ppl_base) == ("2025-01-02T03:04:05+00:00", 17.25)


def test_every_older_version_has_one_upgrade_step_that_leaves_its_input_alone():
    assert sorted(STEPS) == list(range(1, SCHEMA_VERSION))
    copy = json.loads(json.dumps(V1))
    upgraded = upgrade(copy, to=SCHEMA_VERSION)
    assert copy == V1
    assert upgraded["schema_version"] == SCHEMA_VERSION


@pytest.mark.model
def test_upgraded_memories_are_recalled_by_the_model(fresh_model, v1_folder):
    from sleeptui.engine import Engine

    backend, source = fresh_model
    engine = Engine(backend, source, StateFolder.open(v1_folder, read_only=True))
    try:
        for memory in engine.memories:
            assert memory.object in engine.complete(memory.prompt), memory.text
    finally:
        engine.close()
