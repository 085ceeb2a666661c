"""The state folder: commits, recovery, bad input and the one-writer lock."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from sleeptui.errors import FingerprintMismatch, StateError, StateLocked
from sleeptui.facts import Fact
from sleeptui.ledger import SCHEMA_VERSION, Ledger, Memory
from sleeptui.state import Shapes, StateFolder

SHAPES = Shapes(d_model=8, d_ff=12, n_layers=4)
FP = "f" * 64


def _factors(seed=0):
    rng = np.random.default_rng(seed)
    return {1: (rng.normal(size=(8, 1)).astype(np.float32), rng.normal(size=(1, 12)).astype(np.float32))}


def _commit_one(folder, fact=None, seed=0):
    fact = fact or Fact("Ada Lind", "lives in", "Oslo")
    ledger = folder.ledger(FP, "tiny")
    memory = Memory.new(fact)
    ledger = ledger.upsert(memory)
    folder.commit(ledger, {memory.id: _factors(seed)})
    return memory


def test_commit_round_trips_ledger_and_factors(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
        ledger = folder.ledger(FP, "tiny")
        assert [m.id for m in ledger.memories] == [memory.id]
        got = folder.read_delta(ledger.memories[0], SHAPES)
        np.testing.assert_array_equal(got[1][0], _factors()[1][0])
        assert not (tmp_path / "s" / ".txn").exists()


def test_folder_and_files_are_private(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
    root = tmp_path / "s"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in (root / "ledger.json", root / memory.delta):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_uncommitted_journal_is_discarded_on_open(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
    txn = tmp_path / "s" / ".txn"
    txn.mkdir()
    (txn / "ledger.json").write_text("{half written")
    with StateFolder.open(tmp_path / "s") as folder:
        assert [m.id for m in folder.ledger(FP, "tiny").memories] == [memory.id]
    assert not txn.exists()


def test_committed_journal_is_finished_on_open(tmp_path):
    root = tmp_path / "s"
    with StateFolder.open(root) as folder:
        first = _commit_one(folder)
        ledger = folder.ledger(FP, "tiny")
    # Simulate a crash right after the commit point: the journal is complete, nothing moved.
    second = Memory.new(Fact("Bo Strand", "plays the", "cello"))
    ledger = ledger.upsert(second)
    txn = root / ".txn"
    txn.mkdir()
    (txn / "ledger.json").write_text(ledger.to_json())
    save_file({"model.layers.1.mlp.down_proj.weight.u": _factors(1)[1][0],
               "model.layers.1.mlp.down_proj.weight.v": _factors(1)[1][1]},
              str(txn / f"{second.id}.safetensors"))
    moves = {"ledger.json": "ledger.json", f"{second.id}.safetensors": second.delta}
    (txn / "COMMIT").write_text(json.dumps({"moves": moves, "deletes": []}))
    with StateFolder.open(root) as folder:
        ids = [m.id for m in folder.ledger(FP, "tiny").memories]
    assert ids == [first.id, second.id]
    assert (root / second.delta).exists()


def test_corrupt_ledger_is_a_clear_error(tmp_path):
    root = tmp_path / "s"
    with StateFolder.open(root) as folder:
        _commit_one(folder)
    (root / "ledger.json").write_text('{"schema_version": 1, "memor')
    with StateFolder.open(root) as folder, pytest.raises(StateError, match="ledger.json is not valid JSON"):
        folder.ledger(FP, "tiny")


def test_ledger_from_a_newer_schema_is_refused():
    doc = {"schema_version": SCHEMA_VERSION + 1, "fingerprint": FP, "model": "x", "memories": []}
    with pytest.raises(StateError, match="newer sleeptui"):
        Ledger.from_json(json.dumps(doc))


def test_delta_path_outside_the_folder_is_refused():
    memory = json.loads(Ledger(FP, "x", (Memory.new(Fact("A B", "lives in", "C")),)).to_json())
    memory["memories"][0]["delta"] = "../../etc/passwd"
    with pytest.raises(StateError, match="outside the state folder"):
        Ledger.from_json(json.dumps(memory))


def test_state_of_another_model_is_refused_by_name(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        _commit_one(folder)
        with pytest.raises(FingerprintMismatch, match="'tiny'"):
            folder.ledger("0" * 64, "other-model")


def test_delta_with_unexpected_tensor_is_refused(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
        save_file({"lm_head.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "s" / memory.delta))
        with pytest.raises(StateError, match="unexpected tensor 'lm_head.weight'"):
            folder.read_delta(memory, SHAPES)


def test_delta_with_wrong_shapes_is_refused(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
        with pytest.raises(StateError, match="wrong shape"):
            folder.read_delta(memory, Shapes(d_model=16, d_ff=12, n_layers=4))


def test_truncated_delta_is_a_clear_error(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
        path = tmp_path / "s" / memory.delta
        path.write_bytes(path.read_bytes()[:20])
        with pytest.raises(StateError, match=memory.id):
            folder.read_delta(memory, SHAPES)


def test_second_process_is_told_who_holds_the_folder(tmp_path):
    root = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from sleeptui.state import StateFolder
            f = StateFolder.open(__import__('pathlib').Path({str(root)!r}))
            print('ready', flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StateLocked, match=f"process {holder.pid}"):
            StateFolder.open(root)
        with StateFolder.open(root, read_only=True) as ro, pytest.raises(StateError, match="read-only"):
            ro.commit(ro.ledger(FP, "tiny"), {})
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # Once the holder has gone, the lock is free again.
    with StateFolder.open(root):
        pass


def test_a_lock_left_by_a_killed_process_is_recovered(tmp_path):
    root = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"from sleeptui.state import StateFolder; import pathlib, time; "
         f"StateFolder.open(pathlib.Path({str(root)!r})); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "ready"
    holder.kill()
    holder.wait()
    with StateFolder.open(root) as folder:
        assert folder.ledger(FP, "tiny").memories == ()
    assert os.path.exists(root / ".lock")
