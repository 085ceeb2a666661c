"""Wake edits: MEMIT for a batch of facts (keys, v*, the spread solve), one memory per fact.

The steps follow MEMIT's decomposition: keys at the subject's last token (averaged per
group of contexts), the target shift δ = v* − h at the last edit layer (eq. 1), and for
each edit layer in turn the residual's share solved against Ĉ (eqs. 3–5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from sleeptui import memit
from sleeptui.backends import Backend, ProbeResume, ShiftProblem
from sleeptui.facts import Fact
from sleeptui.presets import EditConfig
from sleeptui.renderings import FactRenderings, render

# Per memory: for each edit layer, its key columns (n_groups × d_in).
Keys = dict[int, np.ndarray]
# Per memory: for each edit layer, rank-one factors u (d_out × 1), v (1 × d_in).
Factors = dict[int, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class WakeEdit:
    """The result of writing one fact.

    Attributes:
        fact: What was written.
        factors: Its share of ΔW at each edit layer.
        keys: Its key columns at each edit layer (constraints for later edits).
        v_loss: Target NLL at the end of the v* optimisation.
        v_steps: Gradient steps the v* optimisation took.
    """

    fact: Fact
    factors: Factors
    keys: Keys
    v_loss: float
    v_steps: int


Step = Callable[[str, int, int], None]
# Chat requests after which the template's closing tokens are held (see Editor.template_keys).
TEMPLATE_REQUESTS = (
    "Hello!",
    "What is the capital of France?",
    "Write a short poem about autumn.",
    "Can you explain how a bicycle works?",
)


class Editor:
    """Writes facts into a backend's down_proj weights with MEMIT."""

    def __init__(
        self,
        backend: Backend,
        cfg: EditConfig,
        c_inv: dict[int, memit.Array],
        sensitivity: np.ndarray | None = None,
    ) -> None:
        """``sensitivity`` is M for ``cfg.fisher_decay`` (``covariance.sensitivity``)."""
        self.backend = backend
        self.cfg = cfg
        self.c_inv = c_inv
        self.sensitivity = sensitivity
        self._template: Keys | None = None

    def render(self, fact: Fact) -> FactRenderings:
        return render(
            self.backend,
            fact,
            self.cfg.prefixes,
            chat=self.cfg.chat_targets,
            chat_keys=self.cfg.chat_keys,
        )

    def template_keys(self) -> Keys:
        """Key columns at the chat template's own tokens, at every edit layer.

        Every chat turn goes through these tokens (the system prompt, the role headers), so an
        edit that moves what the model writes there moves every answer. "I live in Oslo" is
        stored about "The user", keyed at " user", which the template's "user" header
        resembles: written unheld, one such fact turned the answer to "What is the capital of
        France?" into French nonsense (``EditConfig.hold_template`` says which writes hold
        these keys). The prefix up to the user's words is the same in every chat (one column
        per token); the tokens after them are probed after a few different requests.
        """
        if self._template is None:
            rows, positions = [], []
            for i, request in enumerate(TEMPLATE_REQUESTS):
                text = self.backend.chat_text([{"role": "user", "content": request}])
                at = text.index(request)
                ids = self.backend.encode(text)
                head = self.backend.encode(text[:at])
                tail = self.backend.encode(text[at + len(request) :])
                own = list(range(len(ids) - len(tail), len(ids)))
                if i == 0 and ids[: len(head)] == head:
                    own = list(range(len(head))) + own
                rows.append(ids)
                positions.append(own)
            keys, _ = self.backend.probe(rows, positions, self.cfg.layers, None)
            self._template = {layer: k.astype(np.float64) for layer, k in keys.items()}
        return self._template

    def keys(self, facts: Sequence[Fact]) -> list[Keys]:
        """Each fact's key columns at every edit layer under the current weights."""
        if not facts:
            return []
        rendered = [self.render(f) for f in facts]
        batch, positions, labels = _key_batch(rendered)
        keys, _ = self.backend.probe(batch, positions, self.cfg.layers, None)
        return [
            {layer: _columns(keys[layer], labels, i) for layer in self.cfg.layers}
            for i in range(len(facts))
        ]

    def with_clamp(self, clamp_norm: float) -> Editor:
        """This editor with another clamp on δ (same backend, statistics and template keys)."""
        return self.on(self.backend, replace(self.cfg, clamp_norm=clamp_norm))

    def on(self, backend: Backend, cfg: EditConfig) -> Editor:
        """An editor for ``backend`` with ``cfg`` that shares this one's statistics (Ĉ⁻¹,
        M) and template keys."""
        other = Editor(backend, cfg, self.c_inv, self.sensitivity)
        other._template = self._template
        return other

    def shift_problem(
        self, r: FactRenderings, kl: bool = True, keep: Sequence[FactRenderings] = ()
    ) -> ShiftProblem:
        """The v* problem of a fact's renderings: its targets, weighted by ``chat_share``.

        ``keep`` are the renderings of facts about the same subject that the model holds
        already. Their keys are this fact's keys, so they cannot be held at zero residual
        (eq. 5) without blocking the write; instead δ is solved to keep their targets likely
        as well as to add this fact's (together they weigh as much as this fact; each by its
        bare prompt and its questions, which keeps the cost of a write from growing as fast
        with the number of facts about its subject).
        """
        targets, shares = list(r.targets), list(self._shares(r))
        for other in (k.bare() for k in keep):
            targets += other.targets
            shares += [s / len(keep) for s in self._shares(other)]
        return ShiftProblem(
            layer=self.cfg.v_layer,
            renderings=tuple(targets),
            kl_renderings=r.kl if kl else (),
            shares=tuple(shares),
            metric=self.sensitivity if self.cfg.fisher_decay else None,
        )

    def _shares(self, r: FactRenderings) -> tuple[float, ...]:
        share = self.cfg.chat_share
        n_chat = len(r.targets) - r.n_raw
        if share is not None and self.cfg.chat_share_per_turn and 0 < share < 1 and n_chat:
            # Each turn weighs what one turn alone would: share / (1 − share) times the raw
            # prompts together, so n turns take n·ρ / (1 + n·ρ) of the NLL.
            rho = n_chat * share / (1 - share)
            share = rho / (1 + rho)
        return r.shares(share) or (1 / len(r.targets),) * len(r.targets)

    def achieved(self, fact: Fact) -> float:
        """The target NLL of eq. 1 that the model reaches now with no shift (δ = 0).

        After a write this says how much of v*'s effect the spread solve carried into the
        weights: one evaluation of the v* objective, no gradient step.
        """
        problem = self.shift_problem(self.render(fact), kl=False)
        once = replace(self.cfg, v_steps=1, v_loss_stop=float("inf"), v_bf16=False)
        return self.backend.optimise_shift(problem, once).loss

    def write(
        self,
        facts: Sequence[Fact],
        constraints: Sequence[Keys] = (),
        step: Step | None = None,
        keep: Sequence[Sequence[Fact]] = (),
        hold_template: bool = False,
    ) -> list[WakeEdit]:
        """Write ``facts`` together, holding ``constraints`` at zero residual (eq. 5).

        ``keep[i]``, where given, are the facts about ``facts[i]``'s subject that the model
        holds already and must go on holding (see :meth:`shift_problem`). With
        ``hold_template`` the chat template's own keys are held too (:meth:`template_keys`).
        The backend's weights are updated in place; the returned factors are what was added.
        """
        cfg, backend = self.cfg, self.backend
        rendered = [self.render(f) for f in facts]
        shifts = []
        for i, r in enumerate(rendered):
            if step:
                step("v*", i, len(facts))
            kept = [self.render(f) for f in keep[i]] if i < len(keep) else []
            shifts.append(backend.optimise_shift(self.shift_problem(r, keep=kept), cfg))
        delta = np.stack([s.delta for s in shifts]).astype(np.float64)  # (n × d_out)

        batch, positions, labels = _key_batch(rendered, inner=cfg.hold_name)
        resume = ProbeResume()  # each probe reruns only the layers from the one just edited
        h0 = None
        factors: list[Factors] = [{} for _ in facts]
        new_keys: list[Keys] = [{} for _ in facts]
        for li, layer in enumerate(cfg.layers):
            if step:
                step("solve", li, len(cfg.layers))
            keys, hidden = backend.probe(batch, positions, [layer], cfg.v_layer, resume)
            assert hidden is not None  # asked for at the v* layer
            if h0 is None:
                h0 = hidden
            # What the layers edited so far already achieved, per memory.
            achieved = _mean_by(hidden - h0, labels, len(facts))
            residual = memit.spread(delta - achieved, li, len(cfg.layers))  # (n × d_out)
            cols = [_columns(keys[layer], labels, i) for i in range(len(facts))]
            for i, c in enumerate(cols):
                new_keys[i][layer] = c
            k_new = np.concatenate(cols)  # (n_new × d_in)
            k_old = [c[layer] for c in constraints]
            # With hold_name, the new subjects' other tokens are held as well.
            k_old += [_columns(keys[layer], labels, i, inner=True) for i in range(len(facts))]
            if hold_template:
                k_old.append(self.template_keys()[layer])
            k_held = np.concatenate(k_old) if k_old else np.zeros((0, k_new.shape[1]))
            k_all = memit.with_held_keys(  # (d_in × N), where the layer's algebra runs
                backend.to_device(k_new.T, layer),
                backend.to_device(k_held.T, layer),
                cfg.lam,
                cfg.lam_hold,
            )
            owner = tuple(i for i, c in enumerate(cols) for _ in range(len(c)))
            owner += (-1,) * (k_all.shape[1] - len(owner))
            m = memit.solve_update(k_all, self.c_inv[layer], cfg.lam)
            layer_factors = memit.rank_one_factors(m, residual, memit.Columns(owner))
            for i, (u, v) in enumerate(layer_factors):
                backend.add_low_rank(layer, u, v, 1.0)
                factors[i][layer] = (u, v)
            resume.changed(layer)
        return [
            WakeEdit(
                fact=f,
                factors=factors[i],
                keys=new_keys[i],
                v_loss=shifts[i].loss,
                v_steps=shifts[i].steps,
            )
            for i, f in enumerate(facts)
        ]


