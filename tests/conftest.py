"""Fixtures: the real embedded model, loaded once per test run, and fresh state folders."""

from __future__ import annotations

import os

import pytest

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


def restore(backend, weights) -> None:
    for layer, w in weights.items():
        if layer == "params":
            backend.set_params(w)
        else:
            backend.set_weight(layer, w)
