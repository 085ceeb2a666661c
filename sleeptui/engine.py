"""The engine: a loaded model, its state folder and the operations on memories.

Everything the CLI and the app do goes through :class:`Engine`; it never imports Textual.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from sleeptui import covariance, memit
from sleeptui.backends import Backend
from sleeptui.facts import Fact
from sleeptui.ledger import Ledger, Memory, Recall, now
from sleeptui.models import ModelSource, default_layers, resolve
from sleeptui.paths import cache_dir, state_dir
from sleeptui.presets import EditConfig
from sleeptui.state import Shapes, StateFolder
from sleeptui.wake import Editor, Keys

Progress = Callable[[str, int, int], None]
ANSWER_TOKENS = 200
RECALL_TOKENS = 12
CHAT_RECALL_TOKENS = 32


def load_backend(source: ModelSource, backend: str = "auto", device: str = "auto") -> Backend:
    """Load the weights with the chosen backend (``auto``: torch here; MLX on Apple silicon)."""
    from sleeptui.backends.torch_backend import TorchBackend

    if backend not in ("auto", "torch"):
        from sleeptui.errors import SleeptuiError

        raise SleeptuiError(f"The {backend} backend is not available in this build; use --backend torch.")
    if source.is_gguf:
        return TorchBackend.from_gguf(source.path, cache_dir(), device=device)
    return TorchBackend.from_folder(source.path, device=device)


def fingerprint(backend: Backend) -> str:
    """A backend-independent identity of the base model: shapes plus rounded base weights."""
    info = backend.info
    h = hashlib.sha256(
        f"{info.arch}:{info.n_layers}:{info.d_model}:{info.d_ff}:{info.vocab_size}".encode()
    )
    for layer in (0, info.n_layers - 1):
        sample = backend.weight(layer)[:16, :64].astype(np.float64)
        h.update(np.round(sample, 3).tobytes())
    return h.hexdigest()


class Engine:
    """A model with its memories applied."""

    def __init__(
        self, backend: Backend, source: ModelSource, folder: StateFolder, progress: Progress | None = None
    ) -> None:
        self.backend = backend
        self.source = source
        self.folder = folder
        self.progress = progress
        layers = source.preset.edit.layers or default_layers(backend.info.n_layers)
        self.cfg: EditConfig = replace(source.preset.edit, layers=layers)
        self.fingerprint = fingerprint(backend)
        self.shapes = Shapes(backend.info.d_model, backend.info.d_ff, backend.info.n_layers)
        self.ledger: Ledger = folder.ledger(self.fingerprint, source.preset.name)
        self._factors: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self._keys: dict[str, Keys] = {}
        self._editor: Editor | None = None
        self._apply_all()

    @classmethod
    def open(
        cls,
        model: str | None = None,
        state: str | Path | None = None,
        backend: str = "auto",
        read_only: bool = False,
        progress: Progress | None = None,
    ) -> Engine:
        source = resolve(model)
        folder = StateFolder.open(state_dir(state), read_only=read_only)
        try:
            return cls(load_backend(source, backend), source, folder, progress)
        except BaseException:
            folder.close()
            raise

    def close(self) -> None:
        self.folder.close()

    # -- memories ------------------------------------------------------------------

    @property
    def memories(self) -> tuple[Memory, ...]:
        return self.ledger.memories

    def remember(self, facts: Sequence[Fact], batch: bool = False) -> list[Memory]:
        """Write facts into the weights (one at a time, or together) and commit each."""
        groups = [list(facts)] if batch else [[f] for f in facts]
        written = []
        for n, group in enumerate(groups):
            self._step("wake", n, len(groups))
            written += self._write(group)
        self._step("wake", len(groups), len(groups))
        return written

    def _write(self, facts: list[Fact]) -> list[Memory]:
        editor = self.editor()
        constraints = self._constraint_keys() if self.cfg.constrain_wake else []
        edits = editor.write(facts, constraints)
        memories = [Memory.new(e.fact) for e in edits]
        ledger = self.ledger
        for memory in memories:
            ledger = ledger.upsert(memory)
        writes = {m.id: e.factors for m, e in zip(memories, edits, strict=True)}
        try:
            self.folder.commit(ledger, writes)
        except BaseException:
            for e in edits:  # the weights go back to the committed state
                for layer, (u, v) in e.factors.items():
                    self.backend.add_low_rank(layer, u, v, -1.0)
            raise
        self.ledger = ledger
        for m, e in zip(memories, edits, strict=True):
            self._factors[m.id] = e.factors
            self._keys[m.id] = e.keys
        return memories

    def check(self, memories: Sequence[Memory]) -> list[Recall]:
        """Measure recall now: the object in the greedy completion and in the chat answer."""
        if not memories:
            return []
        b = self.backend
        comp = b.greedy([b.encode(m.prompt) for m in memories], RECALL_TOKENS)
        chat = b.greedy([b.encode(self.chat_prompt(m.questions[0] if m.questions else m.prompt)) for m in memories], CHAT_RECALL_TOKENS)
        at = now()
        return [
            Recall(at=at, completion=_says(b.decode(c), m.object), chat=_says(b.decode(a), m.object))
            for m, c, a in zip(memories, comp, chat, strict=True)
        ]

    # -- talking -------------------------------------------------------------------

    def chat_prompt(self, question: str, history: Sequence[dict[str, str]] = ()) -> str:
        return self.backend.chat_text([*history, {"role": "user", "content": question}])

    def ask(
        self, question: str, history: Sequence[dict[str, str]] = (), stop: threading.Event | None = None
    ) -> Iterator[str]:
        """Stream the chat answer; nothing about the memories is put into the prompt."""
        ids = self.backend.encode(self.chat_prompt(question, history))
        return self.backend.stream(ids, ANSWER_TOKENS, stop)

    def complete(self, prompt: str, max_new_tokens: int = 24) -> str:
        out = self.backend.greedy([self.backend.encode(prompt)], max_new_tokens)[0]
        return self.backend.decode(out)

    # -- internals -------------------------------------------------------------------

    def editor(self) -> Editor:
        """The MEMIT editor; the first call loads (or samples and caches) the covariance."""
        if self._editor is None:
            cov = covariance.load_or_compute(
                self.backend,
                self.cfg.layers,
                self.cfg.cov_tokens,
                cache_dir(),
                self.fingerprint,
                progress=lambda i, n: self._step("covariance", i, n),
            )
            c_inv = {layer: memit.inverse_covariance(c) for layer, c in cov.items()}
            self._editor = Editor(self.backend, self.cfg, c_inv)
        return self._editor

    def _constraint_keys(self) -> list[Keys]:
        missing = [m for m in self.memories if m.id not in self._keys and m.scale > 0]
        if missing:
            for m, keys in zip(missing, self.editor().keys([m.fact for m in missing]), strict=True):
                self._keys[m.id] = keys
        return [self._keys[m.id] for m in self.memories if m.id in self._keys and m.scale > 0]

    def _apply_all(self) -> None:
        """W = W_base + Σ scale · u @ v over the ledger's memories, in one pass at start-up."""
        for n, memory in enumerate(self.memories):
            self._step("load", n, len(self.memories))
            factors = self.folder.read_delta(memory, self.shapes)
            self._factors[memory.id] = factors
            for layer, (u, v) in factors.items():
                self.backend.add_low_rank(layer, u, v, memory.scale)

    def _step(self, stage: str, i: int, n: int) -> None:
        if self.progress:
            self.progress(stage, i, n)


def _says(text: str, obj: str) -> bool:
    return obj.lower() in text.lower()
