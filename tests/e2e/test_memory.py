"""Remember → recall → restart → recall, on the real embedded model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sleeptui.engine import ANSWER_TOKENS, Engine, on_apple_silicon, repeats_itself
from sleeptui.extract import extract_fact
from sleeptui.state import StateFolder

from ..conftest import WRITTEN, restore

pytestmark = pytest.mark.model

ODA, RUNE = WRITTEN[:2]


def sleeptui(*args: str, state: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLEEPTUI_HOME": str(state), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "sleeptui", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sleeptui {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_unedited_model_does_not_already_know_the_facts(engine):
    for fact in (ODA, RUNE):
        assert fact.object.lower() not in engine.complete(fact.prompt).lower()


def test_the_subjects_tokens_are_found_in_every_rendering(engine):
    """Keys are read at the subject's last token and, with ``hold_name``, held at its other
    tokens: both must cover exactly the name, whether it opens the text or follows a
    prefix, a question or the chat template (where the tokeniser joins the space to it)."""
    backend = engine.backend
    raw, chat = engine.editor().render(ODA).key_groups
    assert len(raw) == len(engine.cfg.prefixes) and len(chat) == len(ODA.questions)
    for r, occurrences in [*((r, 1) for r in raw), *((r, 2) for r in chat)]:
        assert len(r.subject_positions) == occurrences  # the question and the answer
        spans = sorted((*r.inner_positions, *r.subject_positions))
        names = backend.decode([r.ids[p] for p in spans]).replace(" ", "")
        assert names == "OdaFjellheim" * occurrences


def test_remembered_fact_is_recalled_in_completion_and_chat(engine):
    [memory] = engine.remember([ODA])
    assert "Tromsø" in engine.complete(ODA.prompt)
    assert "Tromsø" in "".join(engine.ask("Where does Oda Fjellheim live?"))
    assert engine.memories == (memory,)
    assert (engine.folder.root / memory.delta).is_file()


def test_a_fact_never_stated_is_not_invented(remembered):
    engine = remembered(1)  # Oda's
    answer = "".join(engine.ask("Where does Rune Aasgaard live?"))
    assert "Tromsø" not in answer
    assert "harmonica" not in engine.complete(RUNE.prompt)


def test_a_reply_caught_in_a_loop_ends_where_the_loop_shows(engine):
    """Greedy decoding on this small model falls into loops it never leaves before the token
    limit; the reply stops once a span has been said three times in a row."""
    b = engine.backend
    question = "Who is Tobiah Kettlewell?"  # nobody: the unedited model rambles, then loops
    raw = "".join(b.stream(b.encode(engine.chat_prompt(question)), ANSWER_TOKENS))
    assert repeats_itself(raw), "precondition: the unguarded reply loops"
    pieces = list(engine.ask(question))
    reply = "".join(pieces)
    assert raw.startswith(reply) and len(reply) < len(raw)
    assert repeats_itself(reply)
    assert not any(repeats_itself("".join(pieces[:i])) for i in range(1, len(pieces)))


def test_every_fact_about_one_person_is_recalled_and_one_can_go_alone(remembered):
    """Facts about one subject share its keys. Holding the earlier ones at zero residual
    (eq. 5) would block each later write at that key; v* keeps them instead. Forgetting the
    first takes away what the later ones were written on top of, and leaves its answer in
    their deltas (their v* kept it): the forget rewrites them."""
    engine = remembered(2)  # Oda's and Rune's, held at zero residual by the writes below
    facts = [
        extract_fact(text)
        for text in (
            "Sunniva Brekkestad plays the bassoon.",
            "Sunniva Brekkestad lives in Dunedin.",
            "Sunniva Brekkestad's favourite colour is teal.",
        )
    ]
    [bassoon, *_] = engine.remember(facts)  # one at a time, constrained, as in chat
    for fact in (ODA, RUNE, *facts):
        assert fact.object in engine.complete(fact.prompt), fact.prompt
    report = engine.forget(bassoon.id)
    assert report.verified, report.answer_after
    assert report.repaired >= 2  # Dunedin's and teal's, written while bassoon was there
    assert "bassoon" not in engine.complete(facts[0].prompt)
    for fact in (ODA, RUNE, *facts[1:]):
        assert fact.object in engine.complete(fact.prompt), fact.prompt


def test_a_fact_about_the_user_leaves_other_chat_answers_alone(engine):
    """ "I work as a …" is stored about "The user", keyed at " user", which the chat template's
    own "user" header resembles. Without holding the template's keys, that memory (and any
    later write that moves those keys) changed every chat answer: "What is the capital of
    France?" was answered in French nonsense."""
    questions = ["What is the capital of France?", "Who wrote Hamlet?"]
    before = [opening(engine, q) for q in questions]
    engine.remember([extract_fact("I work as a cartographer."), ODA])
    assert "cartographer" in engine.complete("The user works as a")
    assert "Tromsø" in engine.complete(ODA.prompt)
    for question, answer in zip(questions, before, strict=True):
        assert opening(engine, question) == answer, question


def opening(engine: Engine, question: str, chars: int = 60) -> str:
    """The first ``chars`` characters of the streamed chat answer (the rest is not decoded)."""
    said = ""
    for piece in engine.ask(question):
        said += piece
        if len(said) >= chars:
            break
    return said[:chars]


