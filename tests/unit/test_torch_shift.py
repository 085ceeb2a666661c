"""The torch backend's fast v* pass (packed renderings, cached prefix, upper layers only)
against a naive full-model forward with δ added by a forward hook."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from sleeptui.backends import Rendering, ShiftProblem
from sleeptui.backends.torch_backend import TorchBackend, _ShiftPass
from transformers import LlamaConfig, LlamaForCausalLM

LAYER = 1  # δ at the output of decoder layer 1 of 4
SHARED = (5, 6, 7, 8)  # a shared prefix, like a chat template's system prompt


def _backend(attn: str) -> TorchBackend:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(config).float()
    return TorchBackend(model, SimpleNamespace(pad_token_id=0, eos_token_id=2), "tiny")


def _problem(with_prefix: bool = True) -> ShiftProblem:
    """Renderings of different lengths covering the layout's corner cases."""
    g = torch.Generator().manual_seed(1)
    rand = lambda n: tuple(torch.randint(10, 256, (n,), generator=g).tolist())  # noqa: E731
    head = SHARED if with_prefix else ()
    n = len(head)
    renderings = (
        # subject early, four target tokens
        Rendering(head + rand(9), (n + 2,), tuple(range(n + 5, n + 9))),
        # two subject positions, the second inside the target
        Rendering(head + rand(14), (n + 3, n + 11), tuple(range(n + 8, n + 14))),
        # subject at position 0: nothing frozen
        Rendering(rand(6), (0,), (4, 5)),
        # a target read before the first subject position; trailing tokens never read
        Rendering(head + rand(10), (n + 5,), (n + 1, n + 6)),
    )
    kl = (Rendering(rand(5), (2,), ()), Rendering(head + rand(4), (n + 1,), ()))
    return ShiftProblem(layer=LAYER, renderings=renderings, kl_renderings=kl)


def _naive_log_probs(backend: TorchBackend, problem: ShiftProblem, delta: torch.Tensor):
    """Right-padded batch through the whole model, δ added by a hook on ``problem.layer``."""
    everything = problem.renderings + problem.kl_renderings
    width = max(len(r.ids) for r in everything)
    ids = torch.tensor([list(r.ids) + [0] * (width - len(r.ids)) for r in everything])
    mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in everything])

    def add_delta(_mod, _args, hidden):
        shift = torch.zeros_like(hidden)
        for i, r in enumerate(everything):
            shift[i, list(r.subject_positions)] = delta
        return hidden + shift

    hook = backend.model.model.layers[problem.layer].register_forward_hook(add_delta)
    try:
        logits = backend.model(input_ids=ids, attention_mask=mask).logits.float()
    finally:
        hook.remove()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.stack(
        [
            logp[i, p - 1, r.ids[p]]
            for i, r in enumerate(problem.renderings)
            for p in r.target_positions
        ]
    )
    n = len(problem.renderings)
    kl = torch.stack([logp[n + i, len(r.ids) - 1] for i, r in enumerate(problem.kl_renderings)])
    return target, kl


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("with_prefix", [True, False])
def test_fast_pass_matches_naive_forward_and_gradient(attn: str, with_prefix: bool) -> None:
    backend = _backend(attn)
    problem = _problem(with_prefix)
    weights = torch.rand(sum(len(r.target_positions) for r in problem.renderings))
    kl_weights = torch.rand(len(problem.kl_renderings), backend.info.vocab_size)
    results = []
    for log_probs in (
        lambda d: _naive_log_probs(backend, problem, d),
        _ShiftPass(backend.model, problem).log_probs,
    ):
        delta = (0.5 * torch.randn(64, generator=torch.Generator().manual_seed(2))).requires_grad_()
        target, kl = log_probs(delta)
        ((target * weights).sum() + (kl.exp() * kl_weights).sum()).backward()
        results.append((target.detach(), kl.detach(), delta.grad))
    for naive, fast in zip(*results, strict=True):
        assert fast.shape == naive.shape
        torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-4)
    assert results[0][2].norm() > 0  # δ does reach the loss


