"""The state folder: one writer, atomic commits, backup generations, private files.

Layout (see ``state_schema/README.md``)::

    ledger.json                 the committed ledger
    deltas/<id>.safetensors     per-memory low-rank factors
    adapters/<sha>/             the consolidation LoRA adapter, in peft's format
    backups/                    the last three committed generations (``sleeptui.backups``)
    .txn/                       a commit in flight (redo journal, ``sleeptui.journal``)
    .lock, .holder              held by the one process that may write, and its pid

Every commit writes the new deltas, the ledger and the generation's backups in one
transaction, so after a crash at any instant the folder is the last committed state. A
damaged ``ledger.json`` or delta is replaced from the newest backup that has a good copy;
the damaged file is kept beside it and :attr:`StateFolder.warnings` says what happened.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from sleeptui import backups, journal
from sleeptui.backups import LEDGER, Manifest, delta_copy_name, sha256
from sleeptui.deltas import Factors, Shapes, decode, mismatch, parse_factors
from sleeptui.errors import FingerprintMismatch, StateError, StateLocked
from sleeptui.ledger import Ledger, Memory, SchemaTooNew
from sleeptui.paths import private_dir

__all__ = ["Factors", "Shapes", "StateFolder", "parse_factors"]


@dataclass(frozen=True)
class _Loaded:
    ledger: Ledger
    manifest: Manifest | None
    fell_back: bool = False
    damaged: bytes | None = None


class StateFolder:
    """An opened state folder; writable only by the process holding its lock.

    Attributes:
        root: The folder.
        warnings: Sentences for the user about what opening and reading found and did
            (a damaged file replaced from a backup, an interrupted commit finished, ...).
    """

    def __init__(self, root: Path, lock: FileLock | None) -> None:
        self.root = root
        self.warnings: list[str] = []
        self._lock = lock
        self._committed: Ledger | None = None
        self._manifest: Manifest | None = None

    @classmethod
    def open(cls, root: Path, read_only: bool = False) -> StateFolder:
        """Open the folder: take its lock, create it if need be and recover a journal.

        Read-only, nothing is created, locked or written, and another process may hold it.

        Raises:
            StateLocked: another process holds the folder (unless ``read_only``).
            StateError: the folder cannot be written (say, a read-only file system).
        """
        root = Path(root)
        if read_only:
            folder = cls(root, None)
            if journal.pending(root):
                folder._warn(
                    "A change was interrupted while it was being saved; it will be "
                    "completed when the folder is next opened for writing."
                )
            return folder
        try:
            private_dir(root)
            lock = FileLock(root / ".lock", timeout=0, mode=0o600)
            lock.acquire()
        except Timeout as e:
            raise StateLocked(
                f"The state folder {root} is in use by another sleeptui ({_read_holder(root)}). "
                "Close it first, or open this one read-only with --read-only."
            ) from e
        except OSError as e:
            raise StateError(_cannot_write(root, e)) from e
        folder = cls(root, lock)
        try:
            folder._write_holder()
            private_dir(root / "deltas")
            folder._warn(journal.recover(root))
        except OSError as e:
            folder.close()
            raise StateError(_cannot_write(root, e)) from e
        except BaseException:
            folder.close()
            raise
        return folder

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

        An unreadable or missing ``ledger.json`` falls back to the newest backup generation
        that reads well; writable, the folder is repaired (the damaged file kept as
        ``ledger.json.corrupt-<time>``). Either way a warning names the file.

        Raises:
            FingerprintMismatch: the folder belongs to another model.
            SchemaTooNew: the ledger was written by a newer sleeptui.
            StateError: neither the ledger nor any backup can be read.
        """
        self._finish_journal()
        loaded = self._load(fingerprint, model)
        ledger = loaded.ledger
        if ledger.fingerprint != fingerprint:
            raise FingerprintMismatch(
                f"The state folder {self.root} holds memories of the model '{ledger.model}' "
                f"(fingerprint {ledger.fingerprint[:12]}), not of the model loaded now "
                f"('{model}', fingerprint {fingerprint[:12]}). Start sleeptui with that model, "
                "or use another --state-dir."
            )
        if loaded.fell_back and not self.read_only:
            self._restore_ledger(loaded)
        self._committed, self._manifest = ledger, loaded.manifest
        return ledger

    def listing(self, model: str) -> Ledger:
        """The committed ledger as it stands, read without loading a model: to list memories.

        Nothing is checked against a model's fingerprint and nothing is repaired or finished
        (a damaged ledger is read from its newest good backup, with a warning). A new
        folder gives an empty ledger of ``model``.

        Raises:
            SchemaTooNew: the ledger was written by a newer sleeptui.
            StateError: neither the ledger nor any backup can be read.
        """
        return self._load("", model).ledger

    def read_delta(self, memory: Memory, shapes: Shapes) -> Factors:
        """A memory's factors, checked against its checksum, its metadata and the model's shapes.

        A delta that differs from its committed checksum is read from its backup copy instead
        (and, writable, restored from it, the damaged file kept beside it), with a warning.

        Raises:
            FingerprintMismatch: the file is a delta of another model.
            StateError: the file is missing or damaged with no good copy, or holds unexpected
                tensors or shapes, or another memory's delta; it names the file.
        """
        self._finish_journal()
        path = self.root / memory.delta
        tensors, meta = decode(self._verified_delta(memory), str(path))
        problem = mismatch(meta, memory.id, self._committed, str(path))
        if problem:
            raise problem
        return parse_factors(tensors, shapes, str(path))

    # -- writing -----------------------------------------------------------------

    def read_adapter(self, ledger: Ledger) -> dict[str, bytes] | None:
        """The files of the ledger's adapter (peft's format), checked against their checksums.

        Raises:
            StateError: a file is missing or differs from its checksum; it names the file.
        """
        record = ledger.adapter
        if record is None:
            return None
        files = {}
        for name, digest in record.files.items():
            path = self.root / record.path / name
            data = _read(path)
            if data is None:
                raise StateError(
                    f"The adapter file {path} is missing; restore the folder from "
                    "a copy, or forget the consolidated memories."
                )
            if sha256(data) != digest:
                raise StateError(
                    f"The adapter file {path} is damaged (its checksum differs "
                    "from the ledger's); nothing was changed."
                )
            files[name] = data
        return files

    def commit(
        self,
        ledger: Ledger,
        writes: dict[str, Factors],
        removes: Iterable[str] = (),
        adapter_files: dict[str, bytes] | None = None,
    ) -> None:
        """Write new deltas, the ledger and a backup generation as one transaction.

        ``removes`` are memory ids whose delta files go (the entry may stay, as a pruned
        memory's does). ``adapter_files`` are the files of a newly trained adapter, which the
        ledger names. Whatever fails before the commit point leaves the folder unchanged.

        Raises:
            StateError: the folder is read-only or cannot be written; nothing was changed.
        """
        if self.read_only:
            raise StateError(
                f"The state folder {self.root} is open read-only; nothing was written."
            )
        self._finish_journal()
        if journal.pending(self.root):
            raise StateError(
                f"A committed change in {self.root} could not yet be moved into "
                "place; nothing more was written. Reopen the folder to complete it."
            )
        committed = self._committed
        if committed is None:
            committed = self.ledger(ledger.fingerprint, ledger.model)
        txn = None
        try:
            txn = journal.Transaction(self.root)
            manifest = backups.stage(
                txn,
                committed,
                self._manifest,
                ledger,
                writes,
                set(removes) - set(writes),
                adapter_files,
            )
            txn.commit()
        except BaseException as e:
            if txn is not None:
                txn.abandon()
            if isinstance(e, OSError):
                raise StateError(_cannot_write(self.root, e)) from e
            raise
        self._committed, self._manifest = ledger, manifest
        self._finish_journal()

    def __enter__(self) -> StateFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _load(self, fingerprint: str, model: str) -> _Loaded:
        found, problems = backups.manifests(self.root)
        for problem in problems:
            self._warn(problem)
        path = self.root / LEDGER
        data = _read(path)
        if data is None and not found:
            return _Loaded(Ledger(fingerprint=fingerprint, model=model), None)
        if data is None:
            problem = f"{path} is missing."
        else:
            try:
                ledger = Ledger.from_json(data, source=str(path))
            except SchemaTooNew:
                raise
            except StateError as e:
                problem = str(e)
            else:
                manifest = next((m for m in found if m.ledger == sha256(data)), None)
                if manifest is None and found:
                    self._warn(
                        f"{path} differs from every committed generation in "
                        f"{self.root / backups.BACKUPS} (was it edited by hand?); it is used as it is."
                    )
                return _Loaded(ledger, manifest)
        for manifest in found:
            name = backups.ledger_name(manifest.generation)
            backup = _read(self.root / name)
            if backup is None or sha256(backup) != manifest.ledger:
                continue
            try:
                ledger = Ledger.from_json(backup, source=str(self.root / name))
            except SchemaTooNew:
                raise
            except StateError:
                continue
            lost = backups.newest_generation(self.root) - manifest.generation
            self._warn(
                f"{problem} Read the last good backup, {name}, instead"
                + (
                    f"; the {lost} commit(s) after it are lost."
                    if lost
                    else "; no committed change was lost."
                )
            )
            return _Loaded(ledger, manifest, fell_back=True, damaged=data)
        raise StateError(
            f"{problem} No backup in {self.root / backups.BACKUPS} could be read either. Nothing "
            "was changed; restore the folder from a copy, or move it aside to start afresh."
        )

    def _restore_ledger(self, loaded: _Loaded) -> None:
        """Put the backup that ``ledger()`` fell back to in place, keeping the damaged file."""
        assert loaded.manifest is not None
        path = self.root / LEDGER
        try:
            if loaded.damaged is not None:
                aside = journal.keep_aside(path, loaded.damaged)
                self._warn(
                    f"{path} was restored from that backup; the damaged file was kept as {aside}."
                )
            backup = self.root / backups.ledger_name(loaded.manifest.generation)
            journal.replace_file(path, backup.read_bytes())
        except OSError as e:
            raise StateError(_cannot_write(self.root, e)) from e

    def _verified_delta(self, memory: Memory) -> bytes:
        path = self.root / memory.delta
        data = _read(path)
        digest = self._manifest.deltas.get(memory.id) if self._manifest else None
        if digest is None or (data is not None and sha256(data) == digest):
            if data is None:
                raise StateError(
                    f"The delta of memory {memory.id} ({path}) is missing; nothing "
                    "was changed. Restore the file from a copy of the folder."
                )
            return data
        what = "missing" if data is None else self._describe_damage(data, memory, str(path))
        copy = self.root / delta_copy_name(memory.id, digest)
        good = _read(copy)
        if good is None or sha256(good) != digest:
            raise StateError(
                f"The delta of memory {memory.id} ({path}) is {what}, and the backup {copy} is "
                "missing or damaged too. Nothing was changed; restore the file from a copy of the folder."
            )
        if self.read_only:
            self._warn(
                f"{path} is {what}; read its committed copy {copy} instead. Open the "
                "folder for writing to repair it."
            )
            return good
        try:
            note = (
                ""
                if data is None
                else f"; the file found there was kept as {journal.keep_aside(path, data)}"
            )
            journal.replace_file(path, good)
        except OSError as e:
            raise StateError(_cannot_write(self.root, e)) from e
        self._warn(f"{path} was {what}; it was restored from its committed copy {copy}{note}.")
        return good

    def _describe_damage(self, data: bytes, memory: Memory, source: str) -> str:
        try:
            _, meta = decode(data, source)
        except StateError:
            return "not a readable safetensors file"
        problem = mismatch(meta, memory.id, self._committed, source)
        return (
            f"wrong ({problem})"
            if problem
            else "damaged (its checksum differs from the committed one)"
        )

    def _finish_journal(self) -> None:
        """Carry out a committed journal that could not be finished when it committed."""
        if self.read_only or not journal.pending(self.root):
            return
        try:
            journal.apply(self.root)
        except OSError as e:
            self._warn(
                f"A committed change could not yet be moved into place ({e.strerror}); "
                "it will be completed when the folder is next opened."
            )

    def _write_holder(self) -> None:
        try:
            journal.write_file(self.root / ".holder", json.dumps({"pid": os.getpid()}).encode())
        except OSError as e:
            self._warn(f"Could not record this process in {self.root / '.holder'} ({e.strerror}).")

    def _warn(self, message: str | None) -> None:
        if message and message not in self.warnings:
            self.warnings.append(message)


def _read(path: Path) -> bytes | None:
    """A file's bytes, or None if it does not exist.

    Raises:
        StateError: it exists but cannot be read.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{path} cannot be read ({e.strerror or e}); nothing was changed.") from e


def _cannot_write(root: Path, e: OSError) -> str:
    if e.errno == errno.EROFS:
        return (
            f"The state folder {root} is on a read-only file system, so sleeptui cannot save "
            "anything there; nothing was changed. Open it with --read-only to read your "
            "memories, or choose a writable --state-dir."
        )
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"The disk holding the state folder {root} is full ({e.strerror}); nothing was "
            "changed. Free some space and try again."
        )
    return f"Could not write to the state folder {root} ({e.strerror or e}); nothing was changed."


def _read_holder(root: Path) -> str:
    try:
        pid = json.loads((root / ".holder").read_text())["pid"]
        return f"process {pid}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
