"""The state folder: commits, recovery, backups, bad input and the one-writer lock.

Every test of bad input checks the message a user sees and that nothing was lost: the
folder's files are as they were (or the damaged one is kept beside its repair), and every
committed memory still reads.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sleeptui import journal
from sleeptui.deltas import encode
from sleeptui.errors import FingerprintMismatch, StateError, StateLocked
from sleeptui.facts import Fact
from sleeptui.ledger import SCHEMA_VERSION, Ledger, Memory, SchemaTooNew
from sleeptui.state import Shapes, StateFolder

SHAPES = Shapes(d_model=8, d_ff=12, n_layers=4)
FP = "f" * 64
OTHER_FP = "0" * 64


def _factors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        1: (rng.normal(size=(8, 1)).astype(np.float32), rng.normal(size=(1, 12)).astype(np.float32))
    }


def _commit_one(folder, fact=None, seed=0):
    fact = fact or Fact("Ada Lind", "lives in", "Oslo")
    ledger = folder.ledger(FP, "tiny")
    memory = Memory.new(fact)
    folder.commit(ledger.upsert(memory), {memory.id: _factors(seed)})
    return memory


def _files(root: Path) -> dict[str, bytes]:
    """Every file of the folder and its bytes (the lock files aside)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".lock", ".holder")
    }


def _assert_reads(root: Path, memories, read_only=True):
    with StateFolder.open(root, read_only=read_only) as folder:
        ledger = folder.ledger(FP, "tiny")
        assert [m.id for m in ledger.memories] == [m.id for m in memories]
        for n, m in enumerate(memories):
            np.testing.assert_array_equal(
                folder.read_delta(ledger.get(m.id), SHAPES)[1][0], _factors(n)[1][0]
            )
        return folder.warnings


@pytest.fixture
def two_memories(tmp_path):
    """A folder with two committed memories (seeds 0 and 1), closed."""
    root = tmp_path / "s"
    with StateFolder.open(root) as folder:
        first = _commit_one(folder)
        second = _commit_one(folder, Fact("Bo Strand", "plays the", "cello"), seed=1)
    return root, [first, second]


# -- commits and the journal ---------------------------------------------------------------


