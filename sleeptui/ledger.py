"""The ledger: one entry per memory, ever; the versioned JSON document of ``state_schema/``."""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from sleeptui.errors import StateError
from sleeptui.facts import Fact
from sleeptui.state_schema.upgrades import upgrade

SCHEMA_VERSION = 3
"""The ledger schema this version writes; older ones are upgraded when read."""
IDENTIFIER = re.compile(r"[A-Za-z0-9_-]{1,64}")
DELTA_PATH = re.compile(r"deltas/[A-Za-z0-9_-]{1,64}\.safetensors")
ADAPTER_PATH = re.compile(r"adapters/[0-9a-f]{16}")
SHA256 = re.compile(r"[0-9a-f]{64}")
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")
STAGES = ("wake", "consolidating", "consolidated")


class SchemaTooNew(StateError):
    """The ledger was written by a newer sleeptui; it is refused, never rewritten."""


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

    @property
    def written_at(self) -> str:
        """When its delta was last solved: its creation, or the latest refresh."""
        writes = [e.at for e in self.events if e.kind in ("remembered", "refreshed")]
        return max([self.created_at, *writes])

    def with_event(self, kind: str, **detail: Any) -> Memory:
        return replace(self, events=(*self.events, Event(now(), kind, detail)))

    @classmethod
    def new(cls, fact: Fact, memory_id: str | None = None, **detail: Any) -> Memory:
        """A memory of ``fact``, its first event "remembered" (with ``detail``)."""
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
        ).with_event("remembered", **detail)


@dataclass(frozen=True)
class AdapterRecord:
    """The LoRA adapter that consolidation trained, in peft's format.

    Attributes:
        path: Its folder, ``adapters/<16 hex digits of its weights' SHA-256>``.
        files: SHA-256 of each of its two files, by name.
        facts: Ids of the memories it was trained to hold.
        trained_at: When it was trained.
    """

    path: str
    files: dict[str, str]
    facts: tuple[str, ...]
    trained_at: str


@dataclass(frozen=True)
class Ledger:
    """The whole ledger document.

    Attributes:
        last_sleep_at: When the last sleep cycle committed (None before the first).
        ppl_base: The unedited model's perplexity of the held-out reference text (no memory,
            no adapter), recorded at each write and sleep. A record for readers of the
            folder: the engine measures drift against the value it caches per model,
            device, precision and version of the reference text (``Engine.base_perplexity``),
            so a folder written on another machine or with another text is not misread.
        adapter: The consolidation adapter, once one has been trained.
    """

    fingerprint: str
    model: str
    memories: tuple[Memory, ...] = ()
    last_sleep_at: str | None = None
    ppl_base: float | None = None
    adapter: AdapterRecord | None = None

    def get(self, memory_id: str) -> Memory | None:
        return next((m for m in self.memories if m.id == memory_id), None)

    def upsert(self, memory: Memory) -> Ledger:
        """Replace the entry with the same id in place, or append a new one."""
        if self.get(memory.id) is None:
            return replace(self, memories=(*self.memories, memory))
        return replace(
            self, memories=tuple(memory if m.id == memory.id else m for m in self.memories)
        )

    def without(self, ids: set[str]) -> Ledger:
        return replace(self, memories=tuple(m for m in self.memories if m.id not in ids))

    def to_json(self) -> str:
        doc = {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "last_sleep_at": self.last_sleep_at,
            "ppl_base": self.ppl_base,
            "adapter": asdict(self.adapter) if self.adapter else None,
            "memories": [asdict(m) for m in self.memories],
        }
        return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "ledger.json") -> Ledger:
        """Parse and validate a ledger document, upgrading an older schema version.

        Raises:
            SchemaTooNew: the document was written by a newer sleeptui.
            StateError: naming ``source`` and what is wrong with it; nothing else, whatever
                ``text`` holds.
        """
        try:
            doc = json.loads(text, parse_constant=_not_a_number)
        except json.JSONDecodeError as e:
            raise StateError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}).") from e
        except (ValueError, RecursionError) as e:  # NaN, bad UTF-8, 5000 digits, deep nesting
            raise StateError(f"{source} is not valid JSON ({e or type(e).__name__}).") from e
        if not isinstance(doc, dict) or "schema_version" not in doc:
            raise StateError(f"{source} is not a sleeptui ledger (no schema_version).")
        version = doc["schema_version"]
        if type(version) is not int or version < 1:
            raise StateError(f"{source} has no valid schema_version ({version!r}).")
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{source} was written by a newer sleeptui (ledger schema {version}; this "
                f"version reads up to {SCHEMA_VERSION}). Upgrade sleeptui to open it; "
                "nothing was changed."
            )
        try:
            doc = upgrade(doc, to=SCHEMA_VERSION)
            memories = tuple(_memory(m) for m in _list(doc["memories"]))
            ledger = cls(
                fingerprint=_fingerprint(doc["fingerprint"]),
                model=_text(doc["model"]),
                memories=memories,
                last_sleep_at=_optional(doc.get("last_sleep_at"), _text),
                ppl_base=_optional(doc.get("ppl_base"), _number),
                adapter=_optional(doc.get("adapter"), _adapter),
            )
        except (KeyError, TypeError, ValueError) as e:
            what = f"the field {e.args[0]!r} is missing" if isinstance(e, KeyError) else str(e)
            raise StateError(f"{source} has a malformed entry: {what}.") from e
        ids = [m.id for m in memories]
        if len(ids) != len(set(ids)):
            raise StateError(f"{source} lists the same memory id twice.")
        deltas = [m.delta for m in memories]
        if len(deltas) != len(set(deltas)):
            raise StateError(f"{source} gives two memories the same delta file.")
        return ledger


