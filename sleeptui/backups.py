"""Backup generations: the last few committed ledgers, with checksummed copies of their deltas.

Every commit is a generation, numbered from 1. Beside ``ledger.json`` and ``deltas/``, the
folder keeps, for each of the newest :data:`KEEP` generations::

    backups/ledger.<n>.json                the ledger as committed (byte for byte)
    backups/manifest.<n>.json              the SHA-256 of that ledger and of each of its deltas
    backups/deltas/<id>.<sha>.safetensors  a copy of each delta it names (<sha>: 16 hex digits)

Delta copies are named by their content, so a generation costs only the deltas it changed,
and a reader can tell a good copy from a damaged one. They are written in the same
transaction as the commit and rotated out with it: when generation n+KEEP commits, generation
n's ledger, manifest and the copies no newer generation needs are deleted.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sleeptui.deltas import Factors, encode
from sleeptui.journal import Transaction
from sleeptui.ledger import Ledger, Memory

KEEP = 3
"""How many committed generations the folder keeps."""
BACKUPS = "backups"
LEDGER = "ledger.json"
_MANIFEST = re.compile(r"manifest\.([1-9][0-9]{0,17})\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ADAPTER = re.compile(r"adapters/[0-9a-f]{16}")
ADAPTERS = "adapters"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ledger_name(generation: int) -> str:
    return f"{BACKUPS}/ledger.{generation}.json"


def manifest_name(generation: int) -> str:
    return f"{BACKUPS}/manifest.{generation}.json"


def delta_copy_name(memory_id: str, digest: str) -> str:
    return f"{BACKUPS}/deltas/{memory_id}.{digest[:16]}.safetensors"


@dataclass(frozen=True)
class Manifest:
    """What one generation committed.

    Attributes:
        generation: Its number; the newest generation has the largest.
        ledger: SHA-256 of its ``ledger.json``.
        deltas: SHA-256 of the delta file of each memory that has one, by memory id.
    """

    generation: int
    ledger: str
    deltas: Mapping[str, str] = field(default_factory=dict)
    adapter: str | None = None

    def to_json(self) -> bytes:
        doc = {"generation": self.generation, "ledger": self.ledger, "deltas": dict(self.deltas)}
        if self.adapter:
            doc["adapter"] = self.adapter
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest.

        Raises:
            ValueError: it is not a well-formed manifest.
        """
        try:
            doc = json.loads(data)
            generation, ledger, deltas = doc["generation"], doc["ledger"], doc["deltas"]
        except (KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"not a manifest ({e!r})") from e
        if (
            type(generation) is not int
            or not isinstance(ledger, str)
            or not _SHA256.fullmatch(ledger)
        ):
            raise ValueError("not a manifest (generation or ledger checksum)")
        if not isinstance(deltas, dict) or not all(
            isinstance(k, str) and _ID.fullmatch(k) and isinstance(v, str) and _SHA256.fullmatch(v)
            for k, v in deltas.items()
        ):
            raise ValueError("not a manifest (delta checksums)")
        adapter = doc.get("adapter")
        if adapter is not None and not (isinstance(adapter, str) and _ADAPTER.fullmatch(adapter)):
            raise ValueError("not a manifest (adapter path)")
        return cls(generation, ledger, deltas, adapter)


def manifests(root: Path) -> tuple[list[Manifest], list[str]]:
    """The folder's manifests, newest first, and a sentence for each one that is unreadable."""
    found, problems = [], []
    folder = root / BACKUPS
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    for name in names:
        match = _MANIFEST.fullmatch(name)
        if match is None:
            continue
        try:
            manifest = Manifest.from_json((folder / name).read_bytes())
            if manifest.generation != int(match.group(1)):
                raise ValueError("its generation does not match its name")
        except (OSError, ValueError) as e:
            problems.append(f"The backup {folder / name} is damaged ({e}); it was ignored.")
            continue
        found.append(manifest)
    return sorted(found, key=lambda m: m.generation, reverse=True), problems


def newest_generation(root: Path) -> int:
    """The largest generation number in ``backups/`` (damaged manifests count), or 0."""
    folder = root / BACKUPS
    numbers = [
        int(m.group(1))
        for p in (folder.iterdir() if folder.is_dir() else ())
        if (m := _MANIFEST.fullmatch(p.name))
    ]
    return max(numbers, default=0)