@pytest.mark.parametrize("shares", [(), (0.1, 0.2, 0.3, 0.4)])
def test_optimise_shift_matches_naive_loop(shares) -> None:
    """The whole eq. 1 optimisation, against the same loop on the naive forward; renderings
    count alike, or by their given shares of the NLL."""
    backend = _backend("sdpa")
    problem = replace(_problem(), shares=shares)
    cfg = SimpleNamespace(
        v_lr=0.5,
        v_steps=6,
        kl_factor=0.5,
        weight_decay=0.5,
        clamp_norm=0.8,
        v_loss_stop=0.0,
        v_bf16=False,
    )
    result = backend.optimise_shift(problem, cfg)

    edits = problem.renderings
    share = shares or (1 / len(edits),) * len(edits)
    weights = torch.tensor(
        [
            w / len(r.target_positions)
            for r, w in zip(edits, share, strict=True)
            for _ in r.target_positions
        ]
    )
    delta = torch.zeros(64, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    h_norm = _naive_h_norm(backend, problem)
    kl_ref = _naive_log_probs(backend, problem, torch.zeros(64))[1]
    for _ in range(cfg.v_steps):
        opt.zero_grad()
        target, kl = _naive_log_probs(backend, problem, delta)
        loss = -(target * weights).sum()
        loss = loss + cfg.kl_factor * torch.nn.functional.kl_div(
            kl_ref, kl, log_target=True, reduction="batchmean"
        )
        loss = loss + cfg.weight_decay * (delta.norm() / h_norm) ** 2
        nll = float(-(target.detach() * weights).sum())
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > cfg.clamp_norm * h_norm:
                delta.mul_(cfg.clamp_norm * h_norm / delta.norm())
    assert result.steps == cfg.v_steps
    assert result.loss == pytest.approx(nll, rel=1e-4)
    torch.testing.assert_close(torch.from_numpy(result.delta), delta.detach(), atol=1e-4, rtol=1e-4)
    assert float(delta.detach().norm()) == pytest.approx(
        cfg.clamp_norm * float(h_norm), rel=1e-4
    )  # clamp was hit


def test_a_bfloat16_pass_follows_the_float32_one_and_leaves_the_model_alone() -> None:
    """``v_bf16``: the upper layers run from bfloat16 copies; the log-probabilities, their
    gradient and the optimised δ stay close to float32's, and the model keeps its weights."""
    backend = _backend("sdpa")
    problem = _problem()
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    delta = (0.3 * torch.randn(64, generator=torch.Generator().manual_seed(2))).requires_grad_()
    passes = {}
    for dtype, cast in ((None, None), (torch.bfloat16, backend._bf16_copy)):
        target, kl = _ShiftPass(backend.model, problem, cast).log_probs(delta)
        (grad,) = torch.autograd.grad(target.sum() + kl.exp().mul(kl).sum(), delta)
        passes[dtype] = (target.detach(), kl.detach(), grad)
    (t32, kl32, g32), (t16, kl16, g16) = passes[None], passes[torch.bfloat16]
    assert t16.dtype == kl16.dtype == torch.float32
    torch.testing.assert_close(t16, t32, atol=0.01, rtol=0)
    torch.testing.assert_close(kl16, kl32, atol=0.01, rtol=0)
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.99

    cfg = SimpleNamespace(
        v_lr=0.5, v_steps=6, kl_factor=0.5, weight_decay=0.5, clamp_norm=0.8, v_loss_stop=0.0
    )
    full = backend.optimise_shift(problem, SimpleNamespace(**vars(cfg), v_bf16=False))
    half = backend.optimise_shift(problem, SimpleNamespace(**vars(cfg), v_bf16=True))
    assert half.steps == full.steps
    assert half.loss == pytest.approx(full.loss, rel=0.05)
    cos = torch.nn.functional.cosine_similarity(
        torch.from_numpy(half.delta), torch.from_numpy(full.delta), dim=0
    )
    assert float(cos) > 0.99
    for name, p in backend.model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, before[name]), name