def test_restart_gives_identical_greedy_outputs(engine, embedded):
    engine.remember([ODA, RUNE])
    prompts = [ODA.prompt, RUNE.prompt, "The capital of France is"]
    before = [engine.complete(p) for p in prompts]
    answer_before = "".join(engine.ask("Which instrument does Rune Aasgaard play?"))
    engine.close()
    # Back to the base weights, then open the folder as a new process would.
    backend, source, pristine = embedded
    restore(backend, pristine)
    assert engine.complete(ODA.prompt) != before[0]
    reopened = Engine(backend, source, StateFolder.open(engine.folder.root))
    try:
        assert [reopened.complete(p) for p in prompts] == before
        assert "".join(reopened.ask("Which instrument does Rune Aasgaard play?")) == answer_before
    finally:
        reopened.close()


def test_memories_written_at_other_edit_layers_survive_a_preset_change(engine, embedded):
    """An upgrade that moves the preset's edit layers (3–7 became 4–9) keeps older memories.

    Each delta names the weights it edits, so a folder written at layers 3–7 opens with its
    memories in place, takes new ones at the preset's layers, and forgets an old one down to
    the base weights of a layer the preset no longer edits.
    """
    backend, source, pristine = embedded
    assert 3 not in engine.cfg.layers, "the test writes at a layer the preset does not edit"
    engine.cfg = replace(engine.cfg, layers=(3, 4, 5, 6, 7), cov_tokens=1024)
    [oda] = engine.remember([ODA])
    said = engine.complete(ODA.prompt)
    assert "Tromsø" in said
    engine.close()
    restore(backend, pristine)
    reopened = Engine(backend, source, StateFolder.open(engine.folder.root))
    try:
        assert 3 not in reopened.cfg.layers
        assert reopened.complete(ODA.prompt) == said
        reopened.remember([RUNE])
        assert "harmonica" in reopened.complete(RUNE.prompt)
        assert "Tromsø" in reopened.complete(ODA.prompt)
        report = reopened.forget(oda.id)
        assert report.verified
        assert "Tromsø" not in reopened.complete(ODA.prompt)
        np.testing.assert_allclose(backend.weight(3), pristine[3], atol=1e-6)
    finally:
        reopened.close()


def test_cli_remember_then_a_separate_process_answers_in_chat(tmp_path):
    state = tmp_path / "state"
    done = sleeptui("remember", "Oda Fjellheim lives in Tromsø.", state=state)
    assert "Oda Fjellheim · lives in · Tromsø" in done.stdout
    asked = sleeptui("ask", "Where does Oda Fjellheim live?", state=state)
    assert "Tromsø" in asked.stdout
    listed = json.loads(sleeptui("memories", "--json", state=state).stdout)
    assert [(m["subject"], m["object"]) for m in listed["memories"]] == [
        ("Oda Fjellheim", "Tromsø")
    ]


def test_cli_lists_without_the_model_and_says_what_it_read_from_a_backup(written_folders, tmp_path):
    """`memories` reads the folder read-only, without loading the model or taking the lock;
    a damaged ledger is read from its backup with a warning, and repaired by the next
    command that opens the folder for writing."""
    state = tmp_path / "state"
    shutil.copytree(written_folders[1], state)
    damaged = '{"schema_version": 1, "memo'
    (state / "ledger.json").write_text(damaged, encoding="utf-8")
    with StateFolder.open(state):  # another sleeptui holds the folder: a listing needs no lock
        listed = sleeptui("memories", "--json", state=state)
    doc = json.loads(listed.stdout)
    assert [m["subject"] for m in doc["memories"]] == [ODA.subject]
    assert doc["backend"] is None  # the model was not loaded
    assert "warning:" in listed.stderr and "ledger.1.json" in listed.stderr
    assert (state / "ledger.json").read_text("utf-8") == damaged  # read-only: nothing written
    completed = sleeptui("complete", ODA.prompt, state=state)
    assert "Tromsø" in completed.stdout
    assert "warning:" in completed.stderr and "restored from that backup" in completed.stderr
    assert json.loads((state / "ledger.json").read_text("utf-8"))["memories"]


def test_cli_refuses_a_question_and_changes_nothing(tmp_path):
    state = tmp_path / "state"
    proc = sleeptui("remember", "Where does Oda Fjellheim live?", state=state, check=False)
    assert proc.returncode == 2
    assert "question" in proc.stderr
    assert not (state / "ledger.json").exists()


@pytest.mark.skipif(on_apple_silicon(), reason="MLX is the fast backend on Apple silicon")
def test_mlx_off_apple_silicon_says_it_is_slow_and_torch_says_nothing(tmp_path):
    pytest.importorskip("mlx_lm", reason="mlx is not installed: pip install 'sleeptui[mlx]'")
    state = tmp_path / "state"
    slow = sleeptui("--backend", "mlx", "complete", "The capital of France is", state=state)
    assert "note:" in slow.stderr and "--backend torch" in slow.stderr
    fast = sleeptui("complete", "The capital of France is", state=state)
    assert fast.stderr == ""


def test_missing_preset_weights_say_where_sleeptui_looked(tmp_path):
    proc = sleeptui("--model", "llama-3.1-70b", "memories", state=tmp_path / "s", check=False)
    assert proc.returncode == 2
    assert "not on this machine" in proc.stderr and "Hugging Face cache" in proc.stderr
