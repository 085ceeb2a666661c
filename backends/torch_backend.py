"""The torch backend: transformers Llama-family models on CUDA or the CPU."""

from __future__ import annotations

import inspect
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sleeptui.backends import (
    Ends,
    ModelInfo,
    ProbeResume,
    Rendering,
    ShiftProblem,
    ShiftResult,
    cut_at,
    publish_folder,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.utils import logging as hf_logging

if TYPE_CHECKING:
    from sleeptui.adapter import Adapter, LoraSettings

# A Hugging Face model or one of its modules. Their parts are reached by attribute
# (model.model.layers[4].mlp.down_proj), which torch types as Tensor | Module.
HFModule = Any

# Models up to this many bytes of weights are copied for sleep; larger ones sleep in place.
CLONE_LIMIT = 4 * 2**30
# Probes pack their rows into sequences of about this many tokens.
PROBE_TOKENS = 512
# The keyword a forward pass takes its KV cache by: transformers 5.25 renamed
# ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40).
CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters
    else "past_key_values"
)


class TorchBackend:
    """A loaded model and tokenizer; see :class:`sleeptui.backends.Backend`."""

    name = "torch"

    def __init__(self, model: HFModule, tokenizer, source: str) -> None:
        self.model: HFModule = model.eval()
        self.tok = tokenizer
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        self.info = ModelInfo(
            arch=cfg.model_type,
            n_layers=cfg.num_hidden_layers,
            d_model=cfg.hidden_size,
            d_ff=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            source=source,
        )
        self.eos_ids = _eos_ids(tokenizer, cfg)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # v*'s bfloat16 copies of this model's modules (see ``_bf16_copy``).
        self._casts: dict[HFModule, _Cast] = {}

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        device: str = "auto",
        edit_layers: Sequence[int] = (),
        four_bit: bool = False,
        dtype: torch.dtype | None = None,
    ) -> TorchBackend:
        """Load a Hugging Face model folder (config.json + safetensors), never downloading.

        On CUDA the weights keep the checkpoint's dtype (bf16 for Llama), placed by
        accelerate (``device_map="auto"``: one GPU when the model fits, several when not).
        ``four_bit`` quantises to bitsandbytes NF4, except the down_proj of the edit layers
        (and of the two layers the fingerprint reads), which stay exact: MEMIT adds float32
        deltas to them. Whatever is already quantised there is dequantised before an edit.
        ``dtype`` overrides the weights' dtype (tests run the bf16 path on the CPU).
        """
        from transformers import AutoConfig

        dev = _pick_device(device)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        n_layers = config.num_hidden_layers
        exact = sorted({*edit_layers, 0, n_layers - 1})
        dtype = dtype or _load_dtype(config, dev)
        kwargs: dict = {"dtype": dtype, "local_files_only": True}
        if dev != "cpu":
            kwargs["device_map"] = "auto" if dev == "cuda" else {"": dev}
        if four_bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=["lm_head", *(_down_proj_path(i) for i in exact)],
            )
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        with _no_hf_progress():  # the engine reports the load itself
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        if four_bit:
            _keep_4bit_differentiable(model)
        backend = cls(model, tok, str(folder))
        for layer in edit_layers:
            backend._editable(layer)
        return backend

    @classmethod
    def from_gguf(
        cls,
        path: Path,
        cache: Path,
        device: str = "auto",
        edit_layers: Sequence[int] = (),
        four_bit: bool = False,
    ) -> TorchBackend:
        """Load a GGUF file, dequantised to float32 by transformers.

        Dequantising takes tens of seconds, so the first load writes the result to ``cache``
        as an ordinary safetensors model folder and later loads read that instead.
        """
        folder = cache / "models" / _file_key(path)
        if not (folder / "config.json").exists():
            _convert_gguf(path, folder)
        return cls.from_folder(folder, device, edit_layers, four_bit)

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

    @torch.inference_mode()
    def stream(
        self, ids: Sequence[int], max_new_tokens: int, stop: threading.Event | None = None
    ) -> Generator[str, None, None]:
        from transformers import DynamicCache

        cache = DynamicCache()
        inp = torch.tensor([list(ids)], device=self._device)
        out: list[int] = []
        shown = ""
        for _ in range(max_new_tokens):
            if stop is not None and stop.is_set():
                return
            logits = self.model(input_ids=inp, use_cache=True, **{CACHE_KW: cache}).logits
            nxt = int(logits[0, -1].argmax())
            if nxt in self.eos_ids:
                break
            out.append(nxt)
            text = self.tok.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
                yield text[len(shown) :]
                shown = text
            inp = torch.tensor([[nxt]], device=self._device)

    @torch.inference_mode()
    def greedy(
        self,
        batch: Sequence[Sequence[int]],
        max_new_tokens: int,
        until: Sequence[str | None] | None = None,
    ) -> list[list[int]]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        ids, mask = _pad(batch, self.pad_id, left=True, device=self._device)
        width = ids.shape[1]
        ends = Ends(self.decode, self.eos_ids, until, len(batch))

        class Said(StoppingCriteria):
            def __call__(
                self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs
            ) -> torch.Tensor:
                rows = input_ids[:, width:].tolist()
                done = [ends.said(i, row) for i, row in enumerate(rows)]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=list(self.eos_ids),
            stopping_criteria=StoppingCriteriaList([Said()]) if until is not None else None,
        )
        return [ends.cut(i, row) for i, row in enumerate(out[:, width:].tolist())]

    @torch.inference_mode()
    def sample(self, seeds: Sequence[str], max_new_tokens: int, seed: int) -> list[list[int]]:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        ids, mask = _pad(
            [self.encode(s) for s in seeds], self.pad_id, left=True, device=self._device
        )
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            pad_token_id=self.pad_id,
        )
        width = ids.shape[1]
        seed_lens = mask.sum(dim=1).tolist()
        return [
            cut_at(row[width - n :], self.eos_ids)
            for row, n in zip(out.tolist(), seed_lens, strict=True)
        ]

    # -- probes ----------------------------------------------------------------

    @torch.inference_mode()
    def probe(
        self,
        batch: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        key_layers: Sequence[int],
        hidden_layer: int | None,
        resume: ProbeResume | None = None,
    ) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
        """Keys and hidden states at ``positions``, running only what they depend on.

        A row is read only at its positions, so it is cut after the last one (attention is
        causal); rows are packed into sequences of about ``PROBE_TOKENS`` tokens and only the
        layers up to the deepest one read are run, from the first one ``resume`` says changed.
        """
        top = max([*key_layers, *([hidden_layer] if hidden_layer is not None else [])])
        start = resume.start(key_layers, hidden_layer) if resume is not None else 0
        keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in key_layers}
        hidden: list[torch.Tensor] = []
        inner = self.model.model
        for n, pack in enumerate(_pack_rows(batch, positions, PROBE_TOKENS)):
            at = torch.tensor(pack.at, device=self._device)
            hooks = []
            for layer in key_layers:

                def grab(_mod, args, layer=layer, at=at):
                    keys[layer].append(args[0][0, at].float())

                hooks.append(self._down_proj(layer).register_forward_pre_hook(grab))
            idx = (
                torch.tensor(pack.seq, device=self._device),
                torch.tensor(pack.pos, device=self._device),
            )
            if resume is not None and start:
                h = resume.inputs[n, start]
            else:
                h = inner.embed_tokens(torch.tensor([pack.ids], device=self._device))
            inputs: list[torch.Tensor] | None = [] if resume is not None else None  # kept to resume
            try:
                if hidden_layer is None:
                    h = _decoder(inner, inner.layers[start : top + 1], h, idx, idx, inputs=inputs)
                else:
                    h = _decoder(
                        inner, inner.layers[start : hidden_layer + 1], h, idx, idx, inputs=inputs
                    )
                    hidden.append(h[0, at].float())
                    h = _decoder(
                        inner, inner.layers[hidden_layer + 1 : top + 1], h, idx, idx, inputs=inputs
                    )
            finally:
                for hook in hooks:
                    hook.remove()
            if resume is not None and inputs is not None:
                for layer, x in enumerate([*inputs, h], start=start):
                    resume.inputs[n, layer] = x
        if resume is not None:
            resume.clean = top + 1
        out = {layer: torch.cat(k).cpu().numpy() for layer, k in keys.items()}
        return out, (torch.cat(hidden).cpu().numpy() if hidden_layer is not None else None)

    @torch.inference_mode()
    def nll(self, texts: Sequence[str]) -> tuple[float, int]:
        total, count = 0.0, 0
        for text in texts:
            ids = torch.tensor([self.encode(text)], device=self._device)
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        return total, count

    # -- v* (eq. 1) --------------------------------------------------------------

    def optimise_shift(self, problem: ShiftProblem, cfg) -> ShiftResult:
        """δ at the output of ``problem.layer`` on the subject's last token (eq. 1).

        Each step reruns only what δ can change (see :class:`_ShiftPass`): the layers above
        ``problem.layer``, over the tokens from each rendering's first subject position on,
        with the vocabulary projection taken at the positions the loss reads; with
        ``cfg.v_bf16``, on hardware that computes bfloat16 natively, from bfloat16 copies of
        their weights.
        """
        half = cfg.v_bf16 and _native_bf16(self._device)
        run = _ShiftPass(self.model, problem, self._bf16_copy if half else None)
        delta = torch.zeros(self.info.d_model, device=run.device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        metric = None
        if problem.metric is not None and cfg.fisher_decay:
            metric = torch.as_tensor(problem.metric, dtype=torch.float32, device=run.device)
        kl_ref = None
        loss_val, steps = float("inf"), 0
        while steps < cfg.v_steps:
            steps += 1
            opt.zero_grad()
            target_logp, kl_logp = run.log_probs(delta)  # (n_targets,), (n_kl × vocab)
            nll = -(target_logp * run.weights).sum()
            loss = nll
            if problem.kl_renderings:
                if kl_ref is None:  # δ = 0 at the first step: the original distribution
                    kl_ref = kl_logp.detach()
                kl = torch.nn.functional.kl_div(
                    kl_ref, kl_logp, log_target=True, reduction="batchmean"
                )
                loss = loss + cfg.kl_factor * kl
            loss = loss + cfg.weight_decay * (delta.norm() / run.h_norm) ** 2
            if metric is not None:
                loss = loss + cfg.fisher_decay * (delta @ metric @ delta) / run.h_norm**2
            loss_val = float(nll.detach())
            if loss_val < cfg.v_loss_stop:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():  # keep δ within clamp_norm · ‖h‖
                limit = cfg.clamp_norm * run.h_norm
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
        return ShiftResult(delta=delta.detach().float().cpu().numpy(), loss=loss_val, steps=steps)

    def residual_fisher(
        self, rows: Sequence[Sequence[int]], layers: Sequence[int]
    ) -> dict[int, np.ndarray]:
        """One backward pass per row, with a zero shift added to each layer's output: the
        gradient with respect to that shift is g at every token."""
        d = self.info.d_model
        sums = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in layers}
        shifts: dict[int, torch.Tensor] = {}

        def add_shift(_mod, _args, out, layer: int):
            hidden = out[0] if isinstance(out, tuple) else out
            shifts[layer] = torch.zeros_like(hidden, requires_grad=True)
            moved = hidden + shifts[layer]
            return (moved, *out[1:]) if isinstance(out, tuple) else moved

        blocks = self.model.model.layers
        hooks = [blocks[i].register_forward_hook(partial(add_shift, layer=i)) for i in layers]
        count = 0
        try:
            for row in rows:
                ids = torch.tensor([list(row)], device=self._device)
                logits = self.model(input_ids=ids).logits[0, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                grads = torch.autograd.grad(nll, [shifts[layer] for layer in layers])
                for layer, g in zip(layers, grads, strict=True):
                    g = g[0, :-1].double().cpu()  # the last token's output predicts nothing here
                    sums[layer] += g.T @ g
                count += ids.shape[1] - 1
        finally:
            for hook in hooks:
                hook.remove()
        return {layer: (s / max(count, 1)).numpy() for layer, s in sums.items()}

    def _bf16_copy(self, module: HFModule) -> _Cast:
        """``module`` run from a bfloat16 copy of its float32 weights, kept while they are
        unchanged (the layers above the v* layer are the same from one write to the next)."""
        cast = self._casts.get(module)
        if cast is None or not cast.current():
            cast = self._casts[module] = _Cast(module, torch.bfloat16)
        return cast

    # -- weights -----------------------------------------------------------------

    def weight(self, layer: int) -> np.ndarray:
        """A copy of the layer's down_proj weight (never a view that later edits change)."""
        mod = self._down_proj(layer)
        if _is_4bit(mod):
            return _dequantised(mod).cpu().numpy()
        return mod.weight.detach().to("cpu", torch.float32, copy=True).numpy()

    @torch.no_grad()
    def add_low_rank(self, layer: int, u: np.ndarray, v: np.ndarray, scale: float) -> None:
        w = self._editable(layer).weight
        tu = torch.as_tensor(u, dtype=torch.float32, device=w.device)
        tv = torch.as_tensor(v, dtype=torch.float32, device=w.device)
        w.add_(scale * (tu @ tv))

    @torch.no_grad()
    def set_weight(self, layer: int, w: np.ndarray) -> None:
        target = self._editable(layer).weight
        target.copy_(torch.as_tensor(w, dtype=torch.float32, device=target.device))

    def params(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Copies of the named weights (Hugging Face names), as float32."""
        out = {}
        for name in names:
            mod = self._module(name)
            w = _dequantised(mod) if _is_4bit(mod) else mod.weight.detach()
            out[name] = w.to("cpu", torch.float32, copy=True).numpy()
        return out

    @torch.no_grad()
    def set_params(self, weights: dict[str, np.ndarray]) -> None:
        for name, w in weights.items():
            target = self._plain(name).weight
            target.copy_(torch.as_tensor(w, device=target.device).to(target.dtype))

    @torch.no_grad()
    def add_low_rank_to(self, name: str, u: np.ndarray, v: np.ndarray, scale: float) -> None:
        """W_name += scale · u @ v for any linear weight (adapters); fused into the weight."""
        w = self._plain(name).weight
        tu = torch.as_tensor(u, dtype=torch.float32, device=w.device)
        tv = torch.as_tensor(v, dtype=torch.float32, device=w.device)
        w.add_((scale * (tu @ tv)).to(w.dtype))

    def train_lora(
        self,
        examples: Sequence[Rendering],
        settings: LoraSettings,
        init: Adapter | None = None,
        progress: Callable[[int, int, float], None] | None = None,
        cancel: threading.Event | None = None,
        anchor: Sequence[Rendering] = (),
    ) -> Adapter:
        """Train a LoRA adapter with peft on ``examples`` (loss on their target positions).

        Each step adds ``settings.kl_weight`` · KL(before ‖ now) of the next-token
        distributions on a batch of ``anchor``'s target positions, against the model as it is
        when this is called. The adapter is injected into the model for the training only
        and taken out again (unmerged) before this returns, whatever happens; ``init`` (an
        Adapter) warm-starts it. Returns the trained :class:`sleeptui.adapter.Adapter`.
        """
        from peft import LoraConfig, get_peft_model

        from sleeptui.adapter import Adapter

        bs = settings.batch_size
        anchors = [anchor[i : i + bs] for i in range(0, len(anchor), bs)]
        with torch.inference_mode():
            before = [
                self._target_logits(batch).log_softmax(-1).to(torch.bfloat16) for batch in anchors
            ]

        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft says int; α/r is a float
            target_modules=list(settings.targets),
            layers_to_transform=list(settings.layers) or None,
            lora_dropout=0.0,
            bias="none",
        )
        with warnings.catch_warnings():  # peft asks the model a property transformers renamed
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            peft_model = get_peft_model(self.model, config)
        try:
            lora = {
                name.removeprefix("base_model.model.").replace(".default", ""): p
                for name, p in peft_model.named_parameters()
                if ".lora_" in name
            }
            if init is not None:
                with torch.no_grad():
                    for module in init.a:
                        lora[f"{module}.lora_A.weight"].copy_(torch.as_tensor(init.a[module]))
                        lora[f"{module}.lora_B.weight"].copy_(torch.as_tensor(init.b[module]))
            params = list(lora.values())
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, foreach=False)
            gen = torch.Generator().manual_seed(settings.seed)
            steps = settings.epochs * -(-len(examples) // bs)
            step = 0
            self.model.train()
            for _ in range(settings.epochs):
                order = torch.randperm(len(examples), generator=gen).tolist()
                epoch_loss = []
                for start in range(0, len(order), bs):
                    if cancel is not None and cancel.is_set():
                        from sleeptui.sleep import Cancelled

                        raise Cancelled
                    batch = [examples[i] for i in order[start : start + bs]]
                    logits = self._target_logits(batch)
                    targets = torch.tensor(
                        [r.ids[p] for r in batch for p in r.target_positions], device=self._device
                    )
                    loss = torch.nn.functional.cross_entropy(logits, targets)
                    total = loss
                    if anchors:
                        k = step % len(anchors)
                        now = self._target_logits(anchors[k]).log_softmax(-1)
                        kl = torch.nn.functional.kl_div(
                            now, before[k].float(), log_target=True, reduction="batchmean"
                        )
                        total = loss + settings.kl_weight * kl
                    total.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    epoch_loss.append(loss.item())
                    if progress:
                        progress(step, steps, epoch_loss[-1])
                if sum(epoch_loss) / len(epoch_loss) < settings.loss_stop:
                    break
            a: dict[str, np.ndarray] = {}
            b: dict[str, np.ndarray] = {}
            for key, p in lora.items():
                module, part = key.rsplit(".lora_", 1)
                (a if part.startswith("A") else b)[module] = p.detach().float().cpu().numpy()
            return Adapter(r=settings.r, alpha=settings.alpha, a=a, b=b)
        finally:
            self.model.eval()
            self.model = peft_model.unload()
            for p in self.model.parameters():
                p.requires_grad_(False)

    def _target_logits(self, batch: Sequence[Rendering]) -> torch.Tensor:
        """Float logits predicting each target token of the batch, in order (targets × vocab);
        the LM head runs only where it is read."""
        ids, mask = _pad([r.ids for r in batch], self.pad_id, left=False, device=self._device)
        rows = [i for i, r in enumerate(batch) for _ in r.target_positions]
        cols = [p for r in batch for p in r.target_positions]
        h = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows_t = torch.tensor(rows, device=self._device)
        cols_t = torch.tensor(cols, device=self._device)
        return self.model.lm_head(h[rows_t, cols_t - 1]).float()

    def to_device(self, a, layer: int):
        """``a`` in float64 where the MEMIT algebra of ``layer`` runs: NumPy when the layer is
        on the CPU, a tensor on its GPU otherwise (see :mod:`sleeptui.memit`)."""
        dev = self._down_proj(layer).weight.device
        if dev.type == "cpu":
            return np.asarray(a, dtype=np.float64)
        return torch.as_tensor(a, dtype=torch.float64, device=dev)

    def clone(self) -> TorchBackend | None:
        """A deep copy for sleep to work on; None above ``CLONE_LIMIT`` bytes of weights."""
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if size > CLONE_LIMIT:
            return None
        import copy

        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model)
        twin._casts = {}
        return twin

    # -- internals ---------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def numerics(self) -> str:
        """Where and in what precision the model runs ("cpu-float32", "cuda-bfloat16",
        "cuda-bfloat16-nf4"): what a measured perplexity depends on beside the weights."""
        dtype = str(self.model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        nf4 = any(_is_4bit(m) for m in self.model.modules())
        return f"{self._device.type}-{dtype}" + ("-nf4" if nf4 else "")

    def _down_proj(self, layer: int) -> HFModule:
        return self.model.model.layers[layer].mlp.down_proj

    def _module(self, name: str) -> HFModule:
        try:
            return self.model.get_submodule(name.removesuffix(".weight"))
        except AttributeError as e:
            raise ValueError(f"the model has no weight {name!r}") from e

    def _plain(self, name: str) -> HFModule:
        """The module of weight ``name``, dequantised to a plain Linear if it is 4-bit (the
        edit layers' down_proj: :meth:`_editable`)."""
        path = name.removesuffix(".weight")
        for layer in range(self.info.n_layers):
            if path == _down_proj_path(layer):
                return self._editable(layer)
        mod = self._module(name)
        if _is_4bit(mod):
            dtype = getattr(mod, "compute_dtype", None) or torch.bfloat16
            plain = torch.nn.Linear(
                mod.in_features, mod.out_features, bias=False, device=mod.weight.device, dtype=dtype
            )
            plain.weight.requires_grad_(False)
            plain.weight.copy_(_dequantised(mod).to(dtype))
            _copy_accelerate_hook(mod, plain)
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent), child, plain)
            mod = plain
        return mod

    def _editable(self, layer: int) -> HFModule:
        """The layer's down_proj, made float32 (dequantised if 4-bit) before its first edit.

        Deltas are float32 and must add exactly; the layer computes in float32 and hands its
        output back in the dtype of its input.
        """
        mlp = self.model.model.layers[layer].mlp
        mod = mlp.down_proj
        if _is_4bit(mod):
            plain = torch.nn.Linear(
                mod.in_features, mod.out_features, bias=False, device=mod.weight.device
            )
            plain.weight.requires_grad_(False)
            plain.weight.copy_(_dequantised(mod))
            _copy_accelerate_hook(mod, plain)
            mlp.down_proj = mod = plain
        if mod.weight.dtype != torch.float32:
            mod.to(torch.float32)
        if not getattr(mod, "_sleeptui_float32", False):
            mod.register_forward_pre_hook(_cast_input_to_weight)
            mod.register_forward_hook(_cast_output_back)
            mod._sleeptui_float32 = True
        return mod


class _ShiftPass:
    """A v* problem laid out so that each step recomputes only what δ changes.

    The renderings (targets, then KL prompts) share one row without padding: a
    block-diagonal causal mask keeps them apart and positions restart at 0 for each. Built
    once without grad:

    * every token runs through the layers up to ``problem.layer``; their output at the
      *live* tokens (from a rendering's first subject or read position on) is kept;
    * the *frozen* tokens before those run on through the upper layers once, leaving their
      keys and values in a :class:`_PrefixKV`: attention is causal, so δ cannot reach them.

    With ``cast`` (a module → :class:`_Cast` in bfloat16), the upper layers, the final norm
    and the LM head run from copies of their weights in that dtype: on a CPU a small model's
    step reads every weight twice (forward and backward) for a few dozen tokens, so its time
    is the bytes read.
    """

    def __init__(
        self,
        model: HFModule,
        problem: ShiftProblem,
        cast: Callable[[HFModule], _Cast] | None = None,
    ) -> None:
        if model.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError("v* packs renderings with a 4D mask: needs eager or sdpa attention")
        inner = model.model
        self.inner = inner
        self.device = inner.embed_tokens.weight.device
        upper = inner.layers[problem.layer + 1 : model.config.num_hidden_layers]
        self.upper = [cast(m) for m in upper] if cast else upper
        self.norm = cast(inner.norm) if cast else inner.norm
        self.lm_head = cast(model.lm_head) if cast else model.lm_head
        self.dtype = self.norm.dtype if cast else None
        lay = _Layout.of(problem)
        seq, pos, live = (torch.tensor(x, device=self.device) for x in (lay.seq, lay.pos, lay.live))
        frozen = ~live
        with torch.no_grad():
            h = inner.embed_tokens(torch.tensor([lay.ids], device=self.device))  # (1, T, d)
            h = _decoder(inner, inner.layers[: problem.layer + 1], h, (seq, pos), (seq, pos))
            self.h_norm = h[0, lay.subject].float().norm(dim=-1).mean()
            h = h.to(self.dtype) if self.dtype else h
            self.prefix = None
            if frozen.any():
                self.prefix = _PrefixKV()
                kv = (seq[frozen], pos[frozen])
                _decoder(inner, self.upper, h[:, frozen], kv, kv, self.prefix)
                self.prefix.recording = False
        self.h = h[:, live]  # (1, T_live, d) at the output of problem.layer
        self.at_subject = torch.zeros(len(lay.ids), 1, dtype=h.dtype, device=self.device)
        self.at_subject[lay.subject] = 1
        self.at_subject = self.at_subject[live]  # (T_live, 1): 1 where δ is added
        self.reads = (torch.cumsum(live, 0) - 1)[lay.reads]  # live indices
        self.targets = torch.tensor(lay.targets, device=self.device)  # (n_targets,)
        self.weights = torch.tensor(lay.weights, device=self.device)  # (n_targets,)
        self.queries = (seq[live], pos[live])
        self.keys = (torch.cat([seq[frozen], seq[live]]), torch.cat([pos[frozen], pos[live]]))

    def log_probs(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With δ added at the subject positions: the targets' log-probabilities (n_targets,)
        and the KL prompts' next-token log-distributions (n_kl × vocab), float32."""
        h = self.h + self.at_subject * delta.to(self.h.dtype)  # (1, T_live, d)
        h = _decoder(self.inner, self.upper, h, self.queries, self.keys, self.prefix)
        h = self.norm(h[0, self.reads])  # (n_reads, d)
        logp = torch.log_softmax(self.lm_head(h).float(), dim=-1)  # (n_reads, vocab)
        n = len(self.targets)
        return logp[:n].gather(1, self.targets[:, None])[:, 0], logp[n:]


class _Cast:
    """Runs ``module`` with its float32 parameters copied into ``dtype`` (others, such as
    4-bit weights, as they are). The module itself is left untouched."""

    def __init__(self, module: HFModule, dtype: torch.dtype) -> None:
        self.module = module
        self.dtype = dtype
        self.sources = dict(module.named_parameters())
        self.stamps = {name: _stamp(t) for name, t in self.sources.items()}
        self.params = {
            name: t.detach().to(dtype) if t.dtype == torch.float32 else t
            for name, t in self.sources.items()
        }

    def current(self) -> bool:
        """Whether the module still has the parameters copied, unchanged since: the same
        tensors, storage and version counter (in-place edits count up the version)."""
        now = dict(self.module.named_parameters())
        return now.keys() == self.sources.keys() and all(
            now[n] is self.sources[n] and _stamp(now[n]) == self.stamps[n] for n in now
        )

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.params, args, kwargs)


class _PrefixKV:
    """Stands in for a transformers ``Cache``: the frozen tokens' keys and values per layer.

    While ``recording``, each layer's keys and values are kept as they pass. Afterwards they
    are put in front of the live tokens' own and nothing is stored, so every step reuses them.
    """

    def __init__(self) -> None:
        self.recording = True
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        """The keys and values (1 × kv_heads × T × head_dim) that the layer's queries attend to."""
        if self.recording:
            self.kv[layer_idx] = (keys, values)
            return keys, values
        old_keys, old_values = self.kv[layer_idx]
        return torch.cat([old_keys, keys], dim=2), torch.cat([old_values, values], dim=2)


@dataclass
class _Layout:
    """The renderings of a v* problem (targets, then KL prompts) packed into one row.

    Per packed token: ``ids``, ``seq`` (which rendering), ``pos`` (position within it) and
    ``live`` (at or after the rendering's first subject or read position). Packed indices of
    the ``subject`` positions and of the ``reads``: each target position − 1, then each KL
    prompt's last token. ``targets`` are the target token ids, ``weights`` their weight in
    the NLL (each rendering counts by its share, whatever the length of its target).
    """

    ids: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    live: list[bool] = field(default_factory=list)
    subject: list[int] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, problem: ShiftProblem) -> _Layout:
        """Each rendering ends at its last subject or read position: later tokens are never read."""
        lay = cls()
        for s, r in enumerate(problem.renderings + problem.kl_renderings):
            is_target = s < len(problem.renderings)
            reads = [p - 1 for p in r.target_positions] if is_target else [len(r.ids) - 1]
            marks = [*r.subject_positions, *reads]
            if not marks:  # nothing to shift, nothing to read
                continue
            first, end = min(marks), max(marks) + 1
            base = len(lay.ids)
            lay.ids += r.ids[:end]
            lay.seq += [s] * end
            lay.pos += range(end)
            lay.live += [p >= first for p in range(end)]
            lay.subject += [base + p for p in r.subject_positions]
            lay.reads += [base + p for p in reads]
            if is_target:
                lay.targets += [r.ids[p] for p in r.target_positions]
        lay.weights = problem.token_weights()
        return lay