def test_commit_round_trips_ledger_and_factors(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
        ledger = folder.ledger(FP, "tiny")
        assert [m.id for m in ledger.memories] == [memory.id]
        got = folder.read_delta(ledger.memories[0], SHAPES)
        np.testing.assert_array_equal(got[1][0], _factors()[1][0])
        assert not (tmp_path / "s" / ".txn").exists()
        assert folder.warnings == []


def test_folder_and_files_are_private_backups_and_lock_included(two_memories):
    root, _ = two_memories
    (root / "ledger.json").write_text("{")
    with StateFolder.open(root) as folder:  # also writes a ledger.json.corrupt-<time>
        folder.ledger(FP, "tiny")
        paths = list(root.rglob("*"))
    assert {".lock", ".holder", "backups"} <= {p.name for p in paths}
    assert any(p.name.startswith("ledger.json.corrupt-") for p in paths)
    for path in [root, *paths]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


def test_uncommitted_journal_is_discarded_on_open_and_says_so(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
    txn = tmp_path / "s" / ".txn"
    txn.mkdir()
    (txn / "00000.part").write_text("{half written")
    with StateFolder.open(tmp_path / "s") as folder:
        assert [m.id for m in folder.ledger(FP, "tiny").memories] == [memory.id]
        assert any("before it was committed" in w for w in folder.warnings)
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
    save_file(
        {
            "model.layers.1.mlp.down_proj.weight.u": _factors(1)[1][0],
            "model.layers.1.mlp.down_proj.weight.v": _factors(1)[1][1],
        },
        str(txn / f"{second.id}.safetensors"),
    )
    moves = {"ledger.json": "ledger.json", f"{second.id}.safetensors": second.delta}
    (txn / "COMMIT").write_text(json.dumps({"moves": moves, "deletes": []}))
    with StateFolder.open(root) as folder:
        ids = [m.id for m in folder.ledger(FP, "tiny").memories]
        assert any("after it was committed; it has been completed" in w for w in folder.warnings)
    assert ids == [first.id, second.id]
    assert (root / second.delta).exists()


@pytest.mark.parametrize("target", ["../outside", "/etc/passwd", ".txn/COMMIT", "deltas/../../x"])
def test_a_journal_naming_a_path_outside_the_folder_is_refused(tmp_path, target):
    root = tmp_path / "s"
    with StateFolder.open(root) as folder:
        memory = _commit_one(folder)
    before = _files(root)
    (root / ".txn").mkdir()
    (root / ".txn" / "COMMIT").write_text(json.dumps({"moves": {}, "deletes": [target]}))
    with pytest.raises(StateError, match="is damaged .* left as it is"):
        StateFolder.open(root)
    shutil.rmtree(root / ".txn")
    assert _files(root) == before
    _assert_reads(root, [memory])


def test_a_commit_that_fails_to_write_changes_nothing_and_says_why(tmp_path, monkeypatch):
    root = tmp_path / "s"
    with StateFolder.open(root) as folder:
        first = _commit_one(folder)
        before = _files(root)
        real = journal.write_file
        calls = iter(range(1000))

        def fail_on_third(path, data):
            if next(calls) == 2:
                raise OSError(errno.EROFS, "Read-only file system")
            real(path, data)

        monkeypatch.setattr(journal, "write_file", fail_on_third)
        with pytest.raises(
            StateError, match="read-only file system.*nothing was changed.*--read-only"
        ):
            _commit_one(folder, Fact("Bo Strand", "plays the", "cello"), seed=1)
    assert _files(root) == before
    _assert_reads(root, [first])


def test_a_commit_whose_files_cannot_be_moved_yet_is_kept_and_completed_later(
    tmp_path, monkeypatch
):
    root = tmp_path / "s"
    real = journal.apply

    def interrupted(root):
        raise OSError(errno.EIO, "Input/output error")

    with StateFolder.open(root) as folder:
        monkeypatch.setattr(journal, "apply", interrupted)
        memory = _commit_one(folder)  # past the commit point: it returns, and says so
        assert any("could not yet be moved into place" in w for w in folder.warnings)
        assert (root / ".txn" / "COMMIT").exists()
        with pytest.raises(
            StateError, match="could not yet be moved into place; nothing more was written"
        ):
            _commit_one(folder, Fact("Bo Strand", "plays the", "cello"), seed=1)
        monkeypatch.setattr(journal, "apply", real)
        assert [m.id for m in folder.ledger(FP, "tiny").memories] == [memory.id]
    _assert_reads(root, [memory])


# -- backups ---------------------------------------------------------------------------------


def test_each_commit_keeps_the_last_three_generations(tmp_path):
    root = tmp_path / "s"
    with StateFolder.open(root) as folder:
        for n in range(5):
            _commit_one(folder, Fact(f"Person {n}", "lives in", "Oslo"), seed=n)
    names = sorted(p.name for p in (root / "backups").iterdir() if p.is_file())
    assert names == [f"{kind}.{g}.json" for kind in ("ledger", "manifest") for g in (3, 4, 5)]
    assert (root / "backups" / "ledger.5.json").read_bytes() == (root / "ledger.json").read_bytes()
    # Generations 3..5 name memories 0..4; each delta is backed up once.
    assert len(list((root / "backups" / "deltas").iterdir())) == 5


def test_a_forgotten_memory_leaves_the_folder_backups_included(two_memories):
    root, (first, second) = two_memories

    def holding(text: str) -> list[str]:
        return [
            name for name, data in _files(root).items() if text.encode() in data or text in name
        ]

    assert holding("Ada Lind") and holding(first.id)
    with StateFolder.open(root) as folder:
        ledger = folder.ledger(FP, "tiny")
        folder.commit(ledger.without({first.id}), {}, removes=[first.id])  # forget
        assert holding("Ada Lind") == [] and holding(first.id) == []
        # Only the forget's own generation is left to fall back to; it grows back to three.
        assert sorted(p.name for p in (root / "backups").glob("ledger.*")) == ["ledger.3.json"]
        for n in range(3):
            _commit_one(folder, Fact(f"Person {n}", "lives in", "Oslo"), seed=n)
    assert sorted(p.name for p in (root / "backups").glob("ledger.*")) == [
        f"ledger.{g}.json" for g in (4, 5, 6)
    ]
    assert holding("Bo Strand")


def test_a_pruned_memory_keeps_its_entry_but_not_its_delta(two_memories):
    from dataclasses import replace

    root, (first, second) = two_memories
    with StateFolder.open(root) as folder:
        ledger = folder.ledger(FP, "tiny")
        pruned = replace(ledger.get(first.id), scale=0.0)
        folder.commit(ledger.upsert(pruned), {}, removes=[first.id])
        assert [m.id for m in folder.ledger(FP, "tiny").memories] == [first.id, second.id]
    assert not (root / first.delta).exists()
    assert (root / second.delta).exists()


def test_a_reader_keeps_reading_its_generation_while_a_writer_refreshes_a_delta(two_memories):
    root, (first, _) = two_memories
    reader = StateFolder.open(root, read_only=True)
    old = reader.ledger(FP, "tiny")
    with StateFolder.open(root) as writer:
        writer.commit(writer.ledger(FP, "tiny"), {first.id: _factors(7)})  # a refresh
    np.testing.assert_array_equal(
        reader.read_delta(old.get(first.id), SHAPES)[1][0], _factors(0)[1][0]
    )


# -- a damaged ledger --------------------------------------------------------------------------


def test_truncated_ledger_falls_back_to_the_newest_backup_keeping_the_bad_file(two_memories):
    root, memories = two_memories
    good = (root / "ledger.json").read_bytes()
    damaged = good[: len(good) // 2]
    (root / "ledger.json").write_bytes(damaged)
    warnings = _assert_reads(root, memories, read_only=False)
    assert any(
        f"{root / 'ledger.json'} is not valid JSON" in w and "no committed change was lost" in w
        for w in warnings
    )
    [aside] = root.glob("ledger.json.corrupt-*")
    assert aside.read_bytes() == damaged
    assert any(aside.name in w for w in warnings)
    assert (root / "ledger.json").read_bytes() == good
    assert _assert_reads(root, memories, read_only=False) == []


def test_damaged_ledger_opened_read_only_reads_the_backup_and_writes_nothing(two_memories):
    root, memories = two_memories
    (root / "ledger.json").write_text('{"schema_version": 2, "memor')
    before = _files(root)
    warnings = _assert_reads(root, memories)
    assert any(
        "ledger.json is not valid JSON" in w and "backups/ledger.2.json" in w for w in warnings
    )
    assert _files(root) == before


def test_a_listing_needs_no_model_reads_a_damaged_ledger_s_backup_and_writes_nothing(
    two_memories, tmp_path
):
    root, memories = two_memories
    with StateFolder.open(root, read_only=True) as folder:  # no fingerprint is given
        assert [m.id for m in folder.listing("tiny").memories] == [m.id for m in memories]
    (root / "ledger.json").write_text('{"schema_version": 2, "memor')
    before = _files(root)
    with StateFolder.open(root, read_only=True) as folder:
        assert [m.id for m in folder.listing("tiny").memories] == [m.id for m in memories]
    assert any("backups/ledger.2.json" in w for w in folder.warnings)
    assert _files(root) == before
    with StateFolder.open(tmp_path / "new", read_only=True) as folder:
        assert folder.listing("tiny") == Ledger(fingerprint="", model="tiny")
    assert not (tmp_path / "new").exists()


def test_missing_ledger_with_backups_is_restored_not_started_afresh(two_memories):
    root, memories = two_memories
    (root / "ledger.json").unlink()
    warnings = _assert_reads(root, memories, read_only=False)
    assert any("ledger.json is missing" in w for w in warnings)
    assert (root / "ledger.json").exists()


def test_when_the_newest_backup_is_damaged_too_an_older_one_is_used_and_the_loss_is_said(
    two_memories,
):
    root, (first, second) = two_memories
    (root / "ledger.json").write_text("garbage")
    (root / "backups" / "ledger.2.json").write_text("garbage")
    with StateFolder.open(root) as folder:
        assert [m.id for m in folder.ledger(FP, "tiny").memories] == [first.id]
        np.testing.assert_array_equal(
            folder.read_delta(folder.ledger(FP, "tiny").get(first.id), SHAPES)[1][0],
            _factors(0)[1][0],
        )
        assert any(
            "backups/ledger.1.json" in w and "the 1 commit(s) after it are lost" in w
            for w in folder.warnings
        )
    assert (root / second.delta).exists()  # its delta is not deleted: nothing more is lost


def test_damaged_ledger_without_backups_is_a_clear_error_and_nothing_is_lost(two_memories):
    root, _ = two_memories
    shutil.rmtree(root / "backups")
    (root / "ledger.json").write_text('{"schema_version": 2, "memor')
    before = _files(root)
    with (
        StateFolder.open(root) as folder,
        pytest.raises(StateError, match="ledger.json is not valid JSON"),
    ):
        folder.ledger(FP, "tiny")
    assert _files(root) == before


def test_ledger_from_a_newer_schema_is_refused_not_replaced_by_a_backup(two_memories):
    root, _ = two_memories
    doc = json.loads((root / "ledger.json").read_text())
    (root / "ledger.json").write_text(json.dumps({**doc, "schema_version": SCHEMA_VERSION + 1}))
    before = _files(root)
    with (
        StateFolder.open(root) as folder,
        pytest.raises(SchemaTooNew, match="newer sleeptui .* Upgrade sleeptui"),
    ):
        folder.ledger(FP, "tiny")
    assert _files(root) == before


def test_delta_path_outside_the_folder_is_refused():
    memory = json.loads(Ledger(FP, "x", (Memory.new(Fact("A B", "lives in", "C")),)).to_json())
    memory["memories"][0]["delta"] = "../../etc/passwd"
    with pytest.raises(StateError, match="outside the state folder"):
        Ledger.from_json(json.dumps(memory))


def test_state_of_another_model_is_refused_by_name(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        _commit_one(folder)
        with pytest.raises(FingerprintMismatch, match="'tiny'"):
            folder.ledger(OTHER_FP, "other-model")


# -- a damaged delta ---------------------------------------------------------------------------


def _other_models_delta(memory):
    return encode(_factors(5), memory.id, OTHER_FP, "smollm2-360m")


def test_delta_of_another_model_is_refused_naming_that_model(two_memories):
    root, (first, second) = two_memories
    shutil.rmtree(root / "backups")  # no committed copy to fall back to
    (root / first.delta).write_bytes(_other_models_delta(first))
    before = _files(root)
    with StateFolder.open(root) as folder:
        ledger = folder.ledger(FP, "tiny")
        with pytest.raises(
            FingerprintMismatch,
            match=f"{first.id}.safetensors belongs to another model "
            r"\('smollm2-360m', fingerprint 000000000000\)",
        ):
            folder.read_delta(ledger.get(first.id), SHAPES)
        np.testing.assert_array_equal(
            folder.read_delta(ledger.get(second.id), SHAPES)[1][0], _factors(1)[1][0]
        )
    assert _files(root) == before


def test_delta_of_another_model_is_replaced_by_the_committed_copy_and_kept_aside(two_memories):
    root, memories = two_memories
    foreign = _other_models_delta(memories[0])
    (root / memories[0].delta).write_bytes(foreign)
    warnings = _assert_reads(root, memories, read_only=False)
    assert any(
        "belongs to another model ('smollm2-360m'" in w and "restored from its committed copy" in w
        for w in warnings
    )
    [aside] = (root / "deltas").glob("*.corrupt-*")
    assert aside.read_bytes() == foreign


def test_delta_of_another_memory_is_refused(two_memories):
    root, (first, second) = two_memories
    shutil.rmtree(root / "backups")
    shutil.copy(root / second.delta, root / first.delta)
    with (
        StateFolder.open(root) as folder,
        pytest.raises(StateError, match=f"delta of memory '{second.id}', not of {first.id}"),
    ):
        folder.read_delta(folder.ledger(FP, "tiny").get(first.id), SHAPES)


def test_delta_with_unexpected_tensor_is_refused(two_memories):
    root, (first, _) = two_memories
    shutil.rmtree(root / "backups")
    save_file(
        {"lm_head.weight": np.zeros((2, 2), np.float32)},
        str(root / first.delta),
        metadata={"format": "sleeptui-delta/1", "memory_id": first.id, "fingerprint": FP},
    )
    with (
        StateFolder.open(root) as folder,
        pytest.raises(StateError, match="unexpected tensor 'lm_head.weight'"),
    ):
        folder.read_delta(folder.ledger(FP, "tiny").get(first.id), SHAPES)


def test_delta_with_wrong_shapes_is_refused(tmp_path):
    with StateFolder.open(tmp_path / "s") as folder:
        memory = _commit_one(folder)
        with pytest.raises(StateError, match="wrong shape"):
            folder.read_delta(memory, Shapes(d_model=16, d_ff=12, n_layers=4))


def test_delta_with_values_that_are_not_numbers_is_refused(two_memories):
    root, (first, _) = two_memories
    shutil.rmtree(root / "backups")
    u, v = _factors()[1]
    (root / first.delta).write_bytes(encode({1: (u * np.nan, v)}, first.id, FP, "tiny"))
    with StateFolder.open(root) as folder, pytest.raises(StateError, match="not finite"):
        folder.read_delta(folder.ledger(FP, "tiny").get(first.id), SHAPES)


def test_truncated_delta_is_restored_from_its_backup_copy_keeping_the_bad_file(two_memories):
    root, memories = two_memories
    path = root / memories[0].delta
    damaged = path.read_bytes()[:20]
    path.write_bytes(damaged)
    warnings = _assert_reads(root, memories, read_only=False)
    assert any(f"{path} was not a readable safetensors file" in w for w in warnings)
    [aside] = (root / "deltas").glob("*.corrupt-*")
    assert aside.read_bytes() == damaged
    assert _assert_reads(root, memories, read_only=False) == []


def test_damaged_delta_read_only_reads_the_copy_and_writes_nothing(two_memories):
    root, memories = two_memories
    path = root / memories[1].delta
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")  # flipped data: still parses
    before = _files(root)
    warnings = _assert_reads(root, memories)
    assert any(f"{path} is damaged (its checksum differs" in w for w in warnings)
    assert _files(root) == before


def test_truncated_delta_without_a_good_copy_is_a_clear_error_and_nothing_is_lost(two_memories):
    root, (first, second) = two_memories
    for copy in (root / "backups" / "deltas").glob(f"{first.id}.*"):
        copy.write_bytes(b"also damaged")
    (root / first.delta).write_bytes((root / first.delta).read_bytes()[:20])
    before = _files(root)
    with StateFolder.open(root) as folder:
        ledger = folder.ledger(FP, "tiny")
        with pytest.raises(
            StateError, match=f"delta of memory {first.id} .* missing or damaged too"
        ):
            folder.read_delta(ledger.get(first.id), SHAPES)
        folder.read_delta(ledger.get(second.id), SHAPES)
    assert _files(root) == before


# -- file systems that refuse writes --------------------------------------------------------
# Each case runs twice: on a real file system mounted for it (root only), and with the kernel's
# refusal (ENOSPC, EROFS) raised at the os calls the state folder writes through, which needs
# no privileges, so that the guarantee is tested everywhere.


def _mount(*args):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root; the same case runs without a mount beside this one")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount here ({done.stderr.strip()}); the same case runs without a mount "
            "beside this one"
        )


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs, to fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.fixture
def read_only_view(tmp_path):
    """(a folder, a read-only bind mount of it)."""
    source, view = tmp_path / "rw", tmp_path / "ro"
    source.mkdir()
    view.mkdir()
    _mount("--bind", str(source), str(view))
    try:
        _mount("-o", "remount,bind,ro", str(view))
        yield source, view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` with one file so that about ``leave`` bytes stay free."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def _commit_as_room_grows(folder, commit, squeeze, rooms) -> int:
    """Try ``commit`` with ``squeeze(room)`` bytes free for each of ``rooms`` until it fits
    (``squeeze(None)`` frees the disk again). Every failure must say that the disk is full
    and leave the folder as it was. Returns how many failed."""
    before = _files(folder.root)
    failures = 0
    for room in rooms:
        squeeze(room)
        try:
            commit()
        except StateError as e:
            failures += 1
            assert "is full (No space left on device); nothing was changed" in str(e)
            assert _files(folder.root) == before
            assert not (folder.root / ".txn").exists()
            continue
        finally:
            squeeze(None)
        return failures
    pytest.fail("the commit never found room")


def test_a_full_disk_changes_nothing_whatever_step_it_stops(tiny_disk):
    root = tiny_disk / "s"
    with StateFolder.open(root) as folder:
        first = _commit_one(folder)
        u, v = _factors(1)[1]
        big = {1: (np.tile(u, (1, 200)), np.tile(v, (200, 1)))}  # a 16 KiB delta: many pages
        ledger = folder.ledger(FP, "tiny")
        second = Memory.new(Fact("Bo Strand", "plays the", "cello"))

        def squeeze(leave):
            if leave is None:
                (tiny_disk / "filler").unlink()
            else:
                _fill(tiny_disk, leave)

        failures = _commit_as_room_grows(
            folder,
            lambda: folder.commit(ledger.upsert(second), {second.id: big}),
            squeeze,
            range(0, 80_000, 4096),
        )
        assert failures >= 3  # it failed at several steps of staging before it fit
        assert [m.id for m in folder.ledger(FP, "tiny").memories] == [first.id, second.id]
        assert folder.read_delta(second, SHAPES)[1][0].shape == (8, 200)


@pytest.fixture
def disk_budget(monkeypatch, tmp_path):
    """Writes to files under ``tmp_path`` fail with ENOSPC once ``budget[0]`` bytes are spent.

    The same as the tmpfs test above, for machines where nothing can be mounted: the kernel
    call every durable write goes through (``os.write``) runs out of room part-way, at
    whichever byte the budget ends, as a full disk does.
    """
    budget = [None]
    real_write = os.write

    def write(fd, data):
        if budget[0] is not None and os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            if budget[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = bytes(data)[: budget[0]]  # a short write, as at the last free block
            budget[0] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(journal.os, "write", write)
    return budget


def test_running_out_of_room_at_any_byte_of_a_commit_changes_nothing(tmp_path, disk_budget):
    root = tmp_path / "s"
    with StateFolder.open(root) as folder:
        first = _commit_one(folder)
        u, v = _factors(1)[1]
        big = {1: (np.tile(u, (1, 50)), np.tile(v, (50, 1)))}
        ledger = folder.ledger(FP, "tiny")
        second = Memory.new(Fact("Bo Strand", "plays the", "cello"))
        failures = _commit_as_room_grows(
            folder,
            lambda: folder.commit(ledger.upsert(second), {second.id: big}),
            lambda room: disk_budget.__setitem__(0, room),
            range(0, 200_000, 1500),
        )
        assert failures >= 5  # it ran out at several steps of staging before it fit
    with StateFolder.open(root) as folder:
        assert [m.id for m in folder.ledger(FP, "tiny").memories] == [first.id, second.id]
        assert folder.read_delta(second, SHAPES)[1][0].shape == (8, 50)


@pytest.fixture
def refusing_view(tmp_path, monkeypatch):
    """(a folder, another path to it whose every write fails with EROFS).

    The read-only bind mount above, for machines where nothing can be mounted: every call
    that creates, changes or removes a file or folder through the view's path raises what
    the kernel raises on a read-only file system; reads go through.
    """
    import builtins
    import io

    source, view = tmp_path / "rw", tmp_path / "ro"
    source.mkdir()
    view.symlink_to(source, target_is_directory=True)
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refuse(path) -> None:
        if os.fspath(path).startswith(str(view)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def guard(real, writing=lambda *a, **k: True):
        def call(path, *args, **kwargs):
            if writing(*args, **kwargs):
                refuse(path)
            return real(path, *args, **kwargs)

        return call

    for name in ("mkdir", "chmod", "replace", "rename", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    monkeypatch.setattr(os, "open", guard(os.open, lambda flags, *a, **k: bool(flags & writes)))
    opener = guard(io.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+"))
    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)
    return source, view


@pytest.mark.parametrize("views", ["read_only_view", "refusing_view"])
def test_a_read_only_file_system_is_refused_at_open_but_reads_with_read_only(views, request):
    source, view = request.getfixturevalue(views)
    with StateFolder.open(source / "s") as folder:
        memory = _commit_one(folder)
    before = _files(source / "s")
    with pytest.raises(
        StateError, match="is on a read-only file system.* Open it with --read-only"
    ):
        StateFolder.open(view / "s")
    _assert_reads(view / "s", [memory])
    assert _files(source / "s") == before


def test_read_only_open_of_a_missing_folder_creates_nothing(tmp_path):
    with StateFolder.open(tmp_path / "nothing", read_only=True) as folder:
        assert folder.ledger(FP, "tiny").memories == ()
    assert not (tmp_path / "nothing").exists()


# -- one writer --------------------------------------------------------------------------------


def test_second_process_is_told_who_holds_the_folder(tmp_path):
    root = tmp_path / "s"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from sleeptui.state import StateFolder
            f = StateFolder.open(__import__('pathlib').Path({str(root)!r}))
            print('ready', flush=True)
            sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StateLocked, match=f"process {holder.pid}"):
            StateFolder.open(root)
        with (
            StateFolder.open(root, read_only=True) as ro,
            pytest.raises(StateError, match="read-only"),
        ):
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
        [
            sys.executable,
            "-c",
            f"from sleeptui.state import StateFolder; import pathlib, time; "
            f"StateFolder.open(pathlib.Path({str(root)!r})); print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "ready"
    holder.kill()
    holder.wait()
    with StateFolder.open(root) as folder:
        assert folder.ledger(FP, "tiny").memories == ()
    assert os.path.exists(root / ".lock")