def _memory(d: Any) -> Memory:
    if not isinstance(d, dict):
        raise TypeError(f"a memory must be an object, got {type(d).__name__}")
    memory = Memory(
        id=_identifier(d["id"]),
        subject=_text(d["subject"]),
        relation=_text(d["relation"]),
        object=_text(d["object"]),
        prompt=_text(d["prompt"]),
        questions=tuple(_text(q) for q in _list(d["questions"])),
        delta=_safe_relative(d["delta"]),
        created_at=_text(d["created_at"]),
        stage=_text(d.get("stage", "wake")),
        scale=_number(d.get("scale", 1.0)),
        degraded=_flag(d.get("degraded", False)),
        last_recall=_optional(d.get("last_recall"), _recall),
        events=tuple(_event(e) for e in _list(d.get("events", []))),
    )
    if memory.stage not in STAGES:
        raise ValueError(f"unknown stage {memory.stage!r}")
    if not 0 <= memory.scale <= 1:
        raise ValueError(f"scale {memory.scale} of {memory.id} is not between 0 and 1")
    return memory


def _adapter(d: Any) -> AdapterRecord:
    if not isinstance(d, dict):
        raise TypeError(f"adapter must be an object, got {type(d).__name__}")
    files = d["files"]
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and SHA256.fullmatch(v) for k, v in files.items()
    ):
        raise ValueError("the adapter's files must map names to SHA-256 checksums")
    from sleeptui.adapter import FILES

    if sorted(files) != sorted(FILES):
        raise ValueError(f"the adapter must list exactly the files {', '.join(FILES)}")
    path = _text(d["path"])
    if not ADAPTER_PATH.fullmatch(path):
        raise ValueError(f"adapter path {path!r} is not adapters/<16 hex digits>")
    return AdapterRecord(
        path=path,
        files=dict(files),
        facts=tuple(_identifier(i) for i in _list(d["facts"])),
        trained_at=_text(d["trained_at"]),
    )


def _recall(d: Any) -> Recall:
    if not isinstance(d, dict):
        raise TypeError(f"last_recall must be an object, got {type(d).__name__}")
    return Recall(at=_text(d["at"]), completion=_flag(d["completion"]), chat=_flag(d["chat"]))


def _event(d: Any) -> Event:
    if not isinstance(d, dict):
        raise TypeError(f"an event must be an object, got {type(d).__name__}")
    detail = d.get("detail", {})
    if not isinstance(detail, dict):
        raise TypeError(f"an event's detail must be an object, got {type(detail).__name__}")
    return Event(at=_text(d["at"]), kind=_text(d["kind"]), detail=detail)


def _not_a_number(name: str) -> None:
    raise ValueError(f"{name} is not a number in JSON")


def _optional(value: Any, parse: Callable[[Any], T]) -> T | None:
    return None if value is None else parse(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError as e:
        raise ValueError("a number too large for a float") from e
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {number}")
    return number


def _fingerprint(value: Any) -> str:
    if not FINGERPRINT.fullmatch(_text(value)):
        raise ValueError("the fingerprint is not 64 lowercase hex digits")
    return value


def _identifier(value: Any) -> str:
    """A memory id; it names files (``deltas/<id>.safetensors``), so it is kept plain."""
    if not IDENTIFIER.fullmatch(_text(value)):
        raise ValueError(f"memory id {value!r} is not letters, digits, '_' and '-'")
    return value


def _safe_relative(value: Any) -> str:
    """A delta path must stay inside the state folder: ``deltas/<name>.safetensors``."""
    if not DELTA_PATH.fullmatch(_text(value)):
        raise ValueError(f"delta path {value!r} points outside the state folder's deltas/")
    return value
