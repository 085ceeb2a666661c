"""The MLX backend against the torch backend: same weights, same logits, same v*.

Tiny random Llamas (the same weights in both libraries) check the math exactly and fast;
the tests marked ``model`` check the embedded GGUF model as each backend loads it. What
every backend owes the engine is checked on both in test_engine_backends.py.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed: pip install 'sleeptui[mlx]'")
torch = pytest.importorskip("torch", reason="the MLX backend is checked against the torch backend")

from sleeptui.backends import Rendering, ShiftProblem  # noqa: E402
from sleeptui.backends.mlx_backend import MLXBackend, ShiftPass  # noqa: E402
from sleeptui.backends.torch_backend import TorchBackend, _ShiftPass  # noqa: E402

LAYER = 1  # δ at the output of decoder layer 1 of 4
CFG = SimpleNamespace(
    v_lr=0.5,
    v_steps=6,
    kl_factor=0.5,
    weight_decay=0.5,
    clamp_norm=0.8,
    v_loss_stop=0.0,
    v_bf16=False,
)


def _tiny_pair() -> tuple[TorchBackend, MLXBackend]:
    """A random 4-layer Llama in torch and the same weights in MLX."""
    from mlx_lm.models.llama import Model, ModelArgs
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        attn_implementation="sdpa",
    )
    tok = SimpleNamespace(
        pad_token_id=0, eos_token_id=2, decode=lambda ids, **_: "".join(f"<{i}>" for i in ids)
    )
    model = LlamaForCausalLM(config).float()
    args = ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=config.rms_norm_eps,
        vocab_size=256,
        rope_theta=config.rope_parameters["rope_theta"]
        if hasattr(config, "rope_parameters")
        else config.rope_theta,
        tie_word_embeddings=False,
    )
    mlx_model = Model(args)
    mlx_model.load_weights(
        [(k, mx.array(v.numpy())) for k, v in model.state_dict().items()], strict=True
    )
    return TorchBackend(model, tok, "tiny"), MLXBackend(mlx_model, tok, "tiny", frozenset({2}))


@pytest.fixture(scope="module")
def tiny() -> tuple[TorchBackend, MLXBackend]:
    return _tiny_pair()


def _problem() -> ShiftProblem:
    """Renderings of different lengths: shared prefixes, two subject positions, a target
    read before the subject, trailing tokens never read, and two KL prompts."""
    rng = np.random.default_rng(1)
    rand = lambda n: tuple(int(t) for t in rng.integers(10, 256, n))  # noqa: E731
    head = (5, 6, 7, 8)
    renderings = (
        Rendering(head + rand(9), (6,), tuple(range(9, 13))),
        Rendering(head + rand(14), (7, 15), tuple(range(12, 18))),
        Rendering(rand(6), (0,), (4, 5)),
        Rendering(head + rand(10), (9,), (5, 10)),
    )
    kl = (Rendering(rand(5), (2,), ()), Rendering(head + rand(4), (5,), ()))
    return ShiftProblem(layer=LAYER, renderings=renderings, kl_renderings=kl)


def test_tiny_model_gives_the_same_logits_in_both_libraries(tiny):
    t, m = tiny
    ids = [[3, 17, 99, 4, 250, 31, 8]]
    with torch.no_grad():
        expected = t.model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(m.model(mx.array(ids))), expected, atol=1e-4)


def test_shift_log_probs_match_torch_at_the_same_delta(tiny):
    t, m = tiny
    problem = _problem()
    delta = np.random.default_rng(2).normal(size=64).astype(np.float32)
    fast = ShiftPass(m, problem)
    target, kl = fast.log_probs(mx.array(delta))
    reference = _ShiftPass(t.model, problem)
    with torch.no_grad():
        t_target, t_kl = reference.log_probs(torch.from_numpy(delta))
    assert float(fast.h_norm) == pytest.approx(float(reference.h_norm), rel=1e-5)
    np.testing.assert_allclose(np.array(target), t_target.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.array(kl), t_kl.numpy(), atol=1e-4)


@pytest.mark.parametrize("shares", [(), (0.1, 0.2, 0.3, 0.4)])
def test_optimise_shift_follows_the_torch_trajectory(tiny, shares):
    """Same objective (renderings' shares included), Adam and clamp: the same δ after the
    same steps."""
    t, m = tiny
    problem = replace(_problem(), shares=shares)
    ours = m.optimise_shift(problem, CFG)
    theirs = t.optimise_shift(problem, CFG)
    assert ours.steps == theirs.steps == CFG.v_steps
    assert ours.loss == pytest.approx(theirs.loss, rel=1e-3)
    np.testing.assert_allclose(ours.delta, theirs.delta, atol=1e-3, rtol=1e-3)


def test_optimise_shift_stops_early_as_torch_does(tiny):
    t, m = tiny
    cfg = SimpleNamespace(**{**vars(CFG), "v_loss_stop": 10.0})  # met before any step
    ours, theirs = m.optimise_shift(_problem(), cfg), t.optimise_shift(_problem(), cfg)
    assert ours.steps == theirs.steps == 1
    assert ours.loss == pytest.approx(theirs.loss, rel=1e-4)
    assert not ours.delta.any()


def test_probe_reads_the_same_keys_and_hidden_states_as_torch(tiny):
    t, m = tiny
    batch = [[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15]]
    positions = [[1, 5], [2], [0, 3]]
    keys, hidden = m.probe(batch, positions, [0, 2], 1)
    t_keys, t_hidden = t.probe(batch, positions, [0, 2], 1)
    assert keys.keys() == t_keys.keys()
    for layer in keys:
        assert keys[layer].shape == (5, 128)
        np.testing.assert_allclose(keys[layer], t_keys[layer], atol=1e-4)
    np.testing.assert_allclose(hidden, t_hidden, atol=1e-4)


def test_batched_greedy_continues_as_torch_does(tiny):
    t, m = tiny
    batch = [[3, 4, 5, 6, 7, 8], [9, 10], [12, 13, 14, 15]]
    assert m.greedy(batch, 8) == t.greedy(batch, 8)


def test_low_rank_edits_add_exactly_and_set_weight_restores():
    _, m = _tiny_pair()
    base = m.weight(2)
    assert base.dtype == np.float32 and base.shape == (64, 128)
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(64, 1)), rng.normal(size=(1, 128))
    m.add_low_rank(2, u, v, 0.5)
    np.testing.assert_allclose(m.weight(2) - base, 0.5 * (u @ v), atol=1e-6)
    m.add_low_rank(2, u, v, -0.5)
    np.testing.assert_allclose(m.weight(2), base, atol=1e-6)
    m.set_weight(2, base)
    np.testing.assert_array_equal(m.weight(2), base)
    with pytest.raises(ValueError):
        m.set_weight(2, base.T)


# -- the embedded model, as each backend loads it --------------------------------------


@pytest.fixture(scope="module")
def real_mlx(embedded):
    """The embedded GGUF loaded by the MLX backend (the torch one is the shared fixture)."""
    from sleeptui.paths import cache_dir

    _, source, _ = embedded
    return MLXBackend.from_gguf(source.path, cache_dir())


@pytest.mark.model
def test_both_backends_see_the_same_base_model(fresh_model, real_mlx):
    from sleeptui.engine import fingerprint

    torch_backend, _ = fresh_model
    assert real_mlx.info == replace(torch_backend.info, source=real_mlx.info.source)
    assert fingerprint(real_mlx) == fingerprint(torch_backend)
    for layer in (0, 4, real_mlx.info.n_layers - 1):
        np.testing.assert_array_equal(real_mlx.weight(layer), torch_backend.weight(layer))


@pytest.mark.model
def test_both_backends_complete_prompts_alike(fresh_model, real_mlx):
    torch_backend, _ = fresh_model
    chat = real_mlx.chat_text([{"role": "user", "content": "What is the capital of France?"}])
    assert chat == torch_backend.chat_text(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    prompts = [real_mlx.encode(p) for p in ("The capital of France is", chat, "Water is made of")]
    assert prompts == [
        torch_backend.encode(p) for p in ("The capital of France is", chat, "Water is made of")
    ]
    ours = real_mlx.greedy(prompts, 8)
    assert ours == torch_backend.greedy(prompts, 8)
    assert "Paris" in real_mlx.decode(ours[1])


@pytest.mark.model
def test_real_shift_makes_the_target_likely_as_torch_does(fresh_model, real_mlx):
    """A fact's v* on the embedded model: the target becomes likely, and both backends
    agree on the objective's parts at the δ found (the torch one is the reference)."""
    from sleeptui.facts import Fact
    from sleeptui.renderings import render

    torch_backend, _ = fresh_model
    fact = Fact("Oda Fjellheim", "lives in", "Tromsø")
    r = render(real_mlx, fact, ("",), chat=False, chat_keys=False)  # mlx's CPU BLAS is slow
    problem = ShiftProblem(layer=7, renderings=r.targets, kl_renderings=r.kl)
    cfg = SimpleNamespace(
        v_lr=0.5,
        v_steps=20,
        kl_factor=0.0625,
        weight_decay=0.5,
        clamp_norm=4.0,
        v_loss_stop=0.05,
        v_bf16=False,
    )
    result = real_mlx.optimise_shift(problem, cfg)
    reference = torch_backend.optimise_shift(problem, cfg)

    initial = -float(ShiftPass(real_mlx, problem).log_probs(mx.zeros(576))[0].mean())
    assert result.loss < min(cfg.v_loss_stop, initial / 20)
    assert result.steps == reference.steps < cfg.v_steps  # stopped early, at the same step
    ours = ShiftPass(real_mlx, problem).log_probs(mx.array(result.delta))
    with torch.no_grad():
        theirs = _ShiftPass(torch_backend.model, problem).log_probs(torch.from_numpy(result.delta))
    np.testing.assert_allclose(np.array(ours[0]), theirs[0].numpy(), atol=2e-3)
    np.testing.assert_allclose(np.array(ours[1]), theirs[1].numpy(), atol=2e-3)


@pytest.mark.model
def test_a_4bit_mlx_folder_loads_with_float32_down_projections(real_mlx, tmp_path):
    """mlx-community style: everything quantised, down_proj dequantised for edits."""
    import mlx.nn as nn
    from mlx_lm import convert
    from sleeptui.backends.mlx_backend import DownProj

    t, _ = _tiny_pair()
    t.model.save_pretrained(tmp_path / "hf")
    real_mlx.tok.save_pretrained(tmp_path / "hf")  # any tokenizer will do
    convert(
        str(tmp_path / "hf"),
        mlx_path=str(tmp_path / "4bit"),
        quantize=True,
        q_group_size=32,
        q_bits=4,
    )
    m = MLXBackend.from_folder(tmp_path / "4bit")
    block = m.model.layers[0]
    assert isinstance(block.mlp.gate_proj, nn.QuantizedLinear)
    assert isinstance(block.mlp.down_proj, DownProj)
    assert m.weight(0).dtype == np.float32
    np.testing.assert_allclose(m.weight(0), t.weight(0), atol=0.01)  # 4-bit rounding only
    base = m.weight(0)
    m.add_low_rank(0, np.ones((64, 1)), np.ones((1, 128)), 0.25)
    np.testing.assert_allclose(m.weight(0), base + 0.25, atol=1e-6)
