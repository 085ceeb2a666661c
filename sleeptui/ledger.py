"""The ledger: one entry per memory, ever; the versioned JSON document of ``state_schema/``."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from sleeptui.errors import StateError
from sleeptui.facts import Fact

SCHEMA_VERSION = 1
STAGES = ("wake", "consolidating", "consolidated")


def now() -> str:
    """An ISO-8601 UTC timestamp, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def new_id() -> str:
    return "m" + secrets.token_hex(5)


@dataclass(frozen=True)
class Event:
    """Something that happened to a memory (remembered, audited, refreshed, ...)."""

    at: str
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recall:
    """The last measured recall of a memory."""

    at: str
    completion: bool
    chat: bool


@dataclass(frozen=True)
class Memory:
    """One remembered fact and where its weights live.

    Attributes:
        id: Stable identifier; a refresh keeps it.
        stage: ``wake`` (held by MEMIT), ``consolidating`` or ``consolidated`` (LoRA).
        scale: The factor on its delta in W = W_base + Σ scale · u @ v.
        delta: Path of its delta file, relative to the state folder.
        degraded: The last audit found it no longer recalled.
    """

    id: str
    subject: str
    relation: str
    object: str
    prompt: str
    questions: tuple[str, ...]
    delta: str
    created_at: str
    stage: str = "wake"
    scale: float = 1.0
    degraded: bool = False
    last_recall: Recall | None = None
    events: tuple[Event, ...] = ()

    @property
    def fact(self) -> Fact:
        return Fact(self.subject, self.relation, self.object, self.prompt, self.questions)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.object}"

    def with_event(self, kind: str, **detail: Any) -> Memory:
        return replace(self, events=(*self.events, Event(now(), kind, detail)))

    @classmethod
    def new(cls, fact: Fact, memory_id: str | None = None) -> Memory:
        mid = memory_id or new_id()
        return cls(
            id=mid,
            subject=fact.subject,
            relation=fact.relation,
            object=fact.object,
            prompt=fact.prompt,
            questions=tuple(fact.questions),
            delta=f"deltas/{mid}.safetensors",
            created_at=now(),
        ).with_event("remembered")


@dataclass(frozen=True)
class Ledger:
    """The whole ledger document."""

    fingerprint: str
    model: str
    memories: tuple[Memory, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def get(self, memory_id: str) -> Memory | None:
        return next((m for m in self.memories if m.id == memory_id), None)

    def upsert(self, memory: Memory) -> Ledger:
        """Replace the entry with the same id in place, or append a new one."""
        if self.get(memory.id) is None:
            return replace(self, memories=(*self.memories, memory))
        return replace(self, memories=tuple(memory if m.id == memory.id else m for m in self.memories))

    def without(self, ids: set[str]) -> Ledger:
        return replace(self, memories=tuple(m for m in self.memories if m.id not in ids))

    def to_json(self) -> str:
        doc = {
            "schema_version": self.schema_version,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "memories": [asdict(m) for m in self.memories],
        }
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "ledger.json") -> Ledger:
        """Parse and validate a ledger document.

        Raises:
            StateError: naming ``source`` and what is wrong with it.
        """
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise StateError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}).") from e
        if not isinstance(doc, dict) or "schema_version" not in doc:
            raise StateError(f"{source} is not a sleeptui ledger (no schema_version).")
        version = doc["schema_version"]
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise StateError(
                f"{source} was written by a newer sleeptui (ledger schema {version}; this "
                f"version reads up to {SCHEMA_VERSION}). Upgrade sleeptui to open it."
            )
        try:
            memories = tuple(_memory(m) for m in doc["memories"])
            ledger = cls(
                fingerprint=str(doc["fingerprint"]),
                model=str(doc["model"]),
                memories=memories,
                schema_version=version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{source} has a malformed entry ({e!r}).") from e
        ids = [m.id for m in memories]
        if len(ids) != len(set(ids)):
            raise StateError(f"{source} lists the same memory id twice.")
        return ledger


def _memory(d: dict[str, Any]) -> Memory:
    recall = d.get("last_recall")
    memory = Memory(
        id=_text(d["id"]),
        subject=_text(d["subject"]),
        relation=_text(d["relation"]),
        object=_text(d["object"]),
        prompt=_text(d["prompt"]),
        questions=tuple(_text(q) for q in d["questions"]),
        delta=_safe_relative(d["delta"]),
        created_at=_text(d["created_at"]),
        stage=_text(d.get("stage", "wake")),
        scale=float(d.get("scale", 1.0)),
        degraded=bool(d.get("degraded", False)),
        last_recall=Recall(**recall) if recall else None,
        events=tuple(Event(**e) for e in d.get("events", ())),
    )
    if memory.stage not in STAGES:
        raise ValueError(f"unknown stage {memory.stage!r}")
    return memory


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _safe_relative(value: Any) -> str:
    """A delta path must stay inside the state folder."""
    path = PurePosixPath(_text(value))
    if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != "deltas":
        raise ValueError(f"delta path {value!r} points outside the state folder's deltas/")
    return str(path)
