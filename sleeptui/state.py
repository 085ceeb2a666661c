"""The state folder: one writer, atomic commits through a redo journal, private files.

Layout (see ``state_schema/README.md``)::

    ledger.json                 the committed ledger
    deltas/<id>.safetensors     per-memory low-rank factors
    .txn/                       a commit in flight (redo journal)
    .lock                       held by the one process that may write

A commit writes every new file into ``.txn/``, fsyncs them, then writes ``.txn/COMMIT``
(the commit point), moves the files into place and removes the journal. Opening a folder
finishes a journal that has a COMMIT marker and discards one that has none, so after a
crash at any instant the folder is the last committed state.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from sleeptui.backends import down_proj_name
from sleeptui.errors import FingerprintMismatch, StateError, StateLocked
from sleeptui.ledger import Ledger, Memory
from sleeptui.paths import private_dir

Factors = dict[int, tuple[np.ndarray, np.ndarray]]
LEDGER = "ledger.json"
DELTA_FORMAT = "sleeptui-delta/1"


@dataclass(frozen=True)
class Shapes:
    """What a delta for this model must look like."""

    d_model: int
    d_ff: int
    n_layers: int


class StateFolder:
    """An opened state folder; writable only by the process holding its lock."""

    def __init__(self, root: Path, lock: FileLock | None) -> None:
        self.root = root
        self._lock = lock

    @classmethod
    def open(cls, root: Path, read_only: bool = False) -> StateFolder:
        """Open (creating if need be) the folder, take its lock and recover a journal.

        Raises:
            StateLocked: another process holds the folder (unless ``read_only``).
        """
        private_dir(root)
        lock = None
        if not read_only:
            lock = FileLock(root / ".lock", timeout=0, mode=0o600)
            try:
                lock.acquire()
            except Timeout as e:
                holder = _read_holder(root)
                raise StateLocked(
                    f"The state folder {root} is in use by another sleeptui ({holder}). Close "
                    "it first, or open this one read-only with --read-only."
                ) from e
            _write_file(root / ".holder", json.dumps({"pid": os.getpid()}).encode())
            private_dir(root / "deltas")
            _recover(root)
        return cls(root, lock)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def read_only(self) -> bool:
        return self._lock is None

    # -- reading -----------------------------------------------------------------

    def ledger(self, fingerprint: str, model: str) -> Ledger:
        """The committed ledger, or an empty one for a new folder.

        Raises:
            FingerprintMismatch: the folder belongs to another model.
            StateError: the ledger cannot be read.
        """
        path = self.root / LEDGER
        if not path.exists():
            return Ledger(fingerprint=fingerprint, model=model)
        ledger = Ledger.from_json(path.read_text(encoding="utf-8"), source=str(path))
        if ledger.fingerprint != fingerprint:
            raise FingerprintMismatch(
                f"The state folder {self.root} holds memories of the model '{ledger.model}' "
                f"(fingerprint {ledger.fingerprint[:12]}), not of the model loaded now "
                f"('{model}', fingerprint {fingerprint[:12]}). Start sleeptui with that model, "
                "or use another --state-dir."
            )
        return ledger

    def read_delta(self, memory: Memory, shapes: Shapes) -> Factors:
        """A memory's factors, checked against the model's shapes.

        Raises:
            StateError: the file is missing, corrupt, or holds unexpected tensors or shapes.
        """
        path = self.root / memory.delta
        try:
            tensors = load_file(str(path))
        except (FileNotFoundError, SafetensorError, OSError) as e:
            raise StateError(f"The delta of memory {memory.id} ({path}) cannot be read: {e}") from e
        return parse_factors(tensors, shapes, str(path))

    # -- writing -----------------------------------------------------------------

    def commit(self, ledger: Ledger, writes: dict[str, Factors], removes: Iterable[str] = ()) -> None:
        """Write new deltas and the ledger as one transaction; delete ``removes`` (memory ids)."""
        if self.read_only:
            raise StateError(f"The state folder {self.root} is open read-only; nothing was written.")
        txn = self.root / ".txn"
        shutil.rmtree(txn, ignore_errors=True)
        try:
            private_dir(txn)
            moves = {}
            for memory_id, factors in writes.items():
                memory = ledger.get(memory_id)
                assert memory is not None, memory_id
                name = f"{memory_id}.safetensors"
                _write_delta(txn / name, factors, memory_id, ledger.fingerprint)
                moves[name] = memory.delta
            _write_file(txn / LEDGER, ledger.to_json().encode())
            moves[LEDGER] = LEDGER
            deletes = [m.delta for m in _removed(ledger, removes, self)]
            _write_file(txn / "COMMIT.tmp", json.dumps({"moves": moves, "deletes": deletes}).encode())
            os.replace(txn / "COMMIT.tmp", txn / "COMMIT")  # the commit point
            _fsync_dir(txn)
        except OSError as e:
            shutil.rmtree(txn, ignore_errors=True)
            raise StateError(f"Could not write to {self.root} ({e.strerror}); nothing was changed.") from e
        _apply(self.root)

    def __enter__(self) -> StateFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_factors(tensors: dict[str, np.ndarray], shapes: Shapes, source: str) -> Factors:
    """Factors from a delta file's tensors: ``<name>.u`` (d_model × r), ``<name>.v`` (r × d_ff)."""
    names = {down_proj_name(layer): layer for layer in range(shapes.n_layers)}
    factors: Factors = {}
    for key in tensors:
        base, _, part = key.rpartition(".")
        if base not in names or part not in ("u", "v"):
            raise StateError(f"{source} holds an unexpected tensor '{key}'; it is not a sleeptui delta.")
    for base, layer in names.items():
        u, v = tensors.get(base + ".u"), tensors.get(base + ".v")
        if u is None and v is None:
            continue
        if u is None or v is None or u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0] \
                or u.shape[0] != shapes.d_model or v.shape[1] != shapes.d_ff:
            got = f"u {None if u is None else u.shape}, v {None if v is None else v.shape}"
            raise StateError(
                f"{source} has factors of the wrong shape for {base} ({got}; this model needs "
                f"u ({shapes.d_model} × r) and v (r × {shapes.d_ff})): it belongs to another model."
            )
        factors[layer] = (u.astype(np.float32), v.astype(np.float32))
    return factors