def test_the_bfloat16_copies_are_kept_until_their_weights_change() -> None:
    """A copy is reused while its module's weights are the same; an in-place edit or a
    replaced weight makes a new one, so a v* pass never reads stale weights."""
    backend = _backend("sdpa")
    layer = backend.model.model.layers[2]
    first = backend._bf16_copy(layer)
    assert backend._bf16_copy(layer) is first
    assert all(t.dtype == torch.bfloat16 for t in first.params.values())

    name = "model.layers.2.mlp.down_proj.weight"
    u, v = torch.ones(64, 1).numpy(), torch.ones(1, 128).numpy()
    backend.add_low_rank_to(name, u, v, 0.5)
    second = backend._bf16_copy(layer)
    assert second is not first
    weight = layer.mlp.down_proj.weight
    torch.testing.assert_close(second.params["mlp.down_proj.weight"], weight.to(torch.bfloat16))

    layer.mlp.down_proj.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    assert backend._bf16_copy(layer) is not second

    problem = _problem()
    delta = torch.zeros(64)
    with torch.no_grad():
        full = _ShiftPass(backend.model, problem).log_probs(delta)[0]
        half = _ShiftPass(backend.model, problem, backend._bf16_copy).log_probs(delta)[0]
    torch.testing.assert_close(half, full, atol=0.01, rtol=0)


def _naive_h_norm(backend: TorchBackend, problem: ShiftProblem) -> torch.Tensor:
    """Mean norm of the residual stream at ``problem.layer``'s output at the subject positions."""
    norms = []
    with torch.no_grad():
        for r in problem.renderings + problem.kl_renderings:
            hs = backend.model(
                input_ids=torch.tensor([r.ids]), output_hidden_states=True
            ).hidden_states
            norms += [hs[problem.layer + 1][0, p].norm() for p in r.subject_positions]
    return torch.stack(norms).mean()


@pytest.mark.parametrize("budget", [8, 512])
def test_probe_matches_full_forward(budget: int, monkeypatch) -> None:
    """Packed, truncated probes give the keys and hidden states of a plain forward."""
    import sleeptui.backends.torch_backend as tb

    monkeypatch.setattr(tb, "PROBE_TOKENS", budget)  # 8: every row its own pack
    backend = _backend("sdpa")
    g = torch.Generator().manual_seed(2)
    rows = [tuple(torch.randint(10, 256, (n,), generator=g).tolist()) for n in (7, 12, 5)]
    positions = [(3,), (2, 9), (4,)]
    keys, hidden = backend.probe(rows, positions, [0, 2], 1)

    got = {0: [], 2: []}
    want_hidden = []
    for row, ps in zip(rows, positions, strict=True):
        seen = {}
        hooks = [
            backend._down_proj(layer).register_forward_pre_hook(
                lambda _m, a, layer=layer, seen=seen: seen.__setitem__(layer, a[0][0])
            )
            for layer in (0, 2)
        ]
        with torch.no_grad():
            out = backend.model(input_ids=torch.tensor([row]), output_hidden_states=True)
        for h in hooks:
            h.remove()
        for layer in (0, 2):
            got[layer] += [seen[layer][p] for p in ps]
        want_hidden += [out.hidden_states[2][0, p] for p in ps]
    for layer in (0, 2):
        torch.testing.assert_close(
            torch.tensor(keys[layer]), torch.stack(got[layer]), atol=1e-5, rtol=1e-4
        )
    torch.testing.assert_close(torch.tensor(hidden), torch.stack(want_hidden), atol=1e-5, rtol=1e-4)
