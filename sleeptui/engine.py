"""The engine: a loaded model, its state folder and the operations on memories.

Everything the CLI and the app do goes through :class:`Engine`; it never imports Textual.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from sleeptui import consolidate, covariance, memit
from sleeptui.adapter import Adapter, LoraSettings
from sleeptui.backends import Backend
from sleeptui.backends import says as _says
from sleeptui.extract import USER_SUBJECT
from sleeptui.facts import Fact
from sleeptui.ledger import Ledger, Memory, Recall, now
from sleeptui.models import ModelSource, default_layers, default_lora_layers, resolve
from sleeptui.paths import cache_dir, state_dir, write_cache_file
from sleeptui.presets import EditConfig, SleepConfig
from sleeptui.sleep import Pressure, SleepReport, pressure, run_cycle
from sleeptui.state import Shapes, StateFolder
from sleeptui.wake import Editor, Keys, WakeEdit

Progress = Callable[[str, int, int], None]
LOOP_SPAN = 16  # characters: "ha ha ha" is speech, a sentence said three times is a loop
LOOP_TIMES = 3
ANSWER_TOKENS = 200
RECALL_TOKENS = 12
RETRAIN_ROUNDS = 3
CHAT_RECALL_TOKENS = 32


def load_backend(
    source: ModelSource, backend: str = "auto", device: str = "auto", four_bit: bool | None = None
) -> Backend:
    """Load the weights with the chosen backend (``auto``: MLX on Apple silicon, else torch).

    ``four_bit``: bitsandbytes NF4 for the torch backend; None follows the preset, which asks
    for it only where CUDA is present (the 70B preset). MLX models are quantised as stored.
    """
    from sleeptui.errors import SleeptuiError

    if backend == "auto":
        backend = "mlx" if on_apple_silicon() and _has("mlx_lm") else "torch"
    if backend == "mlx":
        if not _has("mlx_lm"):
            raise SleeptuiError(
                "The MLX backend needs mlx-lm: pip install 'sleeptui[mlx]' (on Linux it uses "
                "mlx's CPU build), or use --backend torch."
            )
        if four_bit:
            raise SleeptuiError(
                "--4bit is for the torch backend; for MLX, pass a quantised MLX model folder "
                "(e.g. an mlx-community …-4bit model) with --model."
            )
        from sleeptui.backends.mlx_backend import MLXBackend

        if source.is_gguf:
            return MLXBackend.from_gguf(source.path, cache_dir())
        return MLXBackend.from_folder(source.path)
    if backend != "torch":
        raise SleeptuiError(f"Unknown backend {backend!r}: choose auto, torch or mlx.")
    from sleeptui.backends.torch_backend import TorchBackend, cuda_available

    if four_bit is None:
        four_bit = source.preset.load_4bit and cuda_available()
    if four_bit and not _has("bitsandbytes"):
        raise SleeptuiError(
            "--4bit needs bitsandbytes: pip install 'sleeptui[cuda]', or leave out --4bit."
        )
    layers = source.preset.edit.layers
    if source.is_gguf:
        return TorchBackend.from_gguf(
            source.path, cache_dir(), device=device, edit_layers=layers, four_bit=four_bit
        )
    return TorchBackend.from_folder(
        source.path, device=device, edit_layers=layers, four_bit=four_bit
    )


def on_apple_silicon() -> bool:
    import platform
    import sys

    return sys.platform == "darwin" and platform.machine() == "arm64"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


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


@dataclass(frozen=True)
class ForgetReport:
    """What forgetting one memory did and whether the model still says its object."""

    memory: Memory
    verified: bool
    answer_after: str
    repaired: int = 0


def repeats_itself(text: str, min_span: int = LOOP_SPAN, times: int = LOOP_TIMES) -> bool:
    """Whether ``text`` ends with one span of at least ``min_span`` characters said ``times``
    times in a row: the mark of greedy decoding caught in a loop, which a small model falls
    into often and never leaves before the token limit."""
    n = len(text)
    for span in range(min_span, n // times + 1):
        tail = text[n - span :]
        if all(text[n - (k + 1) * span : n - k * span] == tail for k in range(1, times)):
            return True
    return False


class Engine:
    """A model with its memories applied."""

    def __init__(
        self,
        backend: Backend,
        source: ModelSource,
        folder: StateFolder,
        progress: Progress | None = None,
    ) -> None:
        self.backend = backend
        self.source = source
        self.folder = folder
        self.progress = progress
        layers = source.preset.edit.layers or default_layers(backend.info.n_layers)
        self.cfg: EditConfig = replace(source.preset.edit, layers=layers)
        self.sleep_cfg: SleepConfig = source.preset.sleep
        lora = source.preset.lora
        self.lora: LoraSettings = replace(
            lora, layers=lora.layers or default_lora_layers(backend.info.n_layers)
        )
        self.adapter: Adapter | None = None
        # Generation and weight swaps take _weights; mutating operations take _writer.
        self._weights = threading.RLock()
        self._writer = threading.RLock()
        # The perplexity of the weights a committed ledger describes, and that ledger (the
        # last one a sleep measured: it also gives the drift term of the pressure).
        self._measured: tuple[Ledger, float] | None = None
        self._base_ppl: float | None = None  # see base_perplexity
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
        four_bit: bool | None = None,
    ) -> Engine:
        source = resolve(model)
        folder = StateFolder.open(state_dir(state), read_only=read_only)
        try:
            loaded = load_backend(source, backend, four_bit=four_bit)
            return cls(loaded, source, folder, progress)
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
        """Write facts into the weights (one at a time, or together) and commit each.

        Facts about one subject share its keys, so one solve cannot give them different
        objects: a batch is written in rounds with at most one fact per subject each, and
        each round keeps what the earlier ones wrote (see :meth:`_write`).
        """
        groups = _rounds(facts) if batch else [[f] for f in facts]
        written = []
        with self._writer:
            if self.ledger.ppl_base != (base := self.base_perplexity()):
                self.ledger = replace(self.ledger, ppl_base=base)
            for n, group in enumerate(groups):
                self._step("wake", n, len(groups))
                with self._weights:
                    written += self._write(group)
            self._step("wake", len(groups), len(groups))
        return written

    def _write(self, facts: list[Fact]) -> list[Memory]:
        """Write one group of facts and commit it.

        Memories about the same subject as a new fact share its keys: holding them at zero
        residual would block the write, so they are left out of the constraints and v*
        keeps their answers instead (see :meth:`Editor.shift_problem`).
        """
        editor = self.editor()
        in_force = [m for m in self.memories if m.scale > 0 or m.stage == "consolidated"]
        kin = [m for m in in_force if self.kept_together(m.fact, facts)]
        others = [m for m in in_force if m.scale > 0 and m not in kin]
        constraints = self.keys_of(others) if self.cfg.constrain_wake else []
        keep = [[m.fact for m in kin if self.kept_together(m.fact, [f])] for f in facts]
        template = self.holds_template(facts)
        edits = editor.write(facts, constraints, keep=keep, hold_template=template)
        if self.cfg.retry_clamp_norm:
            written = self._retry(
                editor, edits, constraints, keep, template, self.cfg.retry_clamp_norm
            )
        else:
            written = [(e, self.cfg.clamp_norm) for e in edits]
        edits = [e for e, _ in written]
        memories = [Memory.new(e.fact, clamp=clamp) for e, clamp in written]
        ledger = self.ledger
        for memory in memories:
            ledger = ledger.upsert(memory)
        writes = {m.id: e.factors for m, e in zip(memories, edits, strict=True)}
        try:
            self.folder.commit(ledger, writes)
        except BaseException:
            for e in edits:  # the weights go back to the committed state
                self.apply_factors(e.factors, -1.0)
            raise
        self.ledger = ledger
        for m, e in zip(memories, edits, strict=True):
            self._factors[m.id] = e.factors
            self._keys[m.id] = e.keys
        return memories

    def kept_together(self, fact: Fact, others: Sequence[Fact]) -> bool:
        """Whether ``fact`` shares a subject with one of ``others`` and is kept by v* rather
        than held at zero residual (``EditConfig.hold_same_subject``)."""
        return not self.cfg.hold_same_subject and any(fact.about_same_subject(o) for o in others)

    def holds_template(self, facts: Sequence[Fact]) -> bool:
        """Whether a write of ``facts`` holds the chat template's keys (see
        ``EditConfig.hold_template``)."""
        mode = self.cfg.hold_template
        if mode != "user":
            return mode == "all"
        return any(f.subject == USER_SUBJECT for f in [*facts, *(m.fact for m in self.memories)])

    def _retry(
        self,
        editor: Editor,
        edits: list[WakeEdit],
        constraints: list[Keys],
        keep: list[list[Fact]],
        hold_template: bool,
        retry_clamp: float,
    ) -> list[tuple[WakeEdit, float]]:
        """Write again, with the larger retry clamp, the facts whose first write fell short.

        A write falls short when the weights carry less of v*'s effect than asked: the target
        NLL the edited model reaches with no shift is above ``retry_nll``. Those facts are
        reverted and rewritten together, holding the facts that took (and ``constraints``).
        Returns each fact's edit and the clamp it was written with.
        """
        cfg = self.cfg
        failed = {i for i, e in enumerate(edits) if editor.achieved(e.fact) > cfg.retry_nll}
        if not failed:
            return [(e, cfg.clamp_norm) for e in edits]
        for i in failed:
            self.apply_factors(edits[i].factors, -1.0)
        held = [e.keys for i, e in enumerate(edits) if i not in failed]
        wider = editor.with_clamp(retry_clamp)
        again = sorted(failed)
        redone = iter(
            wider.write(
                [edits[i].fact for i in again],
                [*constraints, *held],
                keep=[keep[i] for i in again],
                hold_template=hold_template,
            )
        )
        return [
            (next(redone), retry_clamp) if i in failed else (e, cfg.clamp_norm)
            for i, e in enumerate(edits)
        ]

    def check(self, memories: Sequence[Memory]) -> list[Recall]:
        """Measure recall now: the object in the greedy completion and in the chat answer."""
        if not memories:
            return []
        b = self.backend
        objects = [m.object for m in memories]
        comp = b.greedy([b.encode(m.prompt) for m in memories], RECALL_TOKENS, until=objects)
        chat = b.greedy(
            [
                b.encode(self.chat_prompt(m.questions[0] if m.questions else m.prompt))
                for m in memories
            ],
            CHAT_RECALL_TOKENS,
            until=objects,
        )
        at = now()
        return [
            Recall(
                at=at, completion=_says(b.decode(c), m.object), chat=_says(b.decode(a), m.object)
            )
            for m, c, a in zip(memories, comp, chat, strict=True)
        ]

    def completes(self, memories: Sequence[Memory]) -> list[bool]:
        """Completion recall alone (the object in the greedy completion of each prompt)."""
        if not memories:
            return []
        b = self.backend
        out = b.greedy(
            [b.encode(m.prompt) for m in memories],
            RECALL_TOKENS,
            until=[m.object for m in memories],
        )
        return [_says(b.decode(o), m.object) for m, o in zip(memories, out, strict=True)]

    def forget(self, memory_id: str) -> ForgetReport:
        """Remove one memory; see :meth:`forget_many`."""
        return self.forget_many([memory_id])[0]

    def forget_many(self, memory_ids: Sequence[str]) -> list[ForgetReport]:
        """Remove memories at any stage, in one commit, and check that they are gone.

        Each memory's delta is reverted and its entry and file dropped. If the consolidation
        adapter was trained on any of them, it is retrained from the ledger without them (its
        other facts held alone, as in a consolidation) and replaces the old one in the same
        commit. The remaining memories are audited again afterwards; any that the removal
        broke (by completion or in chat), and any whose delta holds a forgotten memory's
        answers (:meth:`_carriers`), are rewritten under constraints. Each report says
        whether the model still says that memory's object.
        """
        from sleeptui.errors import UnknownMemory

        with self._writer:
            memories = []
            for memory_id in dict.fromkeys(memory_ids):
                memory = self.ledger.get(memory_id)
                if memory is None:
                    raise UnknownMemory(
                        f"No memory has the id {memory_id!r}; see `sleeptui memories`."
                    )
                memories.append(memory)
            ids = {m.id for m in memories}
            others = tuple(m for m in consolidate.living(self.ledger) if m.id not in ids)
            before = self.check(others)
            retrain = self.ledger.adapter is not None and bool(ids & set(self.ledger.adapter.facts))
            with self._weights:
                snapshot = self.snapshot(adapter=retrain)
                try:
                    for memory in memories:
                        self.revert(memory)
                    ledger = self.ledger.without(ids)
                    files = None
                    if retrain:
                        ledger = self._retrain_adapter(ledger, memories)
                        files = self.adapter_files(self.adapter) if self.adapter else None
                    self.folder.commit(ledger, {}, removes=sorted(ids), adapter_files=files)
                except BaseException:
                    self.restore(snapshot)
                    raise
                self.ledger = ledger
                for memory_id in ids:
                    self._factors.pop(memory_id, None)
                    self._keys.pop(memory_id, None)
            after = self.check(others)
            carriers = self._carriers(others, memories)
            broken = [
                m
                for m, b, a in zip(others, before, after, strict=True)
                if (b.completion and not a.completion) or (b.chat and not a.chat) or m in carriers
            ]
            repaired = 0
            if broken:
                healthy = [m for m in others if m not in broken and m.scale > 0]
                repaired = self._repair(broken, healthy)
            reports = []
            for memory in memories:
                answer = self.complete(memory.prompt)
                chat = "".join(self.ask(memory.questions[0])) if memory.questions else ""
                said = _says(answer, memory.object) or _says(chat, memory.object)
                reports.append(
                    ForgetReport(
                        memory=memory, verified=not said, answer_after=answer, repaired=repaired
                    )
                )
            return reports

    def _carriers(self, others: Sequence[Memory], forgotten: Sequence[Memory]) -> list[Memory]:
        """The memories of ``others`` whose deltas hold answers of ``forgotten``.

        A write about a subject the model already holds facts about keeps their answers in
        its v* (:meth:`Editor.shift_problem`), so its delta says them too: reverting the
        forgotten memory alone can leave its object said. Those are the memories in force
        about a forgotten memory's subject whose delta was last written while it was there
        (timestamps are to the second: a write in the same second counts).
        """
        return [
            m
            for m in others
            if m.scale > 0
            and any(
                self.kept_together(m.fact, [f.fact]) and m.written_at >= f.created_at
                for f in forgotten
            )
        ]

    def _retrain_adapter(self, ledger: Ledger, forgotten: Sequence[Memory] = ()) -> Ledger:
        """Train the adapter afresh on the facts it held that ``ledger`` still has; the old
        one, and whatever it learnt of the others, is gone. Returns ``ledger`` naming it.

        One training from scratch may leave a few of those facts unheld, so up to
        ``RETRAIN_ROUNDS`` rounds run: each checks every kept fact as it will be served (its
        MEMIT delta at its scale beside the new adapter) and trains on, warm-started from
        the new adapter, with the facts that fail twice in the data. The new adapter never
        sees the forgotten facts, so training on from it is as clean as the first round;
        on their prompts it is held to what the model says without them, so that it cannot
        say them again by generalising from similar facts ("plays the guitar")."""
        keep = consolidate.held(replace(self.ledger, memories=ledger.memories))
        if not keep:
            self.set_adapter(None)
            return replace(ledger, adapter=None)
        general = consolidate.replay(self, self.lora.replay_samples, self.lora.seed)
        adapter: Adapter | None = None
        missing: list[Memory] = []
        for round_ in range(RETRAIN_ROUNDS):
            for m in keep:
                self.revert(m)
            self.set_adapter(None)
            adapter, _ = consolidate.train(
                self,
                keep + missing,
                general,
                self.lora.epochs,
                adapter,
                partial(self._retrain_step, round_),
                None,
                seed=self.lora.seed + round_,
                unsay=forgotten,
            )
            self.set_adapter(adapter)
            for m in keep:
                self.apply_scale(m, m.scale)
            recalls = self.check(keep)
            missing = [
                m for m, r in zip(keep, recalls, strict=True) if not (r.completion and r.chat)
            ]
            if not missing:
                break
        assert adapter is not None  # RETRAIN_ROUNDS ≥ 1
        files = self.adapter_files(adapter)
        record = consolidate.adapter_record(files, keep)
        return replace(ledger, adapter=record)

    def _repair(self, broken: list[Memory], healthy: list[Memory]) -> int:
        """Refresh memories a removal broke, protecting the healthy ones, in one commit.

        Reverting a broken memory can expose healthy ones that recalled only with its help
        (:func:`sleeptui.sleep.expose`); those are refreshed with it, first, as a sleep cycle
        does. Returns how many memories were rewritten.
        """
        from sleeptui.sleep import expose, refresh

        with self._weights:
            snapshot = self.snapshot()
            try:
                healthy, exposed = expose(self, healthy, broken)
                redo = [*exposed, *broken]
                new = refresh(self, redo, healthy, None, None)
                ledger = self.ledger
                for m in redo:
                    # The rewrite holds the fact whole again, whatever its stage was.
                    m = replace(m, scale=1.0, stage="wake")
                    ledger = ledger.upsert(m.with_event("refreshed", reason="repair after forget"))
                self.commit_cycle(ledger, new, [], snapshot)
            except BaseException:
                self.restore(snapshot)
                raise
        return len(redo)

    def sleep(
        self,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        cycle: int = 1,
    ) -> SleepReport:
        """One sleep cycle on a copy of the model; the copy's edited layers are swapped in
        when the cycle commits, so replies streamed meanwhile never see half-applied weights."""
        with self._writer:
            shadow = self._shadow()
            report = run_cycle(shadow, cycle, progress, cancel)
            if shadow is not self and not report.rolled_back:
                self._adopt(shadow)
            self._measured = shadow._measured
            return report

    def sleep_until_converged(
        self,
        max_cycles: int | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> list[SleepReport]:
        """Cycles until no memory is degraded for two cycles in a row (or ``max_cycles``)."""
        reports: list[SleepReport] = []
        for cycle in range(1, (max_cycles or self.sleep_cfg.max_cycles) + 1):
            report = self.sleep(progress, cancel, cycle)
            reports.append(report)
            if len(reports) >= 2 and reports[-1].degraded == 0 and reports[-2].degraded == 0:
                reports[-1] = replace(report, converged=True)
                break
        return reports

    def pressure(self) -> Pressure:
        return pressure(self)

    def last_ppl_drift(self) -> float:
        """Relative perplexity change from the unedited model, as last measured (0 if unknown:
        nothing measured yet, or the unedited model's perplexity is not known yet)."""
        base = self.base_perplexity(measure=False)
        if self._measured is None or base is None:
            return 0.0
        return self._measured[1] / base - 1

    # -- the engine's own weights, for sleep and forget ----------------------------------

    def snapshot(self, adapter: bool = False, layers: Iterable[int] = ()) -> dict:
        """Everything a rollback restores: the edited layers (and ``layers``), factors and
        keys, and with ``adapter`` the weights the adapter acts on."""
        names = self.adapter_weight_names() if adapter else []
        return {
            "weights": {layer: self.backend.weight(layer) for layer in {*self.cfg.layers, *layers}},
            "params": self.backend.params(names),
            "adapter": self.adapter,
            "factors": dict(self._factors),
            "keys": dict(self._keys),
            "ledger": self.ledger,
        }

    def restore(self, snapshot: dict) -> None:
        self.backend.set_params(snapshot["params"])
        for layer, w in snapshot["weights"].items():
            self.backend.set_weight(layer, w)
        self.adapter = snapshot["adapter"]
        self._factors, self._keys = dict(snapshot["factors"]), dict(snapshot["keys"])
        self.ledger = snapshot["ledger"]

    # -- the consolidation adapter ----------------------------------------------------

    def adapter_weight_names(self) -> list[str]:
        names = set(consolidate.weight_names(self.lora, self.backend.info.n_layers))
        if self.adapter is not None:
            names |= set(self.adapter.factors())
        return sorted(names)

    def set_adapter(self, adapter: Adapter | None) -> None:
        """Swap the adapter fused into the weights (None: take it out)."""
        if self.adapter is not None:
            for name, (u, v) in self.adapter.factors().items():
                self.backend.add_low_rank_to(name, u, v, -1.0)
        if adapter is not None:
            for name, (u, v) in adapter.factors().items():
                self.backend.add_low_rank_to(name, u, v, 1.0)
        self.adapter = adapter

    def apply_scale(self, memory: Memory, scale: float, current: float | None = None) -> None:
        """Move a memory's delta in the weights from ``current`` (its scale, or 0 after a
        revert when ``current`` is None and it was reverted) to ``scale``."""
        factors = self._factors.get(memory.id)
        if factors:
            self.apply_factors(factors, scale - (0.0 if current is None else current))

    def adapter_files(self, adapter: Adapter) -> dict[str, bytes]:
        base = self.source.preset.repo_id or self.source.preset.name
        return adapter.files(base, self.lora)

    def commit_consolidation(self, ledger: Ledger, adapter: Adapter | None, snapshot: dict) -> None:
        """Commit a consolidation's ledger and adapter (deltas that reached 0.0 go), or
        restore ``snapshot``."""
        gone = [
            m.id
            for m in ledger.memories
            if m.scale == 0 and (old := self.ledger.get(m.id)) is not None and old.scale > 0
        ]
        files = self.adapter_files(adapter) if adapter is not None else None
        try:
            self.folder.commit(ledger, {}, removes=gone, adapter_files=files)
        except BaseException:
            self.restore(snapshot)
            raise
        self.ledger = ledger
        for memory_id in gone:
            self._factors.pop(memory_id, None)
            self._keys.pop(memory_id, None)

    def consolidate(
        self,
        kind: str = "nap",
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        cycle: int = 1,
    ) -> consolidate.ConsolidationReport:
        """A nap (``kind="nap"``: one short pass) or a deep-sleep consolidation, on a copy of
        the model that is swapped in when it commits (see :mod:`sleeptui.consolidate`)."""
        with self._writer:
            shadow = self._shadow()
            report = consolidate.run(shadow, kind, cycle, progress, cancel)
            if shadow is not self and not report.rolled_back:
                self._adopt(shadow, shadow.adapter_weight_names())
            return report

    def _adopt(self, shadow: Engine, names: Sequence[str] = ()) -> None:
        """Take over a shadow's committed weights, ledger, factors, keys and adapter."""
        with self._weights:
            for layer in self.cfg.layers:
                self.backend.set_weight(layer, shadow.backend.weight(layer))
            self.backend.set_params(shadow.backend.params(names))
            self.ledger = shadow.ledger
            self._factors, self._keys = shadow._factors, shadow._keys
            self.adapter = shadow.adapter

    def revert(self, memory: Memory) -> None:
        """Take a memory's delta out of the weights (its factors stay known until commit)."""
        factors = self._factors.get(memory.id)
        if factors:
            self.apply_factors(factors, -memory.scale)

    def keys_of(self, memories: Sequence[Memory]) -> list[Keys]:
        """Key columns of memories (cached since they were written, else probed now)."""
        missing = [m for m in memories if m.id not in self._keys]
        if missing:
            for m, keys in zip(missing, self.editor().keys([m.fact for m in missing]), strict=True):
                self._keys[m.id] = keys
        return [self._keys[m.id] for m in memories]

    def remember_keys(self, memory_id: str, keys: Keys) -> None:
        self._keys[memory_id] = keys

    def commit_cycle(
        self, ledger: Ledger, new_factors: dict, pruned: list[str], snapshot: dict
    ) -> None:
        """Commit a sleep cycle's ledger and refreshed deltas at once, or restore ``snapshot``."""
        try:
            self.folder.commit(ledger, new_factors, removes=pruned)
        except BaseException:
            self.restore(snapshot)
            raise
        self.ledger = ledger
        self._factors.update(new_factors)
        for memory_id in pruned:
            self._factors.pop(memory_id, None)
            self._keys.pop(memory_id, None)

    def _shadow(self) -> Engine:
        """A copy of this engine on a copy of the model, or the engine itself for models
        too large to copy (then replies wait while sleep holds the weights)."""
        clone = self.backend.clone()
        if clone is None:
            return self
        shadow = copy.copy(self)
        shadow.backend = clone
        shadow._factors, shadow._keys = dict(self._factors), dict(self._keys)
        shadow._weights = threading.RLock()
        if self._editor is not None:
            shadow._editor = self._editor.on(clone, self.cfg)
        return shadow

    def apply_factors(self, factors: dict, scale: float) -> None:
        """W += scale · u @ v at each layer of ``factors``."""
        for layer, (u, v) in factors.items():
            self.backend.add_low_rank(layer, u, v, scale)

    def factors_of(self, memory: Memory) -> dict:
        """The committed factors of ``memory`` (empty if it has none)."""
        return self._factors.get(memory.id, {})

    # -- talking -------------------------------------------------------------------

    def chat_prompt(self, question: str, history: Sequence[dict[str, str]] = ()) -> str:
        return self.backend.chat_text([*history, {"role": "user", "content": question}])

    def ask(
        self,
        question: str,
        history: Sequence[dict[str, str]] = (),
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        """Stream the chat answer; nothing about the memories is put into the prompt."""
        ids = self.backend.encode(self.chat_prompt(question, history))
        pieces = self.backend.stream(ids, ANSWER_TOKENS, stop)
        said = ""
        while True:
            with self._weights:  # a reply never sees half-swapped weights
                piece = next(pieces, None)
            if piece is None:
                return
            yield piece
            said += piece
            if repeats_itself(said):  # greedy decoding has fallen into a loop
                pieces.close()
                return

    def perplexity(self) -> float:
        """Perplexity of the held-out reference text (the drift check of every change)."""
        total, count = self.backend.nll(reference_text())
        return float(np.exp(total / count))

    def base_perplexity(self, measure: bool = True) -> float | None:
        """The unedited model's :meth:`perplexity`: no memory, no adapter; what drift is
        measured against.

        It belongs to the model and the reference text, not to the state folder, so it is
        cached per model, backend, device, precision and reference text. When it is not cached it is measured
        (with ``measure``; else None), every delta and the adapter taken out for the
        measurement and the weights put back exactly.
        """
        if self._base_ppl is None:
            path = base_perplexity_path(cache_dir(), self.fingerprint, self.backend)
            self._base_ppl = _read_number(path)
            if self._base_ppl is None and measure:
                self._base_ppl = self._unedited_perplexity()
                _write_number(path, self._base_ppl)
        return self._base_ppl

    def _unedited_perplexity(self) -> float:
        with self._weights:
            active = [m for m in self.memories if m.scale > 0 and self.factors_of(m)]
            if not active and self.adapter is None:
                return self.perplexity()
            layers = {layer for m in active for layer in self.factors_of(m)}
            snapshot = self.snapshot(adapter=True, layers=layers)
            try:
                for m in active:
                    self.apply_scale(m, 0.0, m.scale)
                self.set_adapter(None)
                return self.perplexity()
            finally:
                self.restore(snapshot)

    def committed_perplexity(self) -> float:
        """:meth:`perplexity` of the weights the committed ledger describes, measured once per
        committed state: every change that is kept comes with a new ledger."""
        if self._measured is None or self._measured[0] is not self.ledger:
            self._measured = (self.ledger, self.perplexity())
        return self._measured[1]

    def note_perplexity(self, ppl: float) -> None:
        """Record ``ppl`` as measured on the weights of the ledger just committed."""
        self._measured = (self.ledger, ppl)

    def complete(self, prompt: str, max_new_tokens: int = 24) -> str:
        out = self.backend.greedy([self.backend.encode(prompt)], max_new_tokens)[0]
        return self.backend.decode(out)

    # -- internals -------------------------------------------------------------------

    def editor(self) -> Editor:
        """The MEMIT editor; the first call loads (or samples and caches) the covariance and,
        with ``fisher_decay``, the sensitivity."""
        if self._editor is None:
            cov = self.covariance()
            priors = [
                (
                    covariance.load_or_compute_prior(
                        kind, self.backend, self.cfg.layers, cache_dir(), self.fingerprint
                    ),
                    weight,
                )
                for kind, weight in self.cfg.cov_priors.items()
            ]
            c_inv = {
                layer: memit.inverse_covariance(
                    self.backend.to_device(c, layer),
                    shrink=self.cfg.cov_shrink,
                    priors=[(self.backend.to_device(p[layer], layer), w) for p, w in priors],
                )
                for layer, c in cov.items()
            }
            sensitivity = None
            if self.cfg.fisher_decay:
                sensitivity = covariance.load_or_compute_sensitivity(
                    self.backend,
                    self.cfg.layers,
                    cache_dir(),
                    self.fingerprint,
                    progress=lambda i, n: self._step("sensitivity", i, n),
                )
            self._editor = Editor(self.backend, self.cfg, c_inv, sensitivity)
        return self._editor

    def covariance(self) -> dict:
        """Ĉ per edit layer (eq. 2), unshrunk: read from the cache, or sampled and cached."""
        return covariance.load_or_compute(
            self.backend,
            self.cfg.layers,
            self.cfg.cov_tokens,
            cache_dir(),
            self.fingerprint,
            progress=lambda i, n: self._step("covariance", i, n),
        )

    def refresh_editor(self) -> Editor:
        """The editor sleep refreshes with: wake's settings, with sleep's smaller clamp on δ
        and the plain chat share (a refresh is for a memory that stopped completing; with
        ``chat_share_per_turn`` a fact's several questions would outweigh its prompts)."""
        editor = self.editor()
        cfg = replace(
            editor.cfg,
            clamp_norm=self.sleep_cfg.refresh_clamp_norm,
            chat_share_per_turn=False,
        )
        return editor.on(self.backend, cfg)

    def _apply_all(self) -> None:
        """W = W_base + Σ scale · u @ v over the ledger's memories, in one pass at start-up."""
        active = [m for m in self.memories if m.scale > 0]  # scale 0: no delta left
        for n, memory in enumerate(active):
            self._step("load", n, len(active))
            factors = self.folder.read_delta(memory, self.shapes)
            self._factors[memory.id] = factors
            self.apply_factors(factors, memory.scale)
        files = self.folder.read_adapter(self.ledger)
        record = self.ledger.adapter
        if files is not None and record is not None:
            from sleeptui.errors import StateError

            adapter = Adapter.from_files(files, str(self.folder.root / record.path))
            try:
                self.set_adapter(adapter)
            except (ValueError, RuntimeError) as e:
                raise StateError(
                    f"The adapter in {self.folder.root / record.path} does not fit "
                    f"this model ({e}); nothing was changed."
                ) from e

    def _step(self, stage: str, i: int, n: int) -> None:
        if self.progress:
            self.progress(stage, i, n)

    def _retrain_step(self, round_: int, stage: str, i: int, n: int) -> None:
        self._step(f"retrain adapter ({round_ + 1})", i, n)


def _rounds(facts: Sequence[Fact]) -> list[list[Fact]]:
    """``facts`` in order, split into groups with at most one fact per subject each."""
    rounds: list[list[Fact]] = []
    for fact in facts:
        slot = next((r for r in rounds if not any(fact.about_same_subject(f) for f in r)), None)
        if slot is None:
            rounds.append(slot := [])
        slot.append(fact)
    return rounds


def reference_text() -> list[str]:
    """Held-out paragraphs written for sleeptui, never used to fit anything: 36 paragraphs
    of everyday prose (about 3,400 tokens on the embedded model, enough to tell a 1% drift
    from noise; README "Perplexity")."""
    return [p.strip() for p in _reference().split("\n\n") if p.strip()]


@functools.cache
def _reference() -> str:
    from importlib.resources import files

    return files("sleeptui").joinpath("data/reference.txt").read_text(encoding="utf-8")


def base_perplexity_path(cache: Path, fingerprint: str, backend: Backend) -> Path:
    """Where the unedited model's perplexity is cached: per model, backend, device and
    precision (``Backend.numerics``: bf16 on a GPU and float32 on the CPU differ by more than
    a drift threshold) and version of the reference text."""
    text = hashlib.sha256(_reference().encode()).hexdigest()[:16]
    numerics = re.sub(r"[^A-Za-z0-9_.-]", "_", backend.numerics)
    return cache / "perplexity" / f"{fingerprint[:16]}-{backend.name}-{numerics}-{text}.json"


def _read_number(path: Path) -> float | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: measured again
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _write_number(path: Path, value: float) -> None:
    write_cache_file(path, lambda tmp: Path(tmp).write_text(json.dumps({"value": value})))
