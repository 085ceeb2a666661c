"""Memories move between backends: a state folder written with torch, copied and opened with
MLX, recalls what torch recalled, and the other way round; wake and sleep go on working on
the reading side. On the real embedded model.

The acceptance test of issue 8 moves 20 facts each way. mlx's Linux CPU wheel multiplies
matrices with the reference BLAS (about 3.5 GFLOP/s on the 2-core CI machine, against about
130 for NumPy's), so one fact written by MLX there takes about a minute and that test about
half an hour: it runs on Apple silicon, or where SLEEPTUI_PORTABILITY=1 is set. A small
torch → MLX check runs everywhere.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from sleeptui.engine import Engine, load_backend
from sleeptui.facts import Fact
from sleeptui.state import StateFolder

from ..conftest import WRITTEN, restore

pytest.importorskip("mlx_lm", reason="mlx is not installed: pip install 'sleeptui[mlx]'")
pytestmark = pytest.mark.model
APPLE_SILICON = sys.platform == "darwin" and platform.machine() == "arm64"
twenty_facts_each_way = pytest.mark.skipif(
    not (APPLE_SILICON or os.environ.get("SLEEPTUI_PORTABILITY") == "1"),
    reason="about 30 min with mlx's reference-BLAS CPU build: set SLEEPTUI_PORTABILITY=1",
)

# The bench pool's first 20 facts (../shared/bench/facts.json), each with its first question.
FACTS = [
    Fact.from_dict(d)
    for d in json.loads(
        (Path(__file__).parents[1] / "data" / "portability_facts.json").read_text("utf-8")
    )
]
ODA = WRITTEN[0]


@pytest.fixture(scope="module")
def backends(embedded):
    """Both backends on the embedded model (torch is the run's shared one), and each one's
    pristine weights."""
    torch_backend, source, torch_pristine = embedded
    mlx_backend = load_backend(source, "mlx")
    mlx_pristine = {layer: mlx_backend.weight(layer) for layer in range(mlx_backend.info.n_layers)}
    return source, {"torch": (torch_backend, torch_pristine), "mlx": (mlx_backend, mlx_pristine)}


def recalled(engine: Engine) -> tuple[set[str], set[str]]:
    """Subjects whose object the model says now: in the completion, and in the chat answer."""
    checks = engine.check(engine.memories)
    return (
        {m.subject for m, r in zip(engine.memories, checks, strict=True) if r.completion},
        {m.subject for m, r in zip(engine.memories, checks, strict=True) if r.chat},
    )


def test_facts_written_with_torch_are_recalled_from_a_copy_with_mlx(
    backends, written_folders, tmp_path
):
    source, models = backends
    (torch_backend, torch_base), (mlx_backend, mlx_base) = models["torch"], models["mlx"]
    facts = WRITTEN[:2]
    try:
        shutil.copytree(written_folders[2], tmp_path / "written")
        written = Engine(torch_backend, source, StateFolder.open(tmp_path / "written"))
        answers = [written.complete(f.prompt, 8) for f in facts]
        written.close()
        assert [f.object in a for f, a in zip(facts, answers, strict=True)] == [True, True]
        shutil.copytree(tmp_path / "written", tmp_path / "copied")
        opened = Engine(mlx_backend, source, StateFolder.open(tmp_path / "copied"))
        assert [m.subject for m in opened.memories] == [f.subject for f in facts]
        for layer in opened.cfg.layers:
            np.testing.assert_allclose(
                mlx_backend.weight(layer), torch_backend.weight(layer), atol=1e-6
            )
        assert [opened.complete(f.prompt, 8) for f in facts] == answers
        opened.close()
    finally:
        restore(torch_backend, torch_base)
        restore(mlx_backend, mlx_base)


@pytest.mark.slow
@twenty_facts_each_way
@pytest.mark.parametrize("writer, reader", [("torch", "mlx"), ("mlx", "torch")])
def test_a_copied_state_folder_recalls_the_same_facts_with_the_other_backend(
    writer, reader, backends, tmp_path, record_property
):
    source, models = backends
    (written_by, writer_base), (read_by, reader_base) = models[writer], models[reader]
    try:
        written = Engine(written_by, source, StateFolder.open(tmp_path / "written"))
        written.remember(FACTS, batch=True)
        completion_before, chat_before = recalled(written)
        written.close()
        restore(written_by, writer_base)
        assert len(completion_before) >= len(FACTS) // 2, "the writer itself recalls too little"

        shutil.copytree(tmp_path / "written", tmp_path / "copied")
        opened = Engine(read_by, source, StateFolder.open(tmp_path / "copied"))
        assert opened.fingerprint == written.fingerprint
        completion_after, chat_after = recalled(opened)
        figures = {
            "completion": (len(completion_before), len(completion_after & completion_before)),
            "chat": (len(chat_before), len(chat_after & chat_before)),
        }
        record_property("recall (writer, reader of those)", figures)
        print(f"\n{writer} wrote, {reader} read: recall (writer, reader of those) {figures}")
        assert len(completion_after & completion_before) >= 0.95 * len(completion_before)
        assert len(chat_after & chat_before) >= 0.95 * len(chat_before)

        # Wake and sleep on the reading side, over the memories it did not write.
        [oda] = opened.remember([ODA])
        assert "Tromsø" in opened.complete(ODA.prompt)
        report = opened.sleep()
        assert report.healthy + report.degraded == len(FACTS) + 1
        if not report.rolled_back:
            assert report.refreshed == report.degraded
        print(f"sleep on {reader}: {report}")
        opened.close()
        again = StateFolder.open(tmp_path / "copied", read_only=True)
        try:
            ledger = again.ledger(opened.fingerprint, source.preset.name)
            assert ledger.memories[-1].id == oda.id and len(ledger.memories) == len(FACTS) + 1
            last = {m.events[-1].kind for m in ledger.memories}
            assert (last == {"remembered"}) if report.rolled_back else ("remembered" not in last)
        finally:
            again.close()
    finally:
        restore(written_by, writer_base)
        restore(read_by, reader_base)