def rotated_out(root: Path, kept: Iterable[Manifest]) -> list[str]:
    """Files in ``backups/`` that no kept generation needs (paths relative to ``root``)."""
    kept = list(kept)
    generations = {m.generation for m in kept}
    needed = {delta_copy_name(i, d) for m in kept for i, d in m.deltas.items()}
    needed |= {ledger_name(g) for g in generations} | {manifest_name(g) for g in generations}
    folder = root / BACKUPS
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if (folder / "deltas").is_dir():
        files += [p for p in (folder / "deltas").iterdir() if p.is_file()]
    stale = sorted(name for p in files if (name := p.relative_to(root).as_posix()) not in needed)
    # Adapters are named by content and never rewritten: one stays while a kept generation
    # names it, and then goes (with the facts it was trained on).
    adapters = {m.adapter for m in kept if m.adapter}
    folder = root / ADAPTERS
    for sub in sorted(folder.iterdir()) if folder.is_dir() else ():
        if sub.is_dir() and f"{ADAPTERS}/{sub.name}" not in adapters:
            stale += [
                f"{ADAPTERS}/{sub.name}/{p.name}" for p in sorted(sub.iterdir()) if p.is_file()
            ]
    return stale


def stage(
    txn: Transaction,
    committed: Ledger,
    manifest: Manifest | None,
    ledger: Ledger,
    writes: dict[str, Factors],
    removed: set[str],
    adapter_files: Mapping[str, bytes] | None = None,
) -> Manifest:
    """Stage in ``txn`` a commit of ``ledger`` over ``committed`` (whose generation is
    ``manifest``, if known): new deltas, their copies, the ledger, its generation and the
    rotation. The ledger is staged last, so that a reader who sees the new ``ledger.json``
    finds everything it names already in place. Returns the new generation's manifest.
    """
    root = txn.root
    digests: dict[str, str] = {}
    for memory_id, factors in writes.items():
        memory = ledger.get(memory_id)
        if memory is None:
            raise ValueError(f"commit writes a delta for {memory_id}, which the ledger lacks")
        data = encode(factors, memory_id, ledger.fingerprint, ledger.model)
        digests[memory_id] = sha256(data)
        txn.write(memory.delta, data)
        _stage_copy(txn, memory_id, digests[memory_id], data)
    for memory in committed.memories:
        if memory.id in removed:
            txn.delete(memory.delta)
    for memory in ledger.memories:
        if memory.id not in digests and memory.id not in removed:
            digest = _carried_digest(txn, memory, manifest)
            if digest:
                digests[memory.id] = digest
    if adapter_files:
        if ledger.adapter is None:
            raise ValueError("commit writes adapter files, but the ledger names no adapter")
        for name, blob in adapter_files.items():
            txn.write(f"{ledger.adapter.path}/{name}", blob)
    data = ledger.to_json().encode()
    adapter = ledger.adapter.path if ledger.adapter else None
    new = Manifest(newest_generation(root) + 1, sha256(data), digests, adapter)
    txn.write(ledger_name(new.generation), data)
    txn.write(manifest_name(new.generation), new.to_json())
    txn.write(LEDGER, data)
    # A forget (an entry gone from the ledger) drops every older generation, so that the
    # forgotten text and weights leave the folder with this commit.
    forgotten = {m.id for m in committed.memories} - {m.id for m in ledger.memories}
    older = [] if forgotten else manifests(root)[0][: KEEP - 1]
    for name in rotated_out(root, [new, *older]):
        txn.delete(name)
    return new


def _carried_digest(txn: Transaction, memory: Memory, manifest: Manifest | None) -> str | None:
    """The checksum of an unchanged memory's delta, backing it up if no copy exists yet."""
    digest = manifest.deltas.get(memory.id) if manifest else None
    if digest and (txn.root / delta_copy_name(memory.id, digest)).exists():
        return digest
    try:
        data = (txn.root / memory.delta).read_bytes()
    except FileNotFoundError:
        return digest
    if digest is None or sha256(data) == digest:
        digest = sha256(data)
        _stage_copy(txn, memory.id, digest, data)
    return digest


def _stage_copy(txn: Transaction, memory_id: str, digest: str, data: bytes) -> None:
    name = delta_copy_name(memory_id, digest)
    if not (txn.root / name).exists():
        txn.write(name, data)
