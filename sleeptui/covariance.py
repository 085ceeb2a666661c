"""The covariance Ĉ of down_proj inputs (eq. 2), from text the model itself samples.

No data set can be downloaded at run time, so the reference corpus is sampled from the
model with a fixed seed: plain text continuing short openers of many registers, and chat
turns (the model's chat template, a user request, the model's answer), since chat is where
the edited model is used. Keys that are common in chat contexts then count as common, and
an edit leaves them alone. The result is cached per model fingerprint and layer set, so no
start recomputes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from sleeptui import memit
from sleeptui.backends import Backend

OPENERS = (
    "The",
    "In",
    "Once upon a time",
    "Dear",
    "Yesterday",
    "According to",
    "How to",
    "The history of",
    "A recipe for",
    "Scientists have",
    "My favourite",
    "In 1998,",
    "The city of",
    "When I was",
    "Chapter 1",
    "The company",
    "Question:",
    "Here is a list",
    "The weather",
    "She said",
    "It is important to",
    "The best way to",
    "Many people",
    "The following",
    "In mathematics,",
    "The president",
    "Our team",
    "Welcome to",
    "The game",
    "I think",
    "Water is",
    "The main reason",
)
# User turns of the chat samples: requests of many kinds, none about a particular person.
REQUESTS = (
    "Tell me something interesting about the ocean.",
    "How do I make a good cup of coffee?",
    "Write a short poem about autumn.",
    "What should I pack for a weekend trip?",
    "Explain how a bicycle works.",
    "Can you help me plan a birthday party?",
    "What is the difference between weather and climate?",
    "Give me three tips for learning a new language.",
    "Summarise the plot of a famous fairy tale.",
    "Why do cats purr?",
    "How can I sleep better at night?",
    "Describe a busy market in the morning.",
    "What are some healthy breakfast ideas?",
    "Write an email asking a colleague for a meeting.",
    "How does a computer store information?",
    "What is your favourite season and why?",
    "Hello! How are you today?",
    "Tell me a joke.",
    "Who was a famous scientist, and what did they discover?",
    "What jobs do people do in a hospital?",
    "Recommend a hobby I can start this week.",
    "How do plants grow?",
    "What is a good name for a pet dog?",
    "Which musical instrument is easiest to learn?",
    "Where would you like to travel, and why?",
    "Explain what a neighbourhood is to a child.",
    "How do I fix a flat tyre?",
    "What happens at a wedding?",
    "Write two sentences about a rainy city.",
    "What do teachers do every day?",
    "How far is the moon?",
    "Thanks for your help!",
)
SEED = 1234
# Bump when the recipe changes, so that caches of the old recipe are not reused.
RECIPE = 2
CHUNK_ROWS = 8

Progress = Callable[[int, int], None]


def covariance_path(cache: Path, fingerprint: str, layers: Sequence[int], n_tokens: int) -> Path:
    name = f"{fingerprint[:16]}-L{'_'.join(map(str, layers))}-T{n_tokens}-r{RECIPE}.safetensors"
    return cache / "covariance" / name


def load_or_compute(
    backend: Backend,
    layers: Sequence[int],
    n_tokens: int,
    cache: Path,
    fingerprint: str,
    progress: Progress | None = None,
) -> dict[int, memit.Array]:
    """Ĉ per layer, read from the cache or sampled, measured and cached (arrays as the
    backend's ``to_device`` gives them when freshly computed, NumPy when read)."""
    path = covariance_path(cache, fingerprint, layers, n_tokens)
    if path.exists():
        stored = load_file(str(path))
        return {layer: stored[f"layer.{layer}"].astype(np.float64) for layer in layers}
    cov = compute(backend, layers, n_tokens, progress)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    stored = {f"layer.{k}": memit.to_numpy(v).astype(np.float32) for k, v in cov.items()}
    save_file(stored, str(tmp))
    tmp.replace(path)
    return cov


def compute(
    backend: Backend, layers: Sequence[int], n_tokens: int, progress: Progress | None = None
) -> dict[int, memit.Array]:
    """Ĉ = (1/M) Σ k kᵀ over about ``n_tokens`` sampled token positions (eq. 2)."""
    chats = tuple(backend.chat_text([{"role": "user", "content": r}]) for r in REQUESTS)
    seeds = OPENERS + chats
    per_row = max(16, n_tokens // len(seeds))
    if progress:
        progress(0, 2 * len(seeds))
    rows = backend.sample(seeds, per_row, seed=SEED)  # one batch: fewest sequential steps
    sums: dict[int, memit.Array] = {}
    count = 0
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        positions = [list(range(len(r))) for r in chunk]
        keys, _ = backend.probe(chunk, positions, layers, None)
        for layer in layers:
            k = backend.to_device(keys[layer], layer)  # float64, where the algebra runs
            sums[layer] = k.T @ k if layer not in sums else sums[layer] + k.T @ k
        count += sum(len(r) for r in chunk)
        if progress:
            progress(len(seeds) + start + len(chunk), 2 * len(seeds))
    return {layer: s / count for layer, s in sums.items()}
