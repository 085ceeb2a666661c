"""The large-model path (issue 9) on a tiny random Llama stored like a real checkpoint.

bf16 weights on disk; loaded in bf16 as on a GPU (on the CPU here when no GPU is present,
the same code path), or in bitsandbytes NF4. The checks: quantised weights survive an edit
byte for byte, a folder written through the bf16 path opens on CPU float32 torch and on MLX,
and the MEMIT algebra gives the same update on tensors as on NumPy arrays.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from sleeptui.backends.torch_backend import TorchBackend

from sleeptui import memit
from sleeptui.engine import Engine
from sleeptui.facts import Fact
from sleeptui.models import resolve
from sleeptui.presets import with_edit
from sleeptui.state import StateFolder

EDIT = (1, 2)
FACTS = [
    Fact("Ilse Brandvold", "lives in", "Tromsø", questions=("Where does Ilse Brandvold live?",)),
    Fact("Quentin Arbogast", "works as", "a glassblower", questions=("What is Quentin's job?",)),
]
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tokenizer(request):
    """The embedded model's tokenizer; on a GPU machine without the embedded model, the one
    in the folder that $SLEEPTUI_TEST_TOKENIZER names."""
    from transformers import AutoTokenizer

    folder = os.environ.get("SLEEPTUI_TEST_TOKENIZER")
    if folder:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    backend, _, _ = request.getfixturevalue("embedded")
    return backend.tok


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A 4-layer random Llama saved in bf16 with a real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("bf16-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _engine(backend: TorchBackend, folder, state) -> Engine:
    source = resolve(str(folder))
    source = type(source)(
        preset=with_edit(source.preset, layers=EDIT, cov_tokens=1024), path=folder
    )
    return Engine(backend, source, StateFolder.open(state))


def _quantised_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    """The stored bytes of every 4-bit weight and of its quantisation constants."""
    out = {}
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Linear4bit":
            out[name] = _raw(mod.weight.data)
            out[name + ".absmax"] = _raw(mod.weight.quant_state.absmax)
    return out


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, whatever its dtype (bitsandbytes may keep absmax in bfloat16, which
    NumPy has no type for)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@needs_bnb
def test_a_4bit_model_edits_without_touching_its_quantised_weights(checkpoint, tmp_path):
    backend = TorchBackend.from_folder(checkpoint, DEVICE, edit_layers=EDIT, four_bit=True)
    layers = backend.model.model.layers
    kinds = [type(layer.mlp.down_proj).__name__ for layer in layers]
    # Edited layers, and the two the fingerprint reads, are loaded exact; the rest is NF4.
    assert kinds == ["Linear", "Linear", "Linear", "Linear"]
    assert type(layers[1].mlp.up_proj).__name__ == "Linear4bit"
    backend.greedy([backend.encode("Hello")], 1)  # a forward pass without gradients first
    before = _quantised_bytes(backend.model)
    assert len(before) >= 2 * 4 * 6  # every attention and MLP projection but four down_projs
    edited_before = {layer: backend.weight(layer) for layer in EDIT}

    engine = _engine(backend, checkpoint, tmp_path / "state")
    engine.remember(FACTS[:1])
    engine.close()

    assert _quantised_bytes(backend.model) == before
    for layer in EDIT:
        change = backend.weight(layer) - edited_before[layer]
        assert np.abs(change).max() > 0
        assert np.linalg.matrix_rank(change.astype(np.float64), tol=1e-4) <= 2  # text + chat keys


@needs_bnb
def test_gradients_pass_through_4bit_layers_after_a_generation(checkpoint):
    """v* backpropagates through the 4-bit projections after the edit layer. bitsandbytes
    0.50 would repack them for a CPU kernel without a backward on the first forward pass
    without gradients, and the gradient would then skip them silently."""
    backend = TorchBackend.from_folder(checkpoint, DEVICE, edit_layers=EDIT, four_bit=True)
    backend.greedy([backend.encode("Hello there")], 2)
    up = backend.model.model.layers[1].mlp.up_proj
    assert type(up).__name__ == "Linear4bit"
    x = torch.randn(3, up.in_features, device=backend._device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "an autograd kernel was not registered"
        up(x).float().pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0


@needs_bnb
def test_a_quantised_layer_is_dequantised_before_its_first_edit(checkpoint):
    backend = TorchBackend.from_folder(checkpoint, DEVICE, edit_layers=(), four_bit=True)
    up = backend.model.model.layers[1].mlp.up_proj  # a 4-bit layer the edit never reads
    up_bytes = up.weight.data.cpu().numpy().tobytes()
    assert type(backend.model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    base = backend.weight(1)  # dequantised
    u = np.ones((64, 1), np.float32)
    v = np.full((1, 256), 0.5, np.float32)
    backend.add_low_rank(1, u, v, 2.0)
    mod = backend.model.model.layers[1].mlp.down_proj
    assert type(mod).__name__ == "Linear" and mod.weight.dtype == torch.float32
    np.testing.assert_allclose(backend.weight(1), base + 1.0, atol=1e-6)
    assert up.weight.data.cpu().numpy().tobytes() == up_bytes
    x = torch.randint(0, 100, (1, 3))
    assert torch.isfinite(backend.model(input_ids=x.to(backend._device)).logits).all()


@pytest.fixture(scope="module")
def written_in_bf16(checkpoint, tmp_path_factory):
    """A state folder written through the bf16 path: (folder, fingerprint, ids, edited weights)."""
    writer = TorchBackend.from_folder(checkpoint, DEVICE, edit_layers=EDIT, dtype=torch.bfloat16)
    assert writer.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    state = tmp_path_factory.mktemp("bf16-state") / "state"
    engine = _engine(writer, checkpoint, state)
    engine.remember(FACTS)
    written = (engine.fingerprint, [m.id for m in engine.memories])
    expected = {layer: writer.weight(layer) for layer in EDIT}
    engine.close()
    return state, *written, expected


def _copied(written_in_bf16, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(written_in_bf16[0], copy)
    return copy


def test_a_folder_written_through_the_bf16_path_opens_on_cpu_torch(
    checkpoint, written_in_bf16, tmp_path
):
    _, fingerprint, ids, expected = written_in_bf16
    reader = TorchBackend.from_folder(checkpoint, "cpu", edit_layers=EDIT)
    assert reader.model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    reopened = _engine(reader, checkpoint, _copied(written_in_bf16, tmp_path))
    assert reopened.fingerprint == fingerprint
    assert [m.id for m in reopened.memories] == ids
    for layer in EDIT:  # W_base + Σ u v, whatever loaded it
        np.testing.assert_allclose(reader.weight(layer), expected[layer], atol=1e-5)
    reopened.close()


@pytest.mark.skipif(
    importlib.util.find_spec("mlx_lm") is None,
    reason="the MLX backend is an extra: pip install 'sleeptui[mlx]'",
)
def test_a_folder_written_through_the_bf16_path_opens_on_mlx(checkpoint, written_in_bf16, tmp_path):
    from sleeptui.backends.mlx_backend import MLXBackend

    _, fingerprint, ids, expected = written_in_bf16
    on_mlx = _engine(
        MLXBackend.from_folder(checkpoint), checkpoint, _copied(written_in_bf16, tmp_path)
    )
    assert on_mlx.fingerprint == fingerprint
    assert [m.id for m in on_mlx.memories] == ids
    for layer in EDIT:
        np.testing.assert_allclose(on_mlx.backend.weight(layer), expected[layer], atol=1e-5)
    on_mlx.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on CI)")
def test_on_a_gpu_the_covariance_and_the_solve_stay_on_the_layers_device(checkpoint, tmp_path):
    backend = TorchBackend.from_folder(checkpoint, "cuda", edit_layers=EDIT)
    engine = _engine(backend, checkpoint, tmp_path / "state")
    engine.remember(FACTS[:1])
    for layer in EDIT:
        c_inv = engine.editor().c_inv[layer]
        assert isinstance(c_inv, torch.Tensor) and c_inv.device.type == "cuda"
        assert c_inv.dtype == torch.float64
        assert backend.model.model.layers[layer].mlp.down_proj.weight.device.type == "cuda"
    assert engine.check(engine.memories)  # generation works with the edit applied
    engine.close()


def test_memit_gives_the_same_update_on_tensors_as_on_numpy_arrays():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 24))
    c = x.T @ x / len(x)
    new, held = rng.normal(size=(24, 2)), rng.normal(size=(24, 3))
    residual = rng.normal(size=(8, 2))

    def update(lift):
        c_inv = memit.inverse_covariance(lift(c))
        keys = memit.with_held_keys(lift(new), lift(held), lam=10.0, lam_hold=0.1)
        m = memit.solve_update(keys, c_inv, lam=10.0)
        return residual @ memit.to_numpy(m)[:2]

    on_numpy = update(lambda a: a)
    on_torch = update(lambda a: torch.as_tensor(a, dtype=torch.float64, device=DEVICE))
    np.testing.assert_allclose(on_torch, on_numpy, rtol=1e-9, atol=1e-12)
