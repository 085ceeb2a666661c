"""Backends: everything specific to an array library, behind one small interface.

The engine (ledger, MEMIT algebra, sleep, CLI, app) talks to a model only through
:class:`Backend`; arrays cross the boundary as float32/float64 NumPy arrays so that the
algebra and the state format are written once for torch and MLX alike.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # annotations only: the backends never import the engine's modules
    from sleeptui.adapter import Adapter, LoraSettings


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know about a loaded model."""

    arch: str
    n_layers: int
    d_model: int
    d_ff: int
    vocab_size: int
    source: str


@dataclass(frozen=True)
class Rendering:
    """One tokenised context of a fact used to optimise v*.

    Attributes:
        ids: Token ids of the whole sequence, targets included (teacher forcing).
        subject_positions: Where the subject's last token stands; δ is added there.
        target_positions: Positions of the tokens whose log-probability is maximised.
        inner_positions: The subject's other tokens (all but the last of each occurrence),
            whose keys an edit can hold so that it leaves the name itself alone.
    """

    ids: tuple[int, ...]
    subject_positions: tuple[int, ...]
    target_positions: tuple[int, ...]
    inner_positions: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShiftProblem:
    """The v* optimisation of eq. 1 for one fact, at the output of ``layer``.

    Attributes:
        layer: Decoder layer at whose output δ is added (the last edit layer).
        renderings: Contexts whose targets must become likely.
        kl_renderings: Contexts (subject's last token at the end) whose next-token
            distribution must stay as it was: the KL term.
        shares: Each rendering's share of the target NLL, summing to 1; empty: equal
            shares. A rendering's share is spread evenly over its target tokens.
        metric: The residual stream's sensitivity M (d_model × d_model, mean eigenvalue 1,
            ``covariance.sensitivity``), with which ``cfg.fisher_decay`` · δᵀMδ / ‖h‖² is
            added to the objective; None: no such term.
    """

    layer: int
    renderings: tuple[Rendering, ...]
    kl_renderings: tuple[Rendering, ...]
    shares: tuple[float, ...] = ()
    metric: np.ndarray | None = field(default=None, compare=False, repr=False)

    def token_weights(self) -> list[float]:
        """The weight of each target token in the NLL, renderings in order."""
        shares = self.shares or (1.0 / len(self.renderings),) * len(self.renderings)
        return [
            share / len(r.target_positions)
            for r, share in zip(self.renderings, shares, strict=True)
            for _ in r.target_positions
        ]


@dataclass(frozen=True)
class ShiftResult:
    """δ and how the optimisation went."""

    delta: np.ndarray  # (d_model,)
    loss: float
    steps: int


@dataclass
class ProbeResume:
    """Lets successive probes of one batch start at the lowest layer changed since the last.

    A probe given this object keeps the residual stream at the input of every layer it ran
    (``inputs``, the backend's own). Before the next probe of the *same* batch, the caller
    reports each layer whose weights it has changed; the next probe then restarts from the
    kept input of the lowest such layer instead of from the embeddings. A MEMIT write probes
    after each layer's edit, so the layers below it are not run again.
    """

    inputs: dict[Any, Any] = field(default_factory=dict)
    clean: int = 0  # layers below this are as they were when ``inputs`` were kept

    def changed(self, layer: int) -> None:
        """``layer``'s weights have changed since the last probe."""
        self.clean = min(self.clean, layer)

    def start(self, key_layers: Sequence[int], hidden_layer: int | None) -> int:
        """The first layer a probe must run: none below what changed, nor below what it reads."""
        reads = [*key_layers, *([hidden_layer] if hidden_layer is not None else [])]
        return min(self.clean, *reads)


