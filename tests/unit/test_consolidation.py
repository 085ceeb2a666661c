"""Consolidation on tiny random Llamas: the adapter's format, its bookkeeping, rollback, forget.

Whether facts actually move into the adapter is measured on the real model
(tests/e2e/test_consolidation_real.py and bench/consolidate.py); here the invariants hold
whatever the tiny model learns: the weights are always the base plus what the folder says.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch
from sleeptui.backends import Rendering

from sleeptui import consolidate
from sleeptui.adapter import CONFIG, WEIGHTS, Adapter, LoraSettings
from sleeptui.engine import Engine
from sleeptui.errors import StateError
from sleeptui.facts import Fact
from sleeptui.ledger import Recall, now
from sleeptui.state import StateFolder

from .tiny_llama import SOURCE, byte_tokenizer, tiny_backend

NO_MLX = "mlx is not installed: pip install 'sleeptui[mlx]'"
FACTS = [
    Fact("Oda Fjellheim", "lives in", "Tromsø", questions=("Where does Oda Fjellheim live?",)),
    Fact("Rune Aasgaard", "plays the", "harmonica", questions=("What does Rune Aasgaard play?",)),
    Fact("Kasimir Oyelaran", "works as a", "glassblower"),
]
FAST = LoraSettings(r=4, alpha=8, lr=1e-2, epochs=2, nap_epochs=1, batch_size=4, replay_samples=2)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLEEPTUI_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def open_engine(backend, root, tolerance=float("inf")) -> Engine:
    engine = Engine(backend, SOURCE, StateFolder.open(root))
    engine.lora = replace(FAST, layers=engine.lora.layers, ppl_tolerance=tolerance)
    return engine


@pytest.fixture
def recalling(monkeypatch):
    """A random tiny model recalls nothing, so nothing would ever be due; these tests are
    about bookkeeping, so every audit here reports recall (the real model's test and
    bench/consolidate.py measure real recall)."""

    def check(self, memories):
        return [Recall(at=now(), completion=True, chat=True) for _ in memories]

    monkeypatch.setattr(Engine, "check", check)


def expected_weights(engine: Engine, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """W_base + Σ scale · u @ v over the ledger + the adapter, all read back from the folder."""
    out = {name: w.astype(np.float64) for name, w in base.items()}
    for memory in engine.memories:
        if memory.scale == 0:
            assert not (engine.folder.root / memory.delta).exists()
            continue
        for layer, (u, v) in engine.folder.read_delta(memory, engine.shapes).items():
            out[f"model.layers.{layer}.mlp.down_proj.weight"] += memory.scale * (u @ v)
    files = engine.folder.read_adapter(engine.ledger)
    if files is not None:
        for name, (u, v) in Adapter.from_files(files, "test").factors().items():
            out[name] += u.astype(np.float64) @ v.astype(np.float64)
    return out


def all_names(backend) -> list[str]:
    return [
        f"model.layers.{layer}.mlp.{t}.weight"
        for layer in range(backend.info.n_layers)
        for t in ("gate_proj", "up_proj", "down_proj")
    ]


def assert_weights_match_the_folder(engine: Engine, base: dict) -> None:
    got = engine.backend.params(list(base))
    for name, w in expected_weights(engine, base).items():
        np.testing.assert_allclose(got[name], w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_the_adapter_files_are_peft_s_format_and_peft_applies_them_as_we_fuse_them(
    tokenizer, tmp_path
):
    peft = pytest.importorskip("peft")
    backend = tiny_backend("torch", tokenizer)
    base_model = tiny_backend("torch", tokenizer).model
    rng = np.random.default_rng(0)
    modules = [f"model.layers.{i}.mlp.up_proj" for i in (1, 2)]
    adapter = Adapter(
        r=4,
        alpha=8.0,
        a={m: rng.standard_normal((4, 64)).astype(np.float32) * 0.1 for m in modules},
        b={m: rng.standard_normal((128, 4)).astype(np.float32) * 0.1 for m in modules},
    )
    settings = LoraSettings(r=4, alpha=8.0, targets=("up_proj",), layers=(1, 2))
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, data in adapter.files("tiny", settings).items():
        (folder / name).write_bytes(data)
    for name, (u, v) in adapter.factors().items():
        backend.add_low_rank_to(name, u, v, 1.0)
    loaded = peft.PeftModel.from_pretrained(base_model, folder).eval()
    ids = torch.tensor([backend.encode("Oda Fjellheim lives in")])
    with torch.no_grad():
        ours = backend.model(input_ids=ids).logits
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    again = Adapter.from_files({n: (folder / n).read_bytes() for n in (WEIGHTS, CONFIG)}, "x")
    for m in modules:
        np.testing.assert_array_equal(again.a[m], adapter.a[m])


def test_training_learns_the_targets_and_leaves_the_model_as_it_was(tokenizer):
    backend = tiny_backend("torch", tokenizer)
    names = all_names(backend)
    before = backend.params(names)
    ids = backend.encode("Oda Fjellheim lives in Tromsø")
    example = Rendering(tuple(ids), (), tuple(range(len(ids) - 6, len(ids))))
    losses = []
    settings = replace(FAST, layers=(0, 1, 2, 3), lr=5e-2, epochs=40, batch_size=1)
    adapter = backend.train_lora(
        [example], settings, progress=lambda i, n, loss: losses.append(loss)
    )
    # A random tiny model's small LM head caps how sure it can get (≈ 4.3 nats here).
    assert losses[-1] < losses[0] - 0.5
    after = backend.params(names)
    for name in names:
        np.testing.assert_array_equal(after[name], before[name])
    mlp = backend.model.model.layers[1].mlp
    assert all(
        type(getattr(mlp, t)).__name__ == "Linear" for t in ("gate_proj", "up_proj", "down_proj")
    )
    assert any(np.abs(b).max() > 0 for b in adapter.b.values())


def test_the_anchor_holds_the_model_on_other_text_while_it_learns(tokenizer):
    """The KL term: trained with anchor text, the adapter changes the model's predictions
    there far less than without it, and it still learns the fact."""
    backend = tiny_backend("torch", tokenizer)
    ids = backend.encode("Oda Fjellheim lives in Tromsø")
    fact = Rendering(tuple(ids), (), tuple(range(len(ids) - 6, len(ids))))
    # Text about the same person: what a fact's training is most likely to bend.
    other = [backend.encode(t) for t in ("Oda Fjellheim likes tea.", "Oda Fjellheim has a dog.")]
    anchor = [Rendering(tuple(r), (), tuple(range(1, len(r)))) for r in other]
    settings = replace(FAST, layers=(0, 1, 2, 3), lr=0.2, epochs=10, batch_size=2, kl_weight=20.0)
    with torch.no_grad():
        base = backend._target_logits(anchor).log_softmax(-1)

    def shift(adapter) -> float:
        """KL(base ‖ adapted) on the anchor text, and the loss on the fact, adapter applied."""
        for name, (u, v) in adapter.factors().items():
            backend.add_low_rank_to(name, u, v, 1.0)
        with torch.no_grad():
            now = backend._target_logits(anchor).log_softmax(-1)
            fact_loss = torch.nn.functional.cross_entropy(
                backend._target_logits([fact]),
                torch.tensor([ids[p] for p in fact.target_positions]),
            )
        for name, (u, v) in adapter.factors().items():
            backend.add_low_rank_to(name, u, v, -1.0)
        kl = torch.nn.functional.kl_div(now, base, log_target=True, reduction="batchmean")
        return float(kl), float(fact_loss)

    free_kl, _ = shift(backend.train_lora([fact], settings))
    held_kl, held_loss = shift(backend.train_lora([fact], settings, anchor=anchor))
    with torch.no_grad():
        start_loss = float(
            torch.nn.functional.cross_entropy(
                backend._target_logits([fact]),
                torch.tensor([ids[p] for p in fact.target_positions]),
            )
        )
    assert held_kl < 0.5 * free_kl
    assert held_loss < start_loss - 0.5


def test_a_committed_consolidation_keeps_weights_and_folder_agreed_and_survives_a_restart(
    tokenizer, tmp_path, recalling
):
    backend = tiny_backend("torch", tokenizer)
    base = backend.params(all_names(backend))
    engine = open_engine(backend, tmp_path / "state")
    engine.remember(FACTS)
    report = engine.consolidate("sleep")
    assert not report.rolled_back
    assert engine.ledger.adapter is not None
    assert set(engine.ledger.adapter.facts) <= {m.id for m in engine.memories}
    assert sum(report.stages.values()) == len(FACTS)
    assert report.advanced == len(FACTS)
    for m in engine.memories:  # each fact moved exactly one step
        assert (m.scale, m.stage) == (0.5, "consolidating")
        assert m.events[-1].kind == "scale changed"
    assert_weights_match_the_folder(engine, base)
    engine.close()
    reopened = open_engine(tiny_backend("torch", tokenizer), tmp_path / "state")
    try:
        got, want = reopened.backend.params(list(base)), backend.params(list(base))
        for name in base:
            np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
    finally:
        reopened.close()


def test_a_rolled_back_consolidation_leaves_weights_and_folder_byte_identical(
    tokenizer, tmp_path, recalling
):
    backend = tiny_backend("torch", tokenizer)
    engine = open_engine(backend, tmp_path / "state")
    engine.remember(FACTS)
    engine.lora = replace(engine.lora, ppl_tolerance=float("inf"))
    engine.consolidate("nap")  # an adapter exists, so rollback has one to put back
    names = engine.adapter_weight_names()
    weights = backend.params(names)
    files = {p: p.read_bytes() for p in sorted(engine.folder.root.rglob("*")) if p.is_file()}
    engine.lora = replace(engine.lora, ppl_tolerance=-1.0)  # any consolidation "fails"
    report = engine.consolidate("sleep")
    assert report.rolled_back and report.advanced == 0 and report.due == len(FACTS)
    assert {
        p: p.read_bytes() for p in sorted(engine.folder.root.rglob("*")) if p.is_file()
    } == files
    after = backend.params(names)
    for name in names:
        np.testing.assert_array_equal(after[name], weights[name])
    engine.close()


def test_forgetting_a_fact_the_adapter_holds_retrains_it_without_that_fact(
    tokenizer, tmp_path, recalling
):
    backend = tiny_backend("torch", tokenizer)
    base = backend.params(all_names(backend))
    engine = open_engine(backend, tmp_path / "state")
    engine.remember(FACTS)
    engine.consolidate("nap")
    old = engine.ledger.adapter
    gone = engine.memories[0]
    [report] = engine.forget_many([gone.id])
    assert report.memory.id == gone.id
    new = engine.ledger.adapter
    assert new is not None and gone.id not in new.facts and new.path != old.path
    # The old adapter, trained on the forgotten fact, has left the folder, backups included.
    assert not (engine.folder.root / old.path).exists()
    assert gone.subject.encode() not in b"".join(
        p.read_bytes() for p in engine.folder.root.rglob("*") if p.is_file()
    )
    assert_weights_match_the_folder(engine, base)
    engine.close()


def test_a_damaged_adapter_file_is_refused_with_its_name(tokenizer, tmp_path, recalling):
    engine = open_engine(tiny_backend("torch", tokenizer), tmp_path / "state")
    engine.remember(FACTS[:1])
    engine.consolidate("nap")
    path = engine.folder.root / engine.ledger.adapter.path / WEIGHTS
    engine.close()
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StateError, match="adapter_model.safetensors"):
        open_engine(tiny_backend("torch", tokenizer), tmp_path / "state")


@pytest.mark.skipif(not importlib.util.find_spec("mlx_lm"), reason=NO_MLX)
def test_an_adapter_written_by_torch_applies_in_mlx(tokenizer, tmp_path, recalling):
    torch_backend = tiny_backend("torch", tokenizer)
    engine = open_engine(torch_backend, tmp_path / "state")
    engine.remember(FACTS)
    engine.consolidate("nap")
    names = engine.adapter_weight_names()
    engine.close()
    mlx_backend = tiny_backend("mlx", tokenizer)
    opened = open_engine(mlx_backend, tmp_path / "state")
    try:
        got, want = mlx_backend.params(names), torch_backend.params(names)
        for name in names:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5)
        prompts = [mlx_backend.encode(f.prompt) for f in FACTS]
        assert mlx_backend.greedy(prompts, 8) == torch_backend.greedy(prompts, 8)
    finally:
        opened.close()


def test_the_schedule_moves_one_step_at_a_time():
    assert [consolidate.next_scale(s) for s in (1.0, 0.5, 0.1)] == [0.5, 0.1, 0.0]
    with pytest.raises(StopIteration):
        consolidate.next_scale(0.0)
