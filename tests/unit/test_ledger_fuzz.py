"""Fuzzing the ledger loader and the state folder's readers: a Ledger or a StateError, never a crash.

Random text, random JSON, and well-formed ledgers with one part made wrong all go through
``Ledger.from_json``; random and mutated bytes go through ``StateFolder.ledger`` and
``read_delta``. Whatever is accepted must keep every delta path inside ``deltas/``.
"""

import json
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from sleeptui.deltas import Shapes, encode
from sleeptui.errors import StateError
from sleeptui.facts import Fact
from sleeptui.ledger import Ledger, Memory
from sleeptui.state import StateFolder

FP = "a" * 64
SHAPES = Shapes(d_model=8, d_ff=12, n_layers=4)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _valid_doc() -> dict:
    memories = [
        Memory.new(Fact("Ada Lind", "lives in", "Oslo", questions=("Where does Ada Lind live?",))),
        Memory.new(Fact("Bo Strand", "plays the", "cello")).with_event("audited", ok=True),
    ]
    return json.loads(
        Ledger(FP, "tiny", tuple(memories), last_sleep_at=None, ppl_base=12.5).to_json()
    )


def _load(text) -> Ledger | None:
    """The loader's contract: a Ledger, or a StateError; anything else fails the test."""
    try:
        ledger = Ledger.from_json(text)
    except StateError:
        return None
    for memory in ledger.memories:
        path = PurePosixPath(memory.delta)
        assert path.parts[0] == "deltas" and len(path.parts) == 2 and path.suffix == ".safetensors"
        assert ".." not in path.parts and "/" not in memory.id
    assert Ledger.from_json(ledger.to_json()) == ledger  # what loads, round-trips
    return ledger


@FUZZ
@given(st.text() | st.binary())
def test_random_text_is_a_ledger_or_a_state_error(text):
    _load(text)


@FUZZ
@given(json_values)
def test_random_json_is_a_ledger_or_a_state_error(value):
    _load(json.dumps(value))


def _paths(doc) -> list[tuple]:
    """Every path to a value inside ``doc`` (keys and list indexes)."""
    found = [()]
    if isinstance(doc, dict):
        items = doc.items()
    elif isinstance(doc, list):
        items = enumerate(doc)
    else:
        return found
    for key, value in items:
        found += [(key, *rest) for rest in _paths(value)]
    return found


@st.composite
def wrong_ledgers(draw) -> str:
    """A valid ledger with one to three values replaced, deleted, or given an extra key."""
    doc = _valid_doc()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)[1:]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(
                json_values
                | st.sampled_from(
                    [
                        "../x",
                        "/etc/passwd",
                        "deltas/../../x.safetensors",
                        "deltas/a/b.safetensors",
                        "deltas/.safetensors",
                        "deltas/a.safetensors\0",
                        "a" * 65,
                        1e308,
                        -1,
                        2,
                        True,
                        float("nan"),
                    ]
                )
            )
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "delete":
            parent.pop(path[-1])
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(doc, allow_nan=True)


@FUZZ
@given(wrong_ledgers())
def test_structurally_valid_but_wrong_ledgers_are_a_ledger_or_a_state_error(text):
    _load(text)


@FUZZ
@given(st.text(max_size=80))
def test_any_accepted_delta_path_stays_inside_deltas(path):
    doc = _valid_doc()
    doc["memories"][0]["delta"] = path
    ledger = _load(json.dumps(doc))
    if ledger is not None:
        root = Path("/state")
        resolved = (root / ledger.memories[0].delta).resolve()
        assert resolved.parent == root / "deltas"


def test_a_valid_ledger_loads():
    assert _load(json.dumps(_valid_doc())) is not None


def _folder_with_one_memory(root: Path) -> Memory:
    with StateFolder.open(root) as folder:
        memory = Memory.new(Fact("Ada Lind", "lives in", "Oslo"))
        rng = np.random.default_rng(0)
        factors = {1: (rng.normal(size=(8, 1)), rng.normal(size=(1, 12)))}
        folder.commit(folder.ledger(FP, "tiny").upsert(memory), {memory.id: factors})
    return memory


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=400), keep_backups=st.booleans())
def test_any_bytes_as_ledger_json_read_or_raise_a_state_error(data, keep_backups):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "s"
        memory = _folder_with_one_memory(root)
        if not keep_backups:
            shutil.rmtree(root / "backups")
        (root / "ledger.json").write_bytes(data)
        with StateFolder.open(root) as folder:
            try:
                ledger = folder.ledger(FP, "tiny")
            except StateError:
                assert not keep_backups
                return
            assert keep_backups and [m.id for m in ledger.memories] == [memory.id]
            assert folder.warnings


@settings(max_examples=100, deadline=None)
@given(
    cut=st.integers(0, 2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=4),
    keep_backups=st.booleans(),
)
def test_any_damaged_delta_reads_or_raises_a_state_error(cut, flips, keep_backups):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "s"
        memory = _folder_with_one_memory(root)
        if not keep_backups:
            shutil.rmtree(root / "backups")
        path = root / memory.delta
        data = bytearray(path.read_bytes()[:cut])
        for at, bits in flips:
            if at < len(data):
                data[at] ^= bits
        path.write_bytes(bytes(data))
        with StateFolder.open(root) as folder:
            ledger = folder.ledger(FP, "tiny")
            try:
                factors = folder.read_delta(ledger.get(memory.id), SHAPES)
            except StateError:
                assert not keep_backups
                return
            assert set(factors) <= set(range(SHAPES.n_layers))


@FUZZ
@given(
    st.dictionaries(
        st.text(max_size=40), st.sampled_from([(8, 1), (1, 12), (8, 2), (3,), (0, 12)]), max_size=3
    )
)
def test_a_delta_with_any_tensors_reads_or_raises_a_state_error(tensors):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "s"
        memory = _folder_with_one_memory(root)
        shutil.rmtree(root / "backups")
        arrays = {k: np.ones(shape, np.float32) for k, shape in tensors.items()}
        meta = {"format": "sleeptui-delta/1", "memory_id": memory.id, "fingerprint": FP}
        (root / memory.delta).write_bytes(
            save(arrays, metadata=meta) if arrays else encode({}, memory.id, FP, "t")
        )
        with StateFolder.open(root) as folder:
            try:
                factors = folder.read_delta(folder.ledger(FP, "tiny").get(memory.id), SHAPES)
            except StateError:
                return
            for u, v in factors.values():
                assert (
                    u.shape[0] == SHAPES.d_model
                    and v.shape[1] == SHAPES.d_ff
                    and u.shape[1] == v.shape[0]
                )