def _key_batch(
    rendered: Sequence[FactRenderings], inner: bool = False
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[tuple[int, int]]]:
    """Flatten every fact's key groups into one probe batch.

    Returns the token rows, their probed positions, and for each probed position (flattened
    in row order) the (memory, group) it belongs to. With ``inner``, the subject's other
    tokens are probed too, each its own negative group (held one by one, not averaged).
    """
    batch, positions, labels = [], [], []
    for i, r in enumerate(rendered):
        n_inner = 0
        for g, group in enumerate(r.key_groups):
            for rendering in group:
                others = rendering.inner_positions if inner else ()
                batch.append(rendering.ids)
                positions.append(tuple(rendering.subject_positions) + tuple(others))
                labels += [(i, g)] * len(rendering.subject_positions)
                labels += [(i, -1 - n_inner - k) for k in range(len(others))]
                n_inner += len(others)
    return batch, positions, labels


def _columns(
    keys: np.ndarray, labels: list[tuple[int, int]], memory: int, inner: bool = False
) -> np.ndarray:
    """Memory ``memory``'s key columns: the mean key of each of its groups (n_groups × d_in);
    with ``inner``, those of its subject's other tokens instead (possibly none)."""
    groups = sorted({g for i, g in labels if i == memory and (g < 0) == inner})
    rows = np.asarray(labels)
    if not groups:
        return np.zeros((0, keys.shape[1]))
    return np.stack(
        [keys[(rows[:, 0] == memory) & (rows[:, 1] == g)].mean(axis=0) for g in groups]
    ).astype(np.float64)


def _mean_by(values: np.ndarray, labels: list[tuple[int, int]], n: int) -> np.ndarray:
    """Mean of ``values`` rows per memory over its subject's last tokens (n × width)."""
    rows = np.asarray(labels)
    return np.stack([values[(rows[:, 0] == i) & (rows[:, 1] >= 0)].mean(axis=0) for i in range(n)])
