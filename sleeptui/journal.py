"""The redo journal that makes a commit atomic, and the durable file writes it is built from.

A transaction stages every new file in ``.txn/`` (each fsynced), then writes ``.txn/COMMIT``
by an atomic rename: the commit point. ``COMMIT`` lists the moves (staged file → place in the
folder, in order) and the files to delete afterwards. Carrying it out is idempotent, so after
a crash at any instant :func:`recover` either finishes a committed journal or discards an
uncommitted one, and the folder is the last committed state.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from sleeptui.errors import StateError
from sleeptui.paths import private_dir

TXN = ".txn"
COMMIT = "COMMIT"


class Transaction:
    """A journal being written; nothing in the folder changes until :meth:`commit`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.txn = root / TXN
        self._moves: dict[str, str] = {}
        self._deletes: list[str] = []
        shutil.rmtree(self.txn, ignore_errors=True)
        private_dir(self.txn)
        fsync_dir(root)

    def write(self, target: str, data: bytes) -> None:
        """Stage ``data`` to become the file ``target`` (relative to the folder)."""
        name = f"{len(self._moves):05d}.part"
        write_file(self.txn / name, data)
        self._moves[name] = target

    def delete(self, target: str) -> None:
        """Delete ``target`` once every staged file is in place."""
        self._deletes.append(target)

    def commit(self) -> None:
        """The commit point: after this returns, the transaction survives any crash."""
        plan = {"moves": self._moves, "deletes": self._deletes}
        write_file(self.txn / "COMMIT.tmp", json.dumps(plan).encode())
        os.replace(self.txn / "COMMIT.tmp", self.txn / COMMIT)
        fsync_dir(self.txn)

    def abandon(self) -> None:
        """Discard an uncommitted transaction."""
        shutil.rmtree(self.txn, ignore_errors=True)


def apply(root: Path) -> None:
    """Carry out a committed journal, then remove it (safe to repeat after a crash).

    Raises:
        StateError: ``COMMIT`` is damaged or names a path outside the folder; the journal is
            left as it is.
        OSError: a move or deletion failed; the journal is left to be finished later.
    """
    txn = root / TXN
    moves, deletes = _plan(txn / COMMIT)
    for name, target in moves.items():
        src = txn / name
        if src.exists():
            dest = root / target
            private_dir(dest.parent)
            os.replace(src, dest)
    for target in deletes:
        (root / target).unlink(missing_ok=True)
    for target in deletes:  # an adapter's folder goes with its last file
        folder = (root / target).parent
        if target.startswith("adapters/") and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for folder in {(root / t).parent for t in [*moves.values(), *deletes]} | {root}:
        if folder.is_dir():
            fsync_dir(folder)
    shutil.rmtree(txn)


def recover(root: Path) -> str | None:
    """Finish or discard a journal left by a crash; a sentence saying which, or None."""
    txn = root / TXN
    if not txn.exists():
        return None
    if (txn / COMMIT).exists():
        apply(root)
        return "The last change was interrupted after it was committed; it has been completed."
    shutil.rmtree(txn)
    return "The last change was interrupted before it was committed; it was discarded."


def pending(root: Path) -> bool:
    """Whether a committed journal is waiting to be carried out."""
    return (root / TXN / COMMIT).exists()


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a reader sees the old or the new bytes."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def keep_aside(path: Path, data: bytes) -> Path:
    """Save ``data`` as ``<path>.corrupt-<UTC time>`` beside ``path`` and return that path."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    write_file(aside, data)
    return aside


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plan(path: Path) -> tuple[dict[str, str], list[str]]:
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
        moves, deletes = dict(plan["moves"]), list(plan["deletes"])
        for name, target in moves.items():
            _check_inside(name, allow_nested=False)
            _check_inside(target)
        for target in deletes:
            _check_inside(target)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise StateError(
            f"The journal {path} is damaged ({e}); it was left as it is. Move the folder "
            f"{path.parent} aside to open the state folder as it was before that change."
        ) from e
    return moves, deletes


def _check_inside(value: object, allow_nested: bool = True) -> None:
    if not isinstance(value, str):
        raise TypeError(f"expected a path, got {type(value).__name__}")
    parts = PurePosixPath(value).parts
    if (
        not parts
        or PurePosixPath(value).is_absolute()
        or any(p in ("..", ".", TXN) for p in parts)
        or "\\" in value
        or "\0" in value
        or (not allow_nested and len(parts) != 1)
    ):
        raise ValueError(f"the path {value!r} is outside the state folder")