class Backend(Protocol):
    """The small interface every backend implements."""

    name: str
    info: ModelInfo

    @property
    def numerics(self) -> str:
        """The device and precision the model runs in, e.g. "cpu-float32": a measured
        perplexity depends on it as well as on the weights."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped."""
        ...

    def chat_text(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's chat template applied, ending with the assistant's turn header."""
        ...

    def stream(
        self, ids: Sequence[int], max_new_tokens: int, stop: threading.Event | None = None
    ) -> Generator[str, None, None]:
        """Greedy generation, yielding text pieces as they are decoded; ``stop`` ends it."""
        ...

    def greedy(
        self,
        batch: Sequence[Sequence[int]],
        max_new_tokens: int,
        until: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        """Greedy continuations of several prompts at once (audits, benchmarks).

        With ``until``, row i ends as soon as its text :func:`says` ``until[i]``: a recall
        check needs no more, and its verdict is the one the whole continuation would give.
        The other rows decode exactly as they would have.
        """
        ...

    def probe(
        self,
        batch: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        key_layers: Sequence[int],
        hidden_layer: int | None,
        resume: ProbeResume | None = None,
    ) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
        """One forward pass: down_proj inputs (keys) and the residual stream at positions.

        Returns ``({layer: (n_positions_total, d_ff)}, (n_positions_total, d_model) or None)``,
        rows in the order of ``positions`` flattened. With ``resume`` (always with the same
        batch and positions), the pass starts where :meth:`ProbeResume.start` says.
        """
        ...

    def optimise_shift(self, problem: ShiftProblem, cfg: object) -> ShiftResult:
        """Find δ minimising eq. 1 (target NLL + λ_KL·KL + weight decay)."""
        ...

    def residual_fisher(
        self, rows: Sequence[Sequence[int]], layers: Sequence[int]
    ) -> dict[int, np.ndarray]:
        """Per layer, E[g gᵀ] (d_model × d_model, float64) over the tokens of ``rows``, with g
        the gradient of the row's summed next-token NLL with respect to the layer's output."""
        ...

    def weight(self, layer: int) -> np.ndarray:
        """A copy of the current float32 down_proj weight of ``layer`` (d_model × d_ff)."""
        ...

    def add_low_rank(self, layer: int, u: np.ndarray, v: np.ndarray, scale: float) -> None:
        """W_layer += scale · u @ v, with u (d_model × r), v (r × d_ff)."""
        ...

    def set_weight(self, layer: int, w: np.ndarray) -> None:
        """Replace the down_proj weight of ``layer`` (rollback, swapping in a sleep's result)."""
        ...

    def params(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Float32 copies of any linear weights, by Hugging Face name (adapters, rollback)."""
        ...

    def set_params(self, weights: dict[str, np.ndarray]) -> None:
        """Replace linear weights by name (a consolidation's rollback and commit)."""
        ...

    def add_low_rank_to(self, name: str, u: np.ndarray, v: np.ndarray, scale: float) -> None:
        """W_name += scale · u @ v for any linear weight (how a LoRA adapter is applied)."""
        ...

    def train_lora(
        self,
        examples: Sequence[Rendering],
        settings: LoraSettings,
        init: Adapter | None = None,
        progress: Callable[[int, int, float], None] | None = None,
        cancel: threading.Event | None = None,
        anchor: Sequence[Rendering] = (),
    ) -> Adapter:
        """Train a LoRA adapter (peft) on the examples' target tokens, holding the model's
        next-token distribution on ``anchor``'s target positions to what it was before (KL);
        the model is left as it was. Returns a :class:`sleeptui.adapter.Adapter` (``init``
        warm-starts it)."""
        ...

    def to_device(self, a: np.ndarray, layer: int) -> Any:
        """``a`` as a float64 array where the MEMIT algebra of ``layer`` runs best: a NumPy
        array on the CPU, or a tensor on the GPU that holds the layer (see sleeptui.memit)."""
        ...

    def clone(self) -> Backend | None:
        """An independent copy of the model for sleep to work on, or None when the model is
        too large to copy (then sleep works in place and replies wait for it)."""
        ...

    def nll(self, texts: Sequence[str]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over ``texts`` and the token count."""
        ...

    def sample(self, seeds: Sequence[str], max_new_tokens: int, seed: int) -> list[list[int]]:
        """Temperature-1 samples continuing each seed text, reproducible for ``seed``."""
        ...


def down_proj_name(layer: int) -> str:
    """The Hugging Face parameter name of a layer's MLP down-projection (the state format's key)."""
    return f"model.layers.{layer}.mlp.down_proj.weight"


BACKENDS = ("torch", "mlx")


def publish_folder(tmp: Path, folder: Path) -> None:
    """Move a cache folder written in ``tmp`` to ``folder`` at once. If another process (a
    second sleeptui starting at the same time) published it first, theirs is kept: it holds
    the same conversion."""
    try:
        tmp.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def says(text: str, target: str) -> bool:
    """Whether ``text`` contains ``target``, ignoring case: how recall is judged."""
    return target.lower() in text.lower()


def cut_at(row: list[int], stops: frozenset[int]) -> list[int]:
    """``row`` up to its first stop token."""
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


class Ends:
    """Where each row of a batched greedy decode ends: at a stop token, or once its text
    :func:`says` its target (rows with no target end only at a stop token)."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stops: frozenset[int],
        until: Sequence[str | None] | None,
        rows: int,
    ) -> None:
        self.decode = decode
        self.stops = stops
        self.until = list(until) if until is not None else [None] * rows
        if len(self.until) != rows:
            raise ValueError(f"{len(self.until)} targets for {rows} rows")
        self.lengths: list[int | None] = [None] * rows

    def said(self, i: int, row: list[int]) -> bool:
        """Whether row ``i`` (its new tokens so far) has said its target; notes where."""
        target = self.until[i]
        if self.lengths[i] is None and target is not None:
            kept = cut_at(row, self.stops)
            if len(kept) == len(row) and says(self.decode(kept), target):
                self.lengths[i] = len(row)
        return self.lengths[i] is not None

    def cut(self, i: int, row: list[int]) -> list[int]:
        """Row ``i``'s tokens up to where it ended."""
        n = self.lengths[i]
        return cut_at(row if n is None else row[:n], self.stops)
