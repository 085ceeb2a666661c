"""LoRA adapters in peft's own file format, and the weight changes they stand for.

Sleep consolidation trains one adapter that holds the consolidated facts. It is stored in
the state folder exactly as ``peft.PeftModel.save_pretrained`` writes one
(``adapter_model.safetensors`` + ``adapter_config.json``), so that peft and other tools
can load it, and it acts on the weights like every other memory: for each target module,

    W ← W + (α / r) · B @ A        (A: r × d_in, B: d_out × r)

which the backends fuse into the in-memory weights (MLX keeps a quantised module quantised
and adds the same product beside it). Nothing here imports torch or peft.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load, save

from sleeptui.errors import StateError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FILES = (WEIGHTS, CONFIG)
_KEY = re.compile(r"base_model\.model\.((?:[A-Za-z0-9_]+\.)*[A-Za-z0-9_]+)\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoraSettings:
    """How consolidation trains its adapter (names as in peft and the dual-system paper).

    Attributes:
        r: LoRA rank.
        alpha: LoRA α; the update is scaled by α / r.
        targets: Module names the adapter wraps in each of ``layers`` (``q_proj``, ``up_proj``, …).
        layers: Decoder layers that get adapters.
        lr: AdamW learning rate.
        epochs: Passes over the training set in a deep-sleep consolidation.
        nap_epochs: Passes in a nap (one short pass).
        batch_size: Examples per step.
        replay_samples: General-text samples the model writes itself (fixed seed, half chat,
            half prose) on which training holds the model's next-token distribution to what
            it was (KL), so that the adapter does not bend the model toward the facts.
        kl_weight: Weight of that KL term beside the facts' loss.
        ppl_tolerance: Relative perplexity rise one consolidation may cause before it is rolled
            back.
        loss_stop: Training stops after an epoch whose mean loss fell below this: a
            warm-started adapter that already holds its facts is not trained on until it
            overfits (on the embedded model that cost +7.6% perplexity in a second cycle).
        seed: Seed of the example order and of the replay samples.
    """

    r: int = 16
    alpha: float = 32.0
    # MLP only: on the embedded model, adapters on attention as well cost +38% perplexity
    # where MLP-only ones cost +1.2%, for the same recall (README, "Consolidation").
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    layers: tuple[int, ...] = ()
    lr: float = 1e-4
    epochs: int = 3
    nap_epochs: int = 1
    batch_size: int = 8
    replay_samples: int = 16
    kl_weight: float = 1.0
    ppl_tolerance: float = 0.02
    loss_stop: float = 0.3
    seed: int = 0


@dataclass(frozen=True)
class Adapter:
    """A trained adapter: per module (``model.layers.4.self_attn.q_proj``), A and B."""

    r: int
    alpha: float
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{weight name: (u, v)}`` with ΔW = u @ v = (α / r) · B @ A."""
        return {
            f"{module}.weight": (self.scaling * self.b[module], self.a[module])
            for module in sorted(self.a)
        }

    def files(self, base_model: str, settings: LoraSettings) -> dict[str, bytes]:
        """The two files of peft's format, as bytes."""
        tensors = {}
        for module in sorted(self.a):
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
                self.a[module], dtype=np.float32
            )
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
                self.b[module], dtype=np.float32
            )
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": self.use_rslora,
            "init_lora_weights": True,
            "inference_mode": True,
            "target_modules": sorted(settings.targets),
            "layers_to_transform": sorted(settings.layers) or None,
            "layers_pattern": None,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        return {
            WEIGHTS: save(tensors, metadata={"format": "pt"}),
            CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        }

    @classmethod
    def from_files(cls, files: dict[str, bytes], source: str) -> Adapter:
        """Parse peft's two files.

        Raises:
            StateError: naming ``source``, when either file is not a LoRA adapter we can apply.
        """
        try:
            config = json.loads(files[CONFIG])
            r, alpha = int(config["r"]), float(config["lora_alpha"])
            rslora = bool(config.get("use_rslora", False))
            if (
                config.get("peft_type") != "LORA"
                or config.get("rank_pattern")
                or config.get("alpha_pattern")
            ):
                raise ValueError("only plain LoRA adapters (one rank, one alpha) are supported")
            tensors = load(files[WEIGHTS])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise StateError(f"The adapter in {source} is not readable ({e}).") from e
        a: dict[str, np.ndarray] = {}
        b: dict[str, np.ndarray] = {}
        for key, value in tensors.items():
            match = _KEY.fullmatch(key)
            if match is None:
                raise StateError(f"The adapter in {source} holds an unexpected tensor {key!r}.")
            (a if match.group(2) == "A" else b)[match.group(1)] = value.astype(np.float32)
        if set(a) != set(b) or any(a[m].shape[0] != r or b[m].shape[1] != r for m in a):
            raise StateError(f"The adapter in {source} has unpaired or mis-shaped A/B tensors.")
        return cls(r=r, alpha=alpha, a=a, b=b, use_rslora=rslora)
