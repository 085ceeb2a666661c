"""The MLX backend: mlx-lm Llama-family models on Apple silicon (or the CPU build of mlx).

Quantised layers stay quantised; every ``mlp.down_proj`` is held in float32 (dequantised
once at load) so that edits, which are float32 deltas, add exactly.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import cache as kv_cache
from mlx_lm.models.llama import Model, ModelArgs
from sleeptui.backends import (
    Ends,
    ModelInfo,
    ProbeResume,
    ShiftProblem,
    ShiftResult,
    cut_at,
    publish_folder,
)
from transformers import AutoTokenizer

GGUF_GROUP = 32  # llama.cpp's Q4_0, Q4_1 and Q8_0 blocks, as mlx reads them
CLONE_LIMIT = 2 << 30  # bytes of parameters up to which sleep works on a copy of the model

# GGUF tensor names (llama.cpp) → mlx-lm (= Hugging Face) module names.
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class DownProj(nn.Module):
    """A layer's MLP down-projection in float32, whatever the dtype of the rest.

    Its input is cast to float32 and the output back, as the torch backend does. While
    ``tap`` is set, each call hands it the input (the key vectors k of MEMIT).
    """

    def __init__(self, weight: mx.array) -> None:
        super().__init__()
        self.weight = weight.astype(mx.float32)  # (d_model, d_ff)
        self.tap: Callable[[mx.array], None] | None = None

    def __call__(self, x: mx.array) -> mx.array:
        if self.tap is not None:
            self.tap(x)
        return (x.astype(mx.float32) @ self.weight.T).astype(x.dtype)


class LowRankBeside(nn.Module):
    """A (quantised) linear layer with a low-rank term beside it: y = base(x) + x vᵀ uᵀ."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.u: mx.array | None = None  # (d_out, r)
        self.v: mx.array | None = None  # (r, d_in)

    def add(self, u: mx.array, v: mx.array) -> None:
        self.u = u if self.u is None else mx.concatenate([self.u, u], axis=1)
        self.v = v if self.v is None else mx.concatenate([self.v, v], axis=0)
        mx.eval(self.u, self.v)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self.u is None or self.v is None:
            return y
        return y + ((x.astype(mx.float32) @ self.v.T) @ self.u.T).astype(y.dtype)


def _dense(mod: nn.Module) -> mx.array:
    """A linear module's effective weight in float32."""
    if isinstance(mod, LowRankBeside):
        w = _dense(mod.base)
        return w if mod.u is None or mod.v is None else w + mod.u @ mod.v
    if isinstance(mod, nn.QuantizedLinear):
        biases = mod.get("biases")
        return mx.dequantize(
            mod.weight,
            mod.scales.astype(mx.float32),
            None if biases is None else biases.astype(mx.float32),
            group_size=mod.group_size,
            bits=mod.bits,
            mode=mod.mode,
        )
    return mod.weight.astype(mx.float32)