def _removed(ledger: Ledger, removes: Iterable[str], folder: StateFolder) -> list[Memory]:
    previous_path = folder.root / LEDGER
    if not previous_path.exists():
        return []
    previous = Ledger.from_json(previous_path.read_text(encoding="utf-8"))
    gone = set(removes)
    return [m for m in previous.memories if m.id in gone and ledger.get(m.id) is None]


def _write_delta(path: Path, factors: Factors, memory_id: str, fingerprint: str) -> None:
    tensors = {}
    for layer, (u, v) in sorted(factors.items()):
        tensors[down_proj_name(layer) + ".u"] = np.ascontiguousarray(u, dtype=np.float32)
        tensors[down_proj_name(layer) + ".v"] = np.ascontiguousarray(v, dtype=np.float32)
    meta = {"format": DELTA_FORMAT, "memory_id": memory_id, "fingerprint": fingerprint}
    save_file(tensors, str(path), metadata=meta)
    _fsync(path)
    os.chmod(path, 0o600)


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply(root: Path) -> None:
    """Carry out a committed journal (idempotent: safe to repeat after a crash)."""
    txn = root / ".txn"
    plan = json.loads((txn / "COMMIT").read_text())
    for name, target in plan["moves"].items():
        src = txn / name
        if src.exists():
            os.replace(src, root / target)
    for target in plan["deletes"]:
        (root / target).unlink(missing_ok=True)
    _fsync_dir(root / "deltas")
    _fsync_dir(root)
    shutil.rmtree(txn)


def _recover(root: Path) -> None:
    txn = root / ".txn"
    if not txn.exists():
        return
    if (txn / "COMMIT").exists():
        _apply(root)
    else:
        shutil.rmtree(txn)


def _read_holder(root: Path) -> str:
    try:
        pid = json.loads((root / ".holder").read_text())["pid"]
        return f"process {pid}"
    except (OSError, ValueError, KeyError):
        return "another process"