@dataclass
class _Pack:
    """Rows cut after their last read position and laid end to end (see ``_decoder``)."""

    ids: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    at: list[int] = field(default_factory=list)  # packed indices of the read positions


def _pack_rows(
    batch: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], budget: int
) -> Iterator[_Pack]:
    """Packs of whole rows, in order, each of about ``budget`` tokens (or one longer row)."""
    pack = _Pack()
    for row, ps in zip(batch, positions, strict=True):
        if not ps:
            continue
        end = max(ps) + 1
        if pack.ids and len(pack.ids) + end > budget:
            yield pack
            pack = _Pack()
        base, s = len(pack.ids), (pack.seq[-1] + 1 if pack.seq else 0)
        pack.ids += row[:end]
        pack.seq += [s] * end
        pack.pos += range(end)
        pack.at += [base + p for p in ps]
    if pack.ids:
        yield pack


def _decoder(inner, layers, hidden, queries, keys, cache=None, inputs=None) -> torch.Tensor:
    """Run decoder ``layers`` over packed ``hidden`` (1 × T × d) as ``LlamaModel.forward`` does.

    ``queries`` and ``keys`` are (rendering, position) index pairs of the tokens in
    ``hidden`` and of every token attended to (``cache``'s first, if given). ``inputs``, if
    given, collects the hidden state entering each layer.
    """
    if len(layers) == 0:
        return hidden
    position_ids = queries[1][None]  # (1, T)
    rope = inner.rotary_emb(hidden, position_ids)
    mask = _block_causal_mask(queries, keys, hidden.dtype)
    for layer in layers:
        if inputs is not None:
            inputs.append(hidden)
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=rope,
            **{CACHE_KW: cache},
        )
    return hidden


