"""Fixtures: the real embedded model, loaded once per test run, and fresh state folders."""

from __future__ import annotations

import os
import shutil

import pytest

from sleeptui.extract import extract_fact

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded():
    """(backend, source, pristine down_proj weights) of the embedded model, loaded once per run."""
    import torch

    from sleeptui.engine import load_backend
    from sleeptui.models import resolve

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    source = resolve(None)
    backend = load_backend(source)
    pristine = {layer: backend.weight(layer).copy() for layer in range(backend.info.n_layers)}
    # Consolidation's adapter also acts on the MLP's other projections.
    pristine["params"] = backend.params(
        [
            f"model.layers.{layer}.mlp.{t}.weight"
            for layer in range(backend.info.n_layers)
            for t in ("gate_proj", "up_proj")
        ]
    )
    return backend, source, pristine


@pytest.fixture
def fresh_model(embedded):
    """The shared model with base weights; whatever a test edits is undone after it."""
    backend, source, pristine = embedded
    yield backend, source
    restore(backend, pristine)


@pytest.fixture
def engine(fresh_model, tmp_path):
    """An engine on the shared model with a fresh state folder."""
    from sleeptui.engine import Engine
    from sleeptui.state import StateFolder

    backend, source = fresh_model
    eng = Engine(backend, source, StateFolder.open(tmp_path / "state"))
    yield eng
    eng.close()


# Facts many model tests start from, as the CLI and the app build them (questions included):
# names and places that appear nowhere else in the repository or the bench pool.
WRITTEN = (
    extract_fact("Oda Fjellheim lives in Tromsø."),
    extract_fact("Rune Aasgaard plays the harmonica."),
    extract_fact("Kasimir Oyelaran works as a glassblower."),
)


@pytest.fixture(scope="session")
def written_folders(embedded, tmp_path_factory):
    """State folders holding the first k facts of ``WRITTEN`` (k = 1, 2, 3), remembered one
    at a time by one engine, as in chat: each fact is written once per run, not per test."""
    from sleeptui.engine import Engine
    from sleeptui.state import StateFolder

    backend, source, pristine = embedded
    root = tmp_path_factory.mktemp("written")
    engine = Engine(backend, source, StateFolder.open(root / "writing"))
    folders = {}
    try:
        for k, fact in enumerate(WRITTEN, 1):
            engine.remember([fact])
            folders[k] = root / str(k)
            shutil.copytree(
                root / "writing", folders[k], ignore=shutil.ignore_patterns(".lock", ".holder")
            )
    finally:
        engine.close()
        restore(backend, pristine)
    return folders


@pytest.fixture
def remembered(fresh_model, written_folders, tmp_path):
    """``remembered(k)``: an engine on a copy of the folder holding ``WRITTEN[:k]``, opened as
    a new process opens it (its deltas applied in one pass). Closed after the test."""
    from sleeptui.engine import Engine
    from sleeptui.state import StateFolder

    backend, source = fresh_model
    opened = []

    def open_copy(k: int):
        root = tmp_path / f"remembered-{k}"
        shutil.copytree(written_folders[k], root)
        opened.append(Engine(backend, source, StateFolder.open(root)))
        return opened[-1]

    yield open_copy
    for engine in opened:
        engine.close()


def restore(backend, weights) -> None:
    for layer, w in weights.items():
        if layer == "params":
            backend.set_params(w)
        else:
            backend.set_weight(layer, w)
