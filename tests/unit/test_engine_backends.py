"""The engine on tiny random Llamas, run once per backend (torch and MLX).

What every backend must give the engine: weights that are the base plus exactly the stored
factors, through wake, restart, forget and sleep; and state folders that one backend writes
and the other opens to the same weights and answers.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import replace

import numpy as np
import pytest
from sleeptui.backends import ProbeResume, says

from sleeptui import covariance, memit
from sleeptui.engine import Engine, _rounds, base_perplexity_path, fingerprint, repeats_itself
from sleeptui.facts import Fact
from sleeptui.paths import cache_dir
from sleeptui.state import StateFolder

from .tiny_llama import SOURCE, byte_tokenizer, tiny_backend

NO_MLX = "mlx is not installed: pip install 'sleeptui[mlx]'"
BACKENDS = [
    "torch",
    pytest.param(
        "mlx", marks=pytest.mark.skipif(not importlib.util.find_spec("mlx_lm"), reason=NO_MLX)
    ),
]
BACKEND_KINDS = ("torch", "mlx")
FACTS = [
    Fact("Oda Fjellheim", "lives in", "Tromsø", questions=("Where does Oda Fjellheim live?",)),
    Fact("Rune Aasgaard", "plays the", "harmonica"),
    Fact("Kasimir Oyelaran", "works as a", "glassblower"),
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test samples its tiny model's Ĉ into its own cache, not the user's."""
    monkeypatch.setenv("SLEEPTUI_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(params=BACKENDS)
def backend(request, tokenizer):
    return tiny_backend(request.param, tokenizer)


@pytest.fixture
def engine(backend, tmp_path):
    eng = Engine(backend, SOURCE, StateFolder.open(tmp_path / "state"))
    yield eng
    eng.close()


def base_weights(backend) -> dict[int, np.ndarray]:
    return {layer: backend.weight(layer) for layer in range(backend.info.n_layers)}


def assert_weights_are_base_plus_stored_factors(engine: Engine, base: dict) -> None:
    """W = W_base + Σ scale · u @ v over the ledger, read back from the folder's files."""
    expected = {layer: w.astype(np.float64) for layer, w in base.items()}
    for memory in engine.memories:
        for layer, (u, v) in engine.folder.read_delta(memory, engine.shapes).items():
            expected[layer] += memory.scale * (u.astype(np.float64) @ v.astype(np.float64))
    for layer, w in expected.items():
        np.testing.assert_allclose(engine.backend.weight(layer), w, atol=1e-5, rtol=1e-5)


# -- the backend interface -------------------------------------------------------------


def test_weight_is_a_float32_copy_that_later_edits_leave_alone(backend):
    before = backend.weight(1)
    assert before.dtype == np.float32 and before.shape == (64, 128)
    backend.add_low_rank(1, np.ones((64, 1), np.float32), np.ones((1, 128), np.float32), 1.0)
    assert not np.allclose(backend.weight(1), before)
    backend.set_weight(1, before)
    np.testing.assert_array_equal(backend.weight(1), before)


def test_low_rank_edits_add_exactly_and_undo_exactly(backend):
    base = backend.weight(2)
    rng = np.random.default_rng(3)
    u, v = rng.normal(size=(64, 1)), rng.normal(size=(1, 128))
    backend.add_low_rank(2, u, v, 0.5)
    np.testing.assert_allclose(backend.weight(2) - base, 0.5 * (u @ v), atol=1e-6)
    backend.add_low_rank(2, u, v, -0.5)
    np.testing.assert_allclose(backend.weight(2), base, atol=1e-6)


def test_a_clone_is_independent_of_the_original(backend):
    base = backend.weight(1)
    answer = backend.greedy([[3, 4, 5]], 4)
    clone = backend.clone()
    assert clone is not None
    clone.add_low_rank(1, np.ones((64, 1)), np.ones((1, 128)), 1.0)
    np.testing.assert_array_equal(backend.weight(1), base)
    np.testing.assert_allclose(clone.weight(1), base + 1.0, atol=1e-6)
    assert backend.greedy([[3, 4, 5]], 4) == answer


def test_batched_greedy_equals_one_prompt_at_a_time(backend):
    batch = [[3, 4, 5, 6, 7, 8], [9, 10], [12, 13, 14, 15]]
    together = backend.greedy(batch, 8)
    assert together == [backend.greedy([row], 8)[0] for row in batch]
    assert all(len(row) == 8 for row in together)  # a random model never says <|im_end|>


def test_greedy_until_ends_a_row_once_it_says_its_target_and_leaves_the_others(backend):
    batch = [[3, 4, 5, 6, 7, 8], [9, 10], [12, 13, 14, 15]]
    full = backend.greedy(batch, 8)
    target = backend.decode(full[0][:3]).strip().upper()  # said by the third token at most
    assert target
    ended = backend.greedy(batch, 8, until=[target, "never said \u2603", None])
    n = len(ended[0])
    assert 1 <= n <= 3 and ended[0] == full[0][:n]
    assert says(backend.decode(ended[0]), target)
    assert not says(backend.decode(ended[0][:-1]), target)
    assert ended[1:] == full[1:]


def test_a_reply_streamed_from_a_worker_thread_is_the_greedy_reply(backend):
    pieces: list[str] = []
    worker = threading.Thread(target=lambda: pieces.extend(backend.stream([3, 4, 5, 6], 8)))
    worker.start()
    worker.join()
    assert "".join(pieces) == backend.decode(backend.greedy([[3, 4, 5, 6]], 8)[0])
    stop = threading.Event()
    stop.set()
    assert list(backend.stream([3, 4, 5, 6], 8, stop)) == []


def test_samples_are_reproducible_for_a_seed(backend):
    first = backend.sample(["ab", "xyz"], 10, seed=7)
    assert first == backend.sample(["ab", "xyz"], 10, seed=7)
    assert first != backend.sample(["ab", "xyz"], 10, seed=8)
    assert [row[:2] for row in first] == [backend.encode("ab"), backend.encode("xy")]


def test_a_resumed_probe_reads_what_a_probe_from_the_embeddings_reads(backend, tokenizer):
    """After layer 1's weights change, a probe resumed from its kept inputs gives the keys
    and hidden states of a fresh probe, and so does a third one after no change at all."""
    rows = [
        tokenizer.encode(t) for t in ("Oda Fjellheim lives in", "Rune plays", "a b c d e f g h")
    ]
    positions = [[3, len(rows[0]) - 1], [len(rows[1]) - 1], [0, 5]]
    resume = ProbeResume()
    backend.probe(rows, positions, [1], 3, resume)
    assert resume.clean == 4
    unchanged, _ = backend.probe(rows, positions, [2], None)
    rng = np.random.default_rng(0)
    d_out, d_in = backend.weight(1).shape
    backend.add_low_rank(1, rng.normal(size=(d_out, 1)), rng.normal(size=(1, d_in)), 0.5)
    resume.changed(1)
    assert resume.start([2], 3) == 1
    for _ in range(2):
        keys, hidden = backend.probe(rows, positions, [2], 3, resume)
        fresh_keys, fresh_hidden = backend.probe(rows, positions, [2], 3)
        np.testing.assert_allclose(keys[2], fresh_keys[2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hidden, fresh_hidden, rtol=1e-5, atol=1e-6)
    assert not np.allclose(keys[2], unchanged[2], rtol=1e-3, atol=1e-4)  # the change is seen


# -- the engine on each backend --------------------------------------------------------


def test_remembered_facts_are_the_base_weights_plus_their_stored_factors(engine):
    base = base_weights(engine.backend)
    memories = engine.remember(FACTS[:2])
    assert [m.subject for m in memories] == ["Oda Fjellheim", "Rune Aasgaard"]
    for layer in (0, 3):  # outside the edit layers nothing moved
        np.testing.assert_array_equal(engine.backend.weight(layer), base[layer])
    assert not np.allclose(engine.backend.weight(2), base[2])
    assert_weights_are_base_plus_stored_factors(engine, base)


def test_a_later_fact_leaves_the_earlier_facts_keys_almost_unmoved(engine):
    """Constrained wake (eq. 5): the new edit's output at an old memory's keys is small next
    to its output at its own keys."""
    [first] = engine.remember(FACTS[:1])
    held = engine.keys_of([first])[0]
    before = {layer: engine.backend.weight(layer) for layer in engine.cfg.layers}
    [second] = engine.remember(FACTS[1:2])
    own = engine.keys_of([second])[0]
    for layer in engine.cfg.layers:
        change = engine.backend.weight(layer).astype(np.float64) - before[layer]
        at_held = np.linalg.norm(change @ held[layer].T, axis=0).max()
        at_own = np.linalg.norm(change @ own[layer].T, axis=0).min()
        assert at_held < 0.05 * at_own


def inner_name_keys(engine: Engine, fact: Fact, layer: int) -> np.ndarray:
    """Keys at the subject's tokens other than its last, in the fact's own renderings."""
    rendered = [r for group in engine.editor().render(fact).key_groups for r in group]
    assert all(r.inner_positions for r in rendered)
    keys, _ = engine.backend.probe(
        [r.ids for r in rendered], [r.inner_positions for r in rendered], [layer], None
    )
    return keys[layer].astype(np.float64)


def held_ratio(engine: Engine, layer: int, keys: np.ndarray) -> float:
    """Write the first fact; the largest output of its change at ``keys`` (rows) over the
    smallest at its own key columns."""
    before = engine.backend.weight(layer).astype(np.float64)
    [memory] = engine.remember(FACTS[:1])
    own = engine.keys_of([memory])[0][layer]
    change = engine.backend.weight(layer).astype(np.float64) - before
    at_keys = np.linalg.norm(change @ keys.T, axis=0).max()
    return float(at_keys / np.linalg.norm(change @ own.T, axis=0).min())


@pytest.mark.parametrize("hold", [False, True])
def test_holding_the_name_leaves_its_other_tokens_almost_unmoved(engine, hold):
    """With ``hold_name`` the edit's output at the subject's other tokens is small next to its
    output at the subject's last token (at the first edit layer, whose keys the edit does
    not move); without it, it is not held there."""
    engine.cfg = replace(engine.cfg, hold_name=hold)
    layer = engine.cfg.layers[0]
    inner = inner_name_keys(engine, FACTS[0], layer)
    assert (held_ratio(engine, layer, inner) < 0.05) == hold


@pytest.mark.parametrize("hold", [False, True])
def test_holding_the_template_leaves_its_tokens_almost_unmoved(engine, hold):
    """With ``hold_template`` the edit's output at the chat template's own tokens (which
    every chat turn goes through) is small next to its output at the subject's last token,
    at the first edit layer; without it, it is not held there."""
    engine.cfg = replace(engine.cfg, hold_template="all" if hold else "none")
    layer = engine.cfg.layers[0]
    template = engine.editor().template_keys()[layer]
    assert len(template) and template.shape[1] == engine.backend.weight(layer).shape[1]
    assert (held_ratio(engine, layer, template) < 0.05) == hold


@pytest.mark.parametrize("hold", [False, True])
def test_a_second_fact_about_a_subject_is_not_held_off_its_keys(engine, hold):
    """Facts about one subject share its keys (the raw prompts' keys at the subject's last
    token do not even see the relation). Held at zero residual (``hold_same_subject``), the
    first fact leaves a second write almost nothing at those keys; kept by v* instead, the
    second write acts there about as much as the first did (at the first edit layer, in the
    raw prompts' key column)."""
    engine.cfg = replace(engine.cfg, hold_same_subject=hold)
    layer = engine.cfg.layers[0]

    def output_at_own_keys(fact: Fact) -> float:
        before = engine.backend.weight(layer).astype(np.float64)
        [memory] = engine.remember([fact])
        own = engine.keys_of([memory])[0][layer]
        change = engine.backend.weight(layer).astype(np.float64) - before
        return float(np.linalg.norm(change @ own[0]))  # the raw prompts' key column

    first = output_at_own_keys(FACTS[0])
    second = output_at_own_keys(Fact("Oda Fjellheim", "plays the", "harmonica"))
    if hold:  # measured: 0.13 of the first write's
        assert second < 0.3 * first
    else:  # measured: 1.4 times the first write's
        assert second > 0.7 * first


def test_a_batch_is_written_in_rounds_with_one_fact_per_subject(engine):
    """One solve cannot give a subject's shared keys two objects: the batch's second fact
    about Oda is written in a round of its own, keeping the first."""
    base = base_weights(engine.backend)
    oda_plays = Fact("oda  fjellheim", "plays the", "harmonica")  # case and spacing aside
    assert _rounds([FACTS[0], FACTS[1], oda_plays, FACTS[2]]) == [
        [FACTS[0], FACTS[1], FACTS[2]],
        [oda_plays],
    ]
    memories = engine.remember([FACTS[0], FACTS[1], oda_plays], batch=True)
    assert [m.object for m in memories] == ["Tromsø", "harmonica", "harmonica"]
    assert_weights_are_base_plus_stored_factors(engine, base)


@pytest.mark.parametrize("share", [None, 0.5, 0.8])
def test_the_chat_turns_weigh_their_share_of_the_objective(engine, share):
    """With ``chat_share`` the chat turn's target tokens weigh that share of v*'s NLL and the
    raw prompts the rest; without it every rendering weighs alike."""
    engine.cfg = replace(engine.cfg, chat_share=share)
    rendered = engine.editor().render(FACTS[0])
    weights = engine.editor().shift_problem(rendered).token_weights()
    n_raw = sum(len(r.target_positions) for r in rendered.key_groups[0])
    n_renderings = len(rendered.targets)
    assert rendered.n_raw == len(engine.cfg.prefixes) and n_renderings == rendered.n_raw + 1
    chat = sum(weights[n_raw:])
    expected = share if share is not None else 1 / n_renderings
    assert chat == pytest.approx(expected) and sum(weights) == pytest.approx(1.0)


@pytest.mark.parametrize(("questions", "expected"), [(1, 0.5), (2, 2 / 3), (3, 0.75)])
def test_per_turn_chat_shares_give_each_question_what_one_alone_gets(engine, questions, expected):
    """``chat_share_per_turn``: n questions at a share of 0.5 weigh n / (n + 1) together,
    each as much as the raw prompts together; one question is the plain share."""
    engine.cfg = replace(engine.cfg, chat_share=0.5, chat_share_per_turn=True)
    fact = replace(
        FACTS[0],
        questions=tuple(f"Question {i} about {FACTS[0].subject}?" for i in range(questions)),
    )
    rendered = engine.editor().render(fact)
    weights = engine.editor().shift_problem(rendered).token_weights()
    n_raw = sum(len(r.target_positions) for r in rendered.key_groups[0])
    assert sum(weights[n_raw:]) == pytest.approx(expected) and sum(weights) == pytest.approx(1.0)


def test_the_editor_solves_against_the_covariance_shrunk_as_configured(engine):
    engine.cfg = replace(engine.cfg, cov_shrink=0.7)
    c_inv = engine.editor().c_inv
    cov = engine.covariance()
    for layer in engine.cfg.layers:
        got = memit.to_numpy(c_inv[layer])
        shrunk = memit.inverse_covariance(cov[layer], shrink=0.7)
        np.testing.assert_allclose(got, shrunk, rtol=1e-4, atol=1e-6 * np.abs(shrunk).max())
        assert not np.allclose(got, memit.inverse_covariance(cov[layer]), rtol=0.1)


@pytest.mark.parametrize("kind", ["names", "chat", "text"])
def test_a_prior_is_probed_once_then_read_from_the_cache(engine, tmp_path, kind):
    engine.cfg = replace(engine.cfg, cov_shrink=0.7, **{f"cov_{kind}": 0.3})
    c_inv = engine.editor().c_inv
    cov = engine.covariance()
    prior = covariance.load_or_compute_prior(
        kind, engine.backend, engine.cfg.layers, cache_dir(), engine.fingerprint
    )
    for layer in engine.cfg.layers:
        k = prior[layer]
        assert k.shape == cov[layer].shape and np.allclose(k, k.T)
        expected = memit.inverse_covariance(cov[layer], shrink=0.7, priors=[(k, 0.3)])
        got = memit.to_numpy(c_inv[layer])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
        assert not np.allclose(got, memit.inverse_covariance(cov[layer], shrink=0.7), rtol=0.1)
    again = Engine(engine.backend, SOURCE, StateFolder.open(tmp_path / "other"))
    again.cfg = engine.cfg
    again.backend.probe = None  # probing again would fail here
    try:
        again.covariance()  # cached by the first editor
        cached = covariance.load_or_compute_prior(
            kind, again.backend, again.cfg.layers, cache_dir(), again.fingerprint
        )
        for layer in engine.cfg.layers:
            np.testing.assert_allclose(cached[layer], prior[layer], rtol=1e-6)
    finally:
        again.close()
        del again.backend.probe


def test_without_priors_none_is_probed(engine):
    engine.editor()
    for kind in covariance.PRIORS:
        path = covariance.prior_path(cache_dir(), engine.fingerprint, engine.cfg.layers, kind)
        assert not path.exists()


def test_the_sensitivity_is_measured_once_then_read_from_the_cache(engine, tmp_path):
    engine.cfg = replace(engine.cfg, fisher_decay=1.0)
    m = engine.editor().sensitivity
    d = engine.backend.info.d_model
    assert m.shape == (d, d) and np.allclose(m, m.T)
    assert np.trace(m) == pytest.approx(d, rel=1e-4)  # mean eigenvalue 1
    assert np.linalg.eigvalsh(m.astype(np.float64)).min() > -1e-4 * d  # E[g gᵀ] is PSD
    again = Engine(engine.backend, SOURCE, StateFolder.open(tmp_path / "other"))
    again.cfg = engine.cfg
    again.backend.residual_fisher = None  # a second measurement would fail here
    try:
        np.testing.assert_array_equal(again.editor().sensitivity, m)
    finally:
        again.close()
        del again.backend.residual_fisher


def test_the_unedited_perplexity_is_cached_per_device_and_precision(engine, tmp_path):
    """bf16 on a GPU and float32 on the CPU measure perplexities a drift threshold apart:
    one must never be compared with the other's."""
    here = base_perplexity_path(tmp_path, engine.fingerprint, engine.backend)
    assert engine.backend.numerics in here.name

    class OnAnotherDevice:
        name = engine.backend.name
        numerics = "cuda-bfloat16"

    there = base_perplexity_path(tmp_path, engine.fingerprint, OnAnotherDevice())
    assert there != here and there.parent == here.parent


def test_the_unedited_perplexity_is_measured_without_the_memories_then_cached(
    engine, tmp_path, monkeypatch
):
    unedited = engine.perplexity()
    engine.remember(FACTS[:2])
    edited = base_weights(engine.backend)
    assert engine.perplexity() != unedited
    # Nothing cached yet (the test's own cache): measured with both deltas taken out.
    engine._base_ppl = None
    base_perplexity_path(cache_dir(), engine.fingerprint, engine.backend).unlink()
    assert engine.base_perplexity() == pytest.approx(unedited, rel=1e-5)
    for layer, w in base_weights(engine.backend).items():  # put back exactly
        np.testing.assert_array_equal(w, edited[layer])
    assert engine.ledger.ppl_base == pytest.approx(unedited, rel=1e-5)

    again = Engine(engine.backend, SOURCE, StateFolder.open(tmp_path / "other"))
    monkeypatch.setattr(Engine, "perplexity", lambda self: pytest.fail("measured again"))
    try:
        assert again.base_perplexity() == engine.base_perplexity()
    finally:
        again.close()


def test_the_drift_is_measured_from_the_cached_unedited_perplexity_not_the_ledgers(engine):
    """A folder written by a version with another reference text holds another ppl_base."""
    engine.remember(FACTS[:1])
    engine.ledger = replace(engine.ledger, ppl_base=1e6)
    ppl = engine.committed_perplexity()
    assert engine.last_ppl_drift() == pytest.approx(ppl / engine.base_perplexity() - 1)
    engine.remember(FACTS[1:2])
    assert engine.ledger.ppl_base == engine.base_perplexity()


def test_without_fisher_decay_the_sensitivity_is_never_measured(engine):
    engine.backend.residual_fisher = None
    try:
        assert engine.editor().sensitivity is None
        engine.remember(FACTS[:1])
    finally:
        del engine.backend.residual_fisher


def test_the_fisher_decay_with_an_even_metric_is_weight_decay(engine):
    editor = engine.editor()
    problem = editor.shift_problem(editor.render(FACTS[0]))
    d = engine.backend.info.d_model
    even = replace(problem, metric=np.eye(d, dtype=np.float32))
    with_metric = replace(engine.cfg, fisher_decay=0.7, weight_decay=0.5)
    plain = replace(engine.cfg, fisher_decay=0.0, weight_decay=1.2)
    got = engine.backend.optimise_shift(even, with_metric).delta
    np.testing.assert_allclose(got, engine.backend.optimise_shift(problem, plain).delta, atol=1e-6)
    assert not np.allclose(got, engine.backend.optimise_shift(problem, with_metric).delta)


def test_the_fisher_decay_turns_the_shift_away_from_a_sensitive_direction(engine):
    editor = engine.editor()
    problem = editor.shift_problem(editor.render(FACTS[0]))
    # The tiny model's targets barely move: without weight decay, δ grows where they pull.
    cfg = replace(engine.cfg, v_steps=30, clamp_norm=100.0, weight_decay=0.0)
    d = engine.backend.info.d_model
    metric = np.zeros((d, d), dtype=np.float32)
    metric[0, 0] = d  # all the sensitivity on the first coordinate
    sensitive = replace(problem, metric=metric)

    def share_on_first(fisher_decay: float) -> float:
        delta = engine.backend.optimise_shift(sensitive, replace(cfg, fisher_decay=fisher_decay))
        return abs(delta.delta[0]) / np.linalg.norm(delta.delta)

    assert share_on_first(1.0) < 0.1 * share_on_first(0.0)


def test_a_write_lowers_the_target_nll_the_model_reaches_without_a_shift(engine):
    editor = engine.editor()
    before = editor.achieved(FACTS[0])
    engine.remember(FACTS[:1])
    assert editor.achieved(FACTS[0]) < before


def test_a_write_that_fell_short_is_redone_with_the_retry_clamp(engine):
    """A clamp too small to move anything makes the first write fall short: the fact is
    reverted and written again with the wider clamp, and only that write is stored."""
    base = base_weights(engine.backend)
    engine.cfg = replace(engine.cfg, clamp_norm=1e-9, retry_clamp_norm=4.0, retry_nll=0.0)
    [memory] = engine.remember(FACTS[:1])
    assert memory.events[0].kind == "remembered"
    assert memory.events[0].detail == {"clamp": 4.0}
    assert not np.allclose(engine.backend.weight(2), base[2], atol=1e-4)
    assert_weights_are_base_plus_stored_factors(engine, base)
    # A write that took is kept as it was.
    engine.cfg = replace(engine.cfg, clamp_norm=2.0, retry_nll=float("inf"))
    [second] = engine.remember(FACTS[1:2])
    assert second.events[0].detail == {"clamp": 2.0}
    assert_weights_are_base_plus_stored_factors(engine, base)


def test_reopening_the_folder_gives_the_same_weights_and_answers(engine, tmp_path):
    base = base_weights(engine.backend)
    engine.remember(FACTS)
    edited = base_weights(engine.backend)
    prompts = [engine.backend.encode(f.prompt) for f in FACTS]
    answers = engine.backend.greedy(prompts, 8)
    engine.close()
    for layer, w in base.items():
        engine.backend.set_weight(layer, w)
    reopened = Engine(engine.backend, SOURCE, StateFolder.open(tmp_path / "state"))
    try:
        for layer, w in edited.items():
            np.testing.assert_allclose(reopened.backend.weight(layer), w, atol=1e-6)
        assert reopened.backend.greedy(prompts, 8) == answers
    finally:
        reopened.close()


def test_forget_leaves_exactly_the_other_memories_in_the_weights(engine):
    base = base_weights(engine.backend)
    memories = engine.remember(FACTS)
    report = engine.forget(memories[1].id)
    assert report.memory.id == memories[1].id
    assert [m.id for m in engine.memories] == [memories[0].id, memories[2].id]
    assert_weights_are_base_plus_stored_factors(engine, base)


def test_the_repair_after_a_forget_rewrites_in_place_and_keeps_files_and_weights_agreed(engine):
    """The repair step of forget: the broken memory, and any healthy one its revert exposed,
    are rewritten under their own ids, and the weights are the base plus the stored factors."""
    base = base_weights(engine.backend)
    memories = engine.remember(FACTS)
    rewritten = engine._repair([memories[0]], list(memories[1:]))
    assert [m.id for m in engine.memories] == [m.id for m in memories]
    repaired = [
        m.id
        for m in engine.memories
        if (m.events[-1].kind, m.events[-1].detail)
        == ("refreshed", {"reason": "repair after forget"})
    ]
    assert memories[0].id in repaired
    assert rewritten == len(repaired)  # the count covers exactly the memories rewritten
    assert_weights_are_base_plus_stored_factors(engine, base)


def test_a_forget_rewrites_the_memories_about_its_subject_written_while_it_was_there(
    engine, monkeypatch
):
    """Later writes about a subject keep its earlier facts' answers in their v*, so their
    deltas say the forgotten object too: the forget rewrites exactly those memories, not
    the ones about its subject written before it nor the ones about others."""
    ticks = iter(range(10_000))
    monkeypatch.setattr("sleeptui.ledger.now", lambda: f"2026-01-01T00:00:{next(ticks):04d}+00:00")
    base = base_weights(engine.backend)
    oda = "Oda Fjellheim"
    earlier, rune, gone, later = engine.remember(
        [
            FACTS[0],
            FACTS[1],
            Fact(oda, "plays the", "bassoon"),
            Fact(oda, "works as a", "glassblower"),
        ]
    )
    assert engine._carriers([earlier, rune, later], [gone]) == [later]
    engine.forget(gone.id)
    repaired = {
        m.id for m in engine.memories if m.events[-1].detail == {"reason": "repair after forget"}
    }
    assert later.id in repaired
    assert_weights_are_base_plus_stored_factors(engine, base)


def test_a_committed_sleep_refreshes_the_degraded_and_keeps_files_and_weights_agreed(engine):
    base = base_weights(engine.backend)
    engine.remember(FACTS)
    engine.sleep_cfg = replace(engine.sleep_cfg, ppl_tolerance=float("inf"))
    report = engine.sleep()
    assert not report.rolled_back
    assert report.healthy + report.degraded == len(FACTS)
    assert report.refreshed == report.degraded
    assert all(m.events[1].kind == "audited" for m in engine.memories)
    assert_weights_are_base_plus_stored_factors(engine, base)


def test_a_cycle_over_the_tolerance_keeps_what_fits_and_defers_the_rest(
    engine, monkeypatch, tmp_path
):
    base = base_weights(engine.backend)
    engine.remember(FACTS)  # the random model recalls none of them: all three are refreshed
    # Perplexity as measured in turn: before the cycle, after all three refreshes (+20%), then
    # the gate's bisection: the first refresh alone passes (+0.5%), the first two do not.
    measured = iter([10.0, 12.0, 10.05, 10.5])
    monkeypatch.setattr(Engine, "perplexity", lambda self: next(measured))
    engine.sleep_cfg = replace(engine.sleep_cfg, ppl_tolerance=0.01)
    report = engine.sleep()
    assert not report.rolled_back
    assert (report.refreshed, report.deferred) == (1, 2)
    assert report.ppl_after == 10.05 and report.ppl_tried == 12.0
    first, *rest = engine.memories
    assert first.events[-1].kind == "refreshed"
    assert [m.events[-1].kind for m in rest] == ["refresh deferred"] * 2
    assert all(engine.folder.read_delta(m, engine.shapes) == {} for m in rest)  # empty deltas
    assert engine.folder.read_delta(first, engine.shapes)
    assert_weights_are_base_plus_stored_factors(engine, base)
    engine.close()
    for layer, w in base.items():
        engine.backend.set_weight(layer, w)
    reopened = Engine(engine.backend, SOURCE, StateFolder.open(tmp_path / "state"))
    try:
        assert_weights_are_base_plus_stored_factors(reopened, base)
    finally:
        reopened.close()


def test_a_rolled_back_sleep_leaves_weights_and_files_as_they_were(engine):
    engine.remember(FACTS)
    weights = base_weights(engine.backend)
    files = {p: p.read_bytes() for p in sorted((engine.folder.root / "deltas").iterdir())}
    ledger = (engine.folder.root / "ledger.json").read_bytes()
    engine.sleep_cfg = replace(engine.sleep_cfg, ppl_tolerance=-1.0)  # any cycle "fails"
    report = engine.sleep()
    assert report.rolled_back
    assert {p: p.read_bytes() for p in sorted((engine.folder.root / "deltas").iterdir())} == files
    assert (engine.folder.root / "ledger.json").read_bytes() == ledger
    for layer, w in weights.items():
        np.testing.assert_array_equal(engine.backend.weight(layer), w)


def test_both_backends_measure_the_same_residual_fisher(tokenizer):
    pytest.importorskip("mlx_lm", reason=NO_MLX)
    rows = [tokenizer.encode("Oda Fjellheim lives in Tromsø."), tokenizer.encode("Hello there")]
    got = {
        kind: tiny_backend(kind, tokenizer).residual_fisher(rows, [1, 2]) for kind in BACKEND_KINDS
    }
    for layer in (1, 2):
        torch_f, mlx_f = got["torch"][layer], got["mlx"][layer]
        assert np.abs(torch_f).max() > 0
        np.testing.assert_allclose(mlx_f, torch_f, rtol=1e-3, atol=1e-4 * np.abs(torch_f).max())


# -- a state folder moving between backends --------------------------------------------


@pytest.mark.parametrize("writer, reader", [("torch", "mlx"), ("mlx", "torch")])
def test_a_folder_written_by_one_backend_opens_in_the_other(writer, reader, tokenizer, tmp_path):
    pytest.importorskip("mlx_lm", reason=NO_MLX)
    source, target = tiny_backend(writer, tokenizer), tiny_backend(reader, tokenizer)
    assert fingerprint(source) == fingerprint(target)
    written = Engine(source, SOURCE, StateFolder.open(tmp_path / "state"))
    written.remember(FACTS)
    written.close()
    opened = Engine(target, SOURCE, StateFolder.open(tmp_path / "state"))
    try:
        assert [m.id for m in opened.memories] == [m.id for m in written.memories]
        for layer in range(source.info.n_layers):
            np.testing.assert_allclose(target.weight(layer), source.weight(layer), atol=1e-6)
        prompts = [target.encode(f.prompt) for f in FACTS]
        assert target.greedy(prompts, 8) == source.greedy(prompts, 8)
    finally:
        opened.close()


@pytest.mark.parametrize(
    ("text", "loops"),
    [
        ("He was a son of Kari and Kari. " * 3, True),
        ("It began at sea. " + "He was a son of Kari and Kari. " * 3, True),
        ("He was a son of Kari and Kari. " * 2, False),  # said twice: still speech
        ("a no-nonsense no-nonsense no-nonsense no-nonsense no-nonsense no-nonsense", True),
        ("ha ha ha ha ha ha", False),  # a short span repeated is not a loop
        ("1. Paris, France\n2. Rome, Italy\n3. Berlin, Germany\n", False),
        ("", False),
    ],
)
def test_a_reply_repeats_itself_when_a_long_span_is_said_three_times_at_its_end(text, loops):
    assert repeats_itself(text) is loops