class MLXBackend:
    """A loaded mlx-lm model and its tokenizer; see :class:`sleeptui.backends.Backend`.

    Every method evaluates the arrays it leaves behind: MLX streams are per thread (since
    mlx 0.31.2) and the engine calls a backend from worker threads, so no lazy array may
    outlive the call that made it.
    """

    name = "mlx"

    def __init__(self, model: nn.Module, tokenizer, source: str, eos_ids: frozenset[int]) -> None:
        _float32_down_proj(model)
        mx.eval(model.parameters())
        self.model = model
        self.tok = tokenizer
        self.eos_ids = eos_ids | _ids(tokenizer.eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        args = model.args
        self.info = ModelInfo(
            arch=args.model_type,
            n_layers=len(model.layers),
            d_model=args.hidden_size,
            d_ff=args.intermediate_size,
            vocab_size=args.vocab_size,
            source=source,
        )

    @property
    def numerics(self) -> str:
        """The device and precision the model runs in ("mlx-cpu-float32-q"): what a measured
        perplexity depends on beside the weights."""
        embed = self.model.model.embed_tokens  # quantised: uint32 codes, real-valued scales
        dtype = getattr(embed, "scales", embed.weight).dtype
        quantised = "-q" if hasattr(embed, "scales") else ""
        return (
            f"mlx-{mx.default_device().type.name}-{str(dtype).removeprefix('mlx.core.')}{quantised}"
        )

    @classmethod
    def from_gguf(cls, path: Path, cache: Path) -> MLXBackend:
        """Load a llama GGUF file; Q4_0/Q4_1/Q8_0 tensors stay quantised (down_proj aside).

        The tokenizer is converted from the GGUF by transformers once and kept in ``cache``.
        """
        weights, meta = cast(
            tuple[dict[str, mx.array], dict[str, Any]], mx.load(str(path), return_metadata=True)
        )
        model = _gguf_model(weights, meta)
        folder = cache / "mlx" / _file_key(path)
        if not (folder / "tokenizer_config.json").exists():
            _save_tokenizer(path, folder)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        eos = _ids(_meta(meta, "tokenizer.ggml.eos_token_id"))
        return cls(model, tok, str(path), eos)

    @classmethod
    def from_folder(cls, folder: Path) -> MLXBackend:
        """Load an MLX or Hugging Face model folder (e.g. mlx-community's 4-bit), offline."""
        from mlx_lm.utils import load_model

        folder = Path(folder)
        model, config = load_model(folder)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tok, str(folder), _ids(config.get("eos_token_id")))

    # -- text ------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat_text(self, messages: Sequence[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )

    # -- generation ------------------------------------------------------------

    def stream(
        self, ids: Sequence[int], max_new_tokens: int, stop: threading.Event | None = None
    ) -> Generator[str, None, None]:
        cache = kv_cache.make_prompt_cache(self.model)
        inp = mx.array([list(ids)])
        out: list[int] = []
        shown = ""
        for _ in range(max_new_tokens):
            if stop is not None and stop.is_set():
                return
            nxt = int(mx.argmax(self.model(inp, cache=cache)[0, -1]))
            if nxt in self.eos_ids:
                break
            out.append(nxt)
            text = self.decode(out)
            if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
                yield text[len(shown) :]
                shown = text
            inp = mx.array([[nxt]])

    def greedy(
        self,
        batch: Sequence[Sequence[int]],
        max_new_tokens: int,
        until: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        ends = Ends(self.decode, self.eos_ids, until, len(batch))
        pick = lambda logits: mx.argmax(logits, axis=-1)  # noqa: E731
        rows = self._generate(batch, max_new_tokens, pick, ends)
        return [ends.cut(i, r) for i, r in enumerate(rows)]

    def sample(self, seeds: Sequence[str], max_new_tokens: int, seed: int) -> list[list[int]]:
        key = mx.random.key(seed)

        def pick(logits: mx.array) -> mx.array:
            nonlocal key
            key, sub = mx.random.split(key)
            return mx.random.categorical(logits.astype(mx.float32), key=sub)

        prompts = [self.encode(s) for s in seeds]
        new = self._generate(prompts, max_new_tokens, pick)
        return [cut_at(p + n, self.eos_ids) for p, n in zip(prompts, new, strict=True)]

    def _generate(
        self,
        batch: Sequence[Sequence[int]],
        max_new_tokens: int,
        pick: Callable[[mx.array], mx.array],
        ends: Ends | None = None,
    ) -> list[list[int]]:
        """Left-padded batch decoding; positions start at 0 at each row's first real token.

        A row ends with its first stop token (kept) or where ``ends`` says it has said its
        target; the batch ends when every row has.
        """
        if not batch:
            return []
        width = max(len(r) for r in batch)
        pads = [width - len(r) for r in batch]
        ids = mx.array([[self.pad_id] * p + list(r) for p, r in zip(pads, batch, strict=True)])
        cache = [kv_cache.BatchKVCache(pads) for _ in self.model.layers]
        rows: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for _ in range(max_new_tokens):
            nxt = cast(list[int], pick(self.model(ids, cache=cache)[:, -1]).tolist())
            for i, t in enumerate(nxt):
                if not done[i]:
                    rows[i].append(t)
                    done[i] = t in self.eos_ids or (ends is not None and ends.said(i, rows[i]))
            if all(done):
                break
            ids = mx.array(nxt)[:, None]
        return rows

    # -- probes ----------------------------------------------------------------

    def probe(
        self,
        batch: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        key_layers: Sequence[int],
        hidden_layer: int | None,
        resume: ProbeResume | None = None,
    ) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
        """Rows of similar length run together (right-padded, causal: pads are never seen),
        from the first layer ``resume`` says changed."""
        keys: dict[int, list[mx.array]] = {layer: [] for layer in key_layers}
        hidden: list[mx.array] = []
        order: list[int] = []  # flattened position index of each row gathered, in run order
        starts = np.cumsum([0, *(len(ps) for ps in positions)])
        last = max([*key_layers, -1 if hidden_layer is None else hidden_layer])
        start = resume.start(key_layers, hidden_layer) if resume is not None else 0
        for b, rows in enumerate(_buckets([len(r) for r in batch])):
            ids = _right_pad([batch[i] for i in rows], self.pad_id)
            width = ids.shape[1]
            flat = mx.array([j * width + p for j, i in enumerate(rows) for p in positions[i]])
            at = lambda x, flat=flat: x.reshape(-1, x.shape[-1])[flat].astype(mx.float32)  # noqa: E731
            for layer in key_layers:
                self._down_proj(layer).tap = lambda k, layer=layer, at=at: keys[layer].append(at(k))
            try:
                h = (
                    resume.inputs[b, start]
                    if resume is not None and start
                    else self.model.model.embed_tokens(ids)
                )
                for layer in range(start, last + 1):
                    if resume is not None:
                        resume.inputs[b, layer] = h
                    h = self.model.layers[layer](h, "causal", None)
                    if layer == hidden_layer:
                        hidden.append(at(h))
                if resume is not None:
                    resume.inputs[b, last + 1] = h
            finally:
                for layer in key_layers:
                    self._down_proj(layer).tap = None
            order += [n for i in rows for n in range(starts[i], starts[i + 1])]
        if resume is not None:
            resume.clean = last + 1
        back = np.argsort(order)  # run order → the order of ``positions``
        keys_np = {layer: np.array(mx.concatenate(ks))[back] for layer, ks in keys.items()}
        hidden_np = np.array(mx.concatenate(hidden))[back] if hidden else None
        return keys_np, hidden_np

    def nll(self, texts: Sequence[str]) -> tuple[float, int]:
        total, count = 0.0, 0
        for text in texts:
            ids = self.encode(text)
            logits = self.model(mx.array([ids]))[0, :-1].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            total -= float(mx.take_along_axis(logp, mx.array(ids[1:])[:, None], axis=1).sum())
            count += len(ids) - 1
        return total, count

    # -- v* (eq. 1) --------------------------------------------------------------

    def optimise_shift(self, problem: ShiftProblem, cfg) -> ShiftResult:
        """δ at the output of ``problem.layer`` on the subject's last token (eq. 1).

        The same objective as the torch backend: the renderings' target NLL, each by its
        share, λ_KL · KL(p_δ ‖ p_0) at the KL prompts' last token, weight decay (‖δ‖/‖h‖)²,
        Adam with bias correction, δ clamped to ``clamp_norm · ‖h‖`` after each step.
        """
        run = ShiftPass(self, problem)
        weights = mx.array(problem.token_weights())
        has_kl = bool(problem.kl_renderings)
        metric = None
        if problem.metric is not None and cfg.fisher_decay:
            metric = mx.array(np.asarray(problem.metric, np.float32))

        def objective(delta: mx.array, kl_ref: mx.array | None):
            target_logp, kl_logp = run.log_probs(delta)
            nll = -(target_logp * weights).sum()
            loss = nll
            if has_kl:
                ref = mx.stop_gradient(kl_logp) if kl_ref is None else kl_ref  # δ = 0 at step 1
                loss = loss + cfg.kl_factor * _kl(kl_logp, ref)
            loss = loss + cfg.weight_decay * (delta * delta).sum() / run.h_norm**2
            if metric is not None:
                loss = loss + cfg.fisher_decay * (delta @ metric @ delta) / run.h_norm**2
            return loss, nll, kl_logp

        loss_and_grad = mx.value_and_grad(objective)
        opt = _adam(cfg.v_lr)
        params = {"delta": mx.zeros((self.info.d_model,), dtype=mx.float32)}
        kl_ref = None
        loss_val, steps = float("inf"), 0
        while steps < cfg.v_steps:
            steps += 1
            (_, nll, kl_logp), grad = loss_and_grad(params["delta"], kl_ref)
            mx.eval(nll, grad, kl_logp)
            if kl_ref is None:
                kl_ref = kl_logp
            loss_val = float(nll)
            if loss_val < cfg.v_loss_stop:
                break
            params = opt.apply_gradients({"delta": grad}, params)
            delta = params["delta"]
            norm, limit = mx.sqrt((delta * delta).sum()), cfg.clamp_norm * run.h_norm
            params["delta"] = mx.where(norm > limit, delta * (limit / norm), delta)
            mx.eval(params, opt.state)
        return ShiftResult(
            delta=np.array(params["delta"], dtype=np.float32), loss=loss_val, steps=steps
        )

    def residual_fisher(
        self, rows: Sequence[Sequence[int]], layers: Sequence[int]
    ) -> dict[int, np.ndarray]:
        """One backward pass per row, with a zero shift added to each layer's output: the
        gradient with respect to that shift is g at every token."""
        sums = {layer: np.zeros((self.info.d_model,) * 2) for layer in layers}
        count = 0
        for row in rows:
            ids = mx.array([list(row)])

            def nll(shifts: dict[int, mx.array], ids=ids) -> mx.array:
                h = self.model.model.embed_tokens(ids)
                for layer, block in enumerate(self.model.layers):
                    h = block(h, "causal", None)
                    if layer in shifts:
                        h = h + shifts[layer]
                logits = self._logits(h)[0, :-1].astype(mx.float32)
                logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                return -mx.take_along_axis(logp, ids[0, 1:, None], axis=1).sum()

            zero = mx.zeros((1, len(row), self.info.d_model), dtype=mx.float32)
            grads = mx.grad(nll)({layer: zero for layer in layers})
            for layer in layers:
                g = np.array(grads[layer][0, :-1], dtype=np.float64)
                sums[layer] += g.T @ g
            count += len(row) - 1
        return {layer: s / max(count, 1) for layer, s in sums.items()}

    # -- weights -----------------------------------------------------------------

    def weight(self, layer: int) -> np.ndarray:
        return np.array(self._down_proj(layer).weight)

    def add_low_rank(self, layer: int, u: np.ndarray, v: np.ndarray, scale: float) -> None:
        mod = self._down_proj(layer)
        uv = mx.array(np.asarray(u, np.float32)) @ mx.array(np.asarray(v, np.float32))
        mod.weight = mod.weight + scale * uv
        mx.eval(mod.weight)

    def set_weight(self, layer: int, w: np.ndarray) -> None:
        mod = self._down_proj(layer)
        if w.shape != mod.weight.shape:
            raise ValueError(f"layer {layer}: weight {w.shape} where {mod.weight.shape} is needed")
        mod.weight = mx.array(np.asarray(w, np.float32))
        mx.eval(mod.weight)

    def params(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named weights as float32 (a quantised module's dequantised, plus any low-rank
        term kept beside it)."""
        return {name: np.array(_dense(self._module(name))) for name in names}

    def set_params(self, weights: dict[str, np.ndarray]) -> None:
        for name, w in weights.items():
            mod = self._module(name)
            if isinstance(mod, DownProj):
                mod.weight = mx.array(np.asarray(w, np.float32))
                mx.eval(mod.weight)
            else:
                linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
                linear.weight = mx.array(np.asarray(w, np.float32))
                mx.eval(linear.weight)
                self._replace(name, linear)

    def add_low_rank_to(self, name: str, u: np.ndarray, v: np.ndarray, scale: float) -> None:
        """W_name += scale · u @ v: fused into float weights; beside a quantised module, which
        stays quantised (y = base(x) + x vᵀ uᵀ, the way LoRA layers compute)."""
        mod = self._module(name)
        tu = mx.array(np.asarray(u, np.float32) * np.float32(scale))
        tv = mx.array(np.asarray(v, np.float32))
        if isinstance(mod, DownProj | nn.Linear):
            mod.weight = mod.weight + (tu @ tv).astype(mod.weight.dtype)
            mx.eval(mod.weight)
            return
        if not isinstance(mod, LowRankBeside):
            mod = LowRankBeside(mod)
            self._replace(name, mod)
        mod.add(tu, tv)

    def train_lora(self, *args, **kwargs):
        from sleeptui.errors import SleeptuiError

        raise SleeptuiError(
            "Consolidation trains its LoRA adapter with peft, on the torch backend; the MLX "
            "backend applies adapters but does not train them yet. Run the nap or sleep with "
            "--backend torch on this folder (the folder is the same for both)."
        )

    def to_device(self, a: np.ndarray, layer: int) -> np.ndarray:
        """MLX has no float64 on the GPU: the MEMIT algebra runs in NumPy."""
        return np.asarray(a, dtype=np.float64)

    def clone(self) -> MLXBackend | None:
        """A copy sharing every array with this model: MLX arrays are immutable and edits
        replace a layer's weight, so the copy costs memory only for the layers it changes."""
        params = cast(list[tuple[str, mx.array]], tree_flatten(self.model.parameters()))
        if sum(a.nbytes for _, a in params) > CLONE_LIMIT:
            return None
        memo = {id(a): a for _, a in params}
        return MLXBackend(copy.deepcopy(self.model, memo), self.tok, self.info.source, self.eos_ids)

    # -- internals ---------------------------------------------------------------

    def _module(self, name: str) -> nn.Module:
        mod = self.model
        try:
            for part in name.removesuffix(".weight").split("."):
                mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        except (AttributeError, IndexError, KeyError) as e:
            raise ValueError(f"the model has no weight {name!r}") from e
        return mod

    def _replace(self, name: str, new: nn.Module) -> None:
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        setattr(self._module(parent), child, new)

    def _down_proj(self, layer: int) -> DownProj:
        return self.model.layers[layer].mlp.down_proj

    def _run(self, h: mx.array, start: int, stop: int) -> mx.array:
        """Decoder layers ``start`` to ``stop`` − 1 over a right-padded batch (causal mask)."""
        for block in self.model.layers[start:stop]:
            h = block(h, "causal", None)
        return h

    def _logits(self, h: mx.array) -> mx.array:
        h = self.model.model.norm(h)
        if self.model.args.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)


class ShiftPass:
    """A v* problem laid out so that each step recomputes only what δ changes.

    Each rendering (targets' renderings, then KL prompts) ends at its last subject or read
    position. Its *frozen* tokens (before its first subject or read position) are out of
    δ's reach, attention being causal; its *live* tokens are the rest. Renderings with
    similar numbers of live tokens form one :class:`_LiveRows` batch.
    """

    def __init__(self, backend: MLXBackend, problem: ShiftProblem) -> None:
        self.backend = backend
        spans, targets = [], []
        n_edits = len(problem.renderings)
        for s, r in enumerate(problem.renderings + problem.kl_renderings):
            if s < n_edits:
                reads = [p - 1 for p in r.target_positions]
                targets += [r.ids[p] for p in r.target_positions]
            else:
                reads = [len(r.ids) - 1]
            spans.append(_Span(r.ids, r.subject_positions, tuple(reads)))
        buckets = _buckets([len(s.ids) - s.first for s in spans])
        self.groups = [
            _LiveRows(backend, problem.layer + 1, [spans[i] for i in rows]) for rows in buckets
        ]
        # Reads come out group by group; ``back`` restores targets' reads first, then KL's.
        starts = np.cumsum([0, *(len(s.reads) for s in spans)])
        order = [n for rows in buckets for i in rows for n in range(starts[i], starts[i + 1])]
        self.back = mx.array(np.argsort(order))
        self.h_norm = mx.concatenate([g.subject_norms for g in self.groups]).mean()
        self.targets = mx.array(targets)  # (n_targets,)
        mx.eval(self.h_norm)

    def log_probs(self, delta: mx.array) -> tuple[mx.array, mx.array]:
        """With δ added at the subject positions: the targets' log-probabilities (n_targets,)
        and the KL prompts' next-token log-distributions (n_kl × vocab), float32."""
        h = mx.concatenate([g.reads(delta) for g in self.groups])[self.back]  # (n_reads, d)
        logits = self.backend._logits(h).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        n = self.targets.shape[0]
        return mx.take_along_axis(logp[:n], self.targets[:, None], axis=1)[:, 0], logp[n:]


@dataclass(frozen=True)
class _Span:
    """One rendering cut to what the loss reads: ids up to its last subject or read position."""

    full_ids: tuple[int, ...]
    subject: tuple[int, ...]
    reads: tuple[int, ...]

    @property
    def first(self) -> int:
        return min(*self.subject, *self.reads)

    @property
    def ids(self) -> tuple[int, ...]:
        return self.full_ids[: max(*self.subject, *self.reads) + 1]


class _LiveRows:
    """A batch of renderings above ``start``: frozen keys and values computed once, live
    tokens rerun each step.

    Built once, without gradients: every token runs through the layers below ``start``;
    the frozen tokens run on through the upper layers once, leaving their keys and values
    in a :class:`_PrefixKV` per layer. Each step runs only the live tokens (right-padded,
    rotary positions offset per row) through the upper layers.
    """

    def __init__(self, backend: MLXBackend, start: int, spans: list[_Span]) -> None:
        self.layers = backend.model.layers[start:]
        first = [s.first for s in spans]
        ids = _right_pad([s.ids for s in spans], backend.pad_id)
        h = backend._run(backend.model.model.embed_tokens(ids), 0, start)  # (B, W, d)
        width = max(len(s.ids) - s.first for s in spans)  # live tokens T
        live = np.minimum(np.asarray(first)[:, None] + np.arange(width), ids.shape[1] - 1)
        self.h = mx.stop_gradient(mx.take_along_axis(h, mx.array(live)[..., None], axis=1))
        at_subject = np.zeros((len(spans), width, 1), np.float32)
        subject, reads = [], []
        for b, s in enumerate(spans):
            subject += [b * width + p - s.first for p in s.subject]
            reads += [b * width + p - s.first for p in s.reads]
            at_subject[b, [p - s.first for p in s.subject]] = 1
        self.at_subject = mx.array(at_subject).astype(h.dtype)  # (B, T, 1): 1 where δ is added
        self.reads_at = mx.array(reads)
        at = mx.array(subject, dtype=mx.int32)  # none where the subject was not found
        subject_h = self.h.reshape(-1, h.shape[-1])[at].astype(mx.float32)
        self.subject_norms = mx.linalg.norm(subject_h, axis=-1)
        # A live query sees its row's frozen keys and the live keys up to itself.
        n_frozen = max(first)
        sees_frozen = np.arange(n_frozen)[None, :] < np.asarray(first)[:, None]  # (B, P)
        mask = np.concatenate(
            [
                np.broadcast_to(sees_frozen[:, None], (len(spans), width, n_frozen)),
                np.broadcast_to(np.tril(np.ones((width, width), bool)), (len(spans), width, width)),
            ],
            axis=-1,
        )
        self.mask = mx.array(mask[:, None])  # (B, 1, T, P + T)
        self.prefix = [_PrefixKV(mx.array(first)) for _ in self.layers]
        if n_frozen:
            h_frozen = h[:, :n_frozen]
            for block, cache in zip(self.layers, self.prefix, strict=True):
                h_frozen = block(h_frozen, "causal", _PrefixKV(0, record_into=cache))
        mx.eval(self.h, self.subject_norms, [(c.keys, c.values) for c in self.prefix])

    def reads(self, delta: mx.array) -> mx.array:
        """The last upper layer's output at the read positions (n_reads × d), δ added."""
        h = self.h + self.at_subject * delta.astype(self.h.dtype)
        for block, cache in zip(self.layers, self.prefix, strict=True):
            h = block(h, self.mask, cache)
        return h.reshape(-1, h.shape[-1])[self.reads_at]


class _PrefixKV:
    """Stands in for an mlx-lm KV cache: one layer's frozen keys and values (B × kv_heads ×
    P × head_dim), put in front of the live tokens' own at every step.

    Given ``record_into``, it is the recorder of the frozen pass instead: it stores the keys
    and values that pass through in that other :class:`_PrefixKV`.
    """

    def __init__(self, offset: int | mx.array, record_into: _PrefixKV | None = None) -> None:
        self.offset = offset
        self.record_into = record_into
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.record_into is not None:
            self.record_into.keys, self.record_into.values = keys, values
            return keys, values
        if self.keys is None or self.values is None:
            return keys, values
        keys = mx.concatenate([self.keys, keys], axis=2)
        values = mx.concatenate([self.values, values], axis=2)
        return keys, values


def _kl(logp: mx.array, ref: mx.array) -> mx.array:
    """KL(p ‖ p_ref) averaged over rows, as torch's ``kl_div(ref, logp, log_target=True,
    reduction="batchmean")``."""
    return (mx.exp(logp) * (logp - ref)).sum() / logp.shape[0]


def _adam(lr: float):
    import mlx.optimizers as optim

    return optim.Adam(learning_rate=lr, bias_correction=True)  # torch's Adam


# -- loading ---------------------------------------------------------------------


def _gguf_model(weights: dict[str, mx.array], meta: dict) -> Model:
    """An mlx-lm Llama from a GGUF file's tensors, laid out as transformers' GGUF loader does."""
    arch = str(meta["general.architecture"])
    if arch != "llama":
        raise ValueError(f"The MLX backend reads llama GGUF files, not {arch!r}.")
    n_heads = _meta(meta, "llama.attention.head_count")
    n_kv = _meta(meta, "llama.attention.head_count_kv", n_heads)
    args = ModelArgs(
        model_type="llama",
        hidden_size=_meta(meta, "llama.embedding_length"),
        num_hidden_layers=_meta(meta, "llama.block_count"),
        intermediate_size=_meta(meta, "llama.feed_forward_length"),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        rms_norm_eps=_meta(meta, "llama.attention.layer_norm_rms_epsilon"),
        vocab_size=weights["token_embd.weight"].shape[0],
        rope_theta=_meta(meta, "llama.rope.freq_base", 10000.0),
        max_position_embeddings=_meta(meta, "llama.context_length"),
        tie_word_embeddings="output.weight" not in weights,
    )
    named = {_hf_name(k): v for k, v in weights.items()}
    for name in named:
        if name.endswith((".scales", ".biases")):  # float16, exact in float32: compute in float32
            named[name] = named[name].astype(mx.float32)
        if ".q_proj." in name or ".k_proj." in name:
            named[name] = _unpermute_rows(named[name], n_heads if ".q_proj." in name else n_kv)
    bits = {  # 4 for Q4_0/Q4_1, 8 for Q8_0: packed uint32 columns × 32 / input columns
        name.removesuffix(".scales"): named[name.replace(".scales", ".weight")].shape[-1]
        * 32
        // (scales.shape[-1] * GGUF_GROUP)
        for name, scales in named.items()
        if name.endswith(".scales")
    }
    model = Model(args)
    nn.quantize(
        model,
        class_predicate=lambda path, _: (
            path in bits and {"group_size": GGUF_GROUP, "bits": bits[path]}
        ),
    )
    model.load_weights(list(named.items()), strict=True)
    mx.eval(model.parameters())
    return model


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_BLOCK:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_TOP:
        return f"{_GGUF_TOP[parts[0]]}.{parts[1]}"
    raise ValueError(f"The MLX backend does not know the GGUF tensor {gguf_name!r}.")


def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order (each head's rotary halves interleaved), as
    transformers' GGUF loader does; rows of packed weights, scales and biases alike."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float32_down_proj(model: nn.Module) -> None:
    """Replace every down_proj by a float32 :class:`DownProj` (dequantised if quantised)."""
    for block in model.layers:
        old = block.mlp.down_proj
        if isinstance(old, DownProj):
            continue
        if "bias" in old:
            raise ValueError("The MLX backend edits down-projections without a bias only.")
        block.mlp.down_proj = DownProj(_dense(old))


def _save_tokenizer(gguf: Path, folder: Path) -> None:
    """Convert the GGUF's tokenizer with transformers and save it, written atomically."""
    import shutil
    import tempfile

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tokenizer-"))
    try:
        tok.save_pretrained(tmp)
        publish_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file_key(path: Path) -> str:
    """The same key as the torch backend's converted folder: path, size and mtime."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]


def _meta(meta: dict, key: str, default=None):
    """A number from GGUF metadata (0-d arrays in mlx), or ``default``."""
    return meta[key].item() if key in meta else default


def _ids(value) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)


def _buckets(lengths: Sequence[int], slack: float = 1.25) -> list[list[int]]:
    """Indices grouped by length so that padding each group to its longest row costs at
    most ``slack`` times its real tokens (fewer tokens through the model on CPU)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        group = groups[-1] if groups else None
        if group and lengths[i] * (len(group) + 1) <= slack * sum(lengths[j] for j in [*group, i]):
            group.append(i)
        else:
            groups.append([i])
    return groups


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> mx.array:
    width = max(len(r) for r in rows)
    return mx.array([list(r) + [pad_id] * (width - len(r)) for r in rows])
