"""Tiny random Llamas with the same weights in every backend, and a byte-level tokenizer.

Small enough that a whole engine (covariance, wake, sleep, forget) runs in seconds, and the
same numbers in torch and MLX, so that a test can run on either backend or move a state
folder from one to the other.
"""

from __future__ import annotations

from pathlib import Path

from sleeptui.backends import Backend

from sleeptui.models import ModelSource
from sleeptui.presets import EditConfig, Preset

HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 64, 128, 4, 4, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Edits at layers 1–2 of 4; few v* steps and a small Ĉ sample keep every test fast.
SOURCE = ModelSource(
    preset=Preset(
        name="tiny",
        edit=EditConfig(
            layers=(1, 2), lam=1.0, v_lr=0.5, v_steps=4, clamp_norm=1.0, cov_tokens=512
        ),
    ),
    path=Path("tiny"),
)


def byte_tokenizer():
    """One token per byte (so every prefix of a text tokenises to a prefix of its ids), a
    ChatML template, and ``<|im_end|>`` as end of turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )


def tiny_backend(kind: str, tokenizer=None, seed: int = 0) -> Backend:
    """A random 4-layer Llama (``seed`` picks the weights) loaded by backend ``kind``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float()
    if kind == "torch":
        from sleeptui.backends.torch_backend import TorchBackend

        return TorchBackend(model, tokenizer, "tiny")
    if kind == "mlx":
        return _mlx(model, config, tokenizer)
    raise ValueError(f"unknown backend {kind!r}")


def _mlx(model, config, tokenizer) -> Backend:
    """The torch model's weights in mlx-lm's Llama."""
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs
    from sleeptui.backends.mlx_backend import MLXBackend

    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    args = ModelArgs(
        model_type="llama",
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=FF,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=config.rms_norm_eps,
        vocab_size=config.vocab_size,
        rope_theta=rope["rope_theta"],
        tie_word_embeddings=False,
    )
    mlx_model = Model(args)
    mlx_model.load_weights(
        [(k, mx.array(v.numpy())) for k, v in model.state_dict().items()], strict=True
    )
    return MLXBackend(mlx_model, tokenizer, "tiny", frozenset())