def _block_causal_mask(queries, keys, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (1 × 1 × T_q × T_k): a query sees the keys of its own rendering at or
    before its position. Additive masks suit both eager and sdpa attention."""
    (q_seq, q_pos), (k_seq, k_pos) = queries, keys
    allowed = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t._version


def _native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively here (elsewhere they are emulated,
    and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _load_dtype(config, device: str) -> torch.dtype:
    """float32 on the CPU; on a GPU the checkpoint's own dtype (bf16 for Llama), so that the
    fingerprint's rounded weights read the same whichever device loaded them."""
    if device == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


def _down_proj_path(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj"


def _is_4bit(mod: HFModule) -> bool:
    return type(mod).__name__ == "Linear4bit"


def _keep_4bit_differentiable(model: HFModule) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    bitsandbytes 0.50 repacks a ``Linear4bit`` on its first forward pass without gradients
    (any generation) when the CPU has AVX512-BF16, and from then on multiplies with a kernel
    that has no backward: v*'s gradient would silently skip every 4-bit projection after the
    edit layer and flow through the residual stream alone. CUDA never takes that path.
    """
    for mod in model.modules():
        if _is_4bit(mod):
            mod.support_avx512bf16_for_cpu = False


def _dequantised(mod: HFModule) -> torch.Tensor:
    """A bitsandbytes 4-bit layer's weight as float32, computed afresh (the stored bytes stay)."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(torch.float32)


def _copy_accelerate_hook(old: HFModule, new: HFModule) -> None:
    """Keep accelerate's device placement when a module is replaced (multi-GPU models)."""
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)


def _cast_input_to_weight(mod, args):
    x = args[0]
    mod._sleeptui_in_dtype = x.dtype
    return (x.to(mod.weight.dtype), *args[1:])


def _cast_output_back(mod, _args, output):
    return output.to(getattr(mod, "_sleeptui_in_dtype", output.dtype))


def _eos_ids(tokenizer, cfg) -> frozenset[int]:
    ids = set()
    for value in (cfg.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


def _pad(
    batch: Sequence[Sequence[int]], pad_id: int, left: bool, device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, sl] = torch.tensor(list(row), dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def _file_key(path: Path) -> str:
    import hashlib

    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :16
    ]


@contextmanager
def _no_hf_progress() -> Iterator[None]:
    """Keep transformers' own tqdm bars off the terminal (and off the app's screen)."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _convert_gguf(path: Path, folder: Path) -> None:
    """Dequantise a GGUF file into a safetensors model folder, written atomically."""
    import shutil
    import tempfile

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with _no_hf_progress():
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        from safetensors.torch import save_model

        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        publish_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
