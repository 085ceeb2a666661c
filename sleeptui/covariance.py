"""Statistics of text the model itself samples: the covariance Ĉ of down_proj inputs (eq. 2)
and the residual stream's sensitivity M.

No data set can be downloaded at run time, so the reference corpus is sampled from the
model with a fixed seed: plain text continuing short openers of many registers, and chat
turns (the model's chat template, a user request, the model's answer), since chat is where
the edited model is used. Keys that are common in chat contexts then count as common, and
an edit leaves them alone. The results are cached per model fingerprint and layer set, so
no start recomputes them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from sleeptui import memit
from sleeptui.backends import Backend
from sleeptui.paths import write_cache_file
from sleeptui.renderings import subject_positions

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
# Other people, for the names prior (``names_covariance``): given names and surnames of many
# languages, paired at random with a fixed seed. None of them occurs in the bench pool
# (../shared/bench/facts.json), so the benchmarks' unwritten people stand for names a user
# brings, not for names this prior was built from.
_GIVEN = """
Chen Hana Igor Jana Oskar Quentin Rosa Uma Vera Wen Xavier Zoltan Aiko Bilal Carmen Greta Hugo
Kamala Luca Mira Nils Olga Pablo Rania Samir Tove Ulrich Valentina Wanjiru Yusuf Zeynep Abebe
Adaeze Anneliese Arjun Bogdan Caoimhe Darius Eitan Esperanza Fatou Gunnar Isolde Jurgen Kalani
Lorenzo Magnus Marisa Ngozi Orla Pilar Radu Seo-yeon Siddharth Teodor Thandiwe Vikram Wilhelmina
Ximena Yerlan Cosimo Dagny Eero Folasade
"""
_SURNAMES = """
Castell Dufour Fonseca Gallagher Jensen Kowalczyk Quiroga Schneider Urquhart Weber Xu Zamora
Andersson Brennan Delgado Engel Greco Ishikawa Jovanovic Kaplan Mendes Ortega Rahman Umarov
Vasquez Wolff Yamada Zielinski Achterberg Balogun Carvalho Dragomir Esposito Fitzgerald Grünewald
Hakimi Iglesias Jablonski Kristiansen Lombardi Marchetti Nieminen Oyelaran Pellegrini Rautenberg
Szabo Uchenna Valdivia Whitfield Yoshida Zubiri Albrecht Bergstrom Castellano Dimitriou Eklund
"""
GIVEN_NAMES = tuple(_GIVEN.split())
SURNAMES = tuple(_SURNAMES.split())
NAME_PREFIXES = ("", "Note that ", "I heard that ", "By the way, ")
NAME_QUESTIONS = (
    "Where does {}",
    "What does {}",
    "Who is {}",
    "Tell me about {}",
    "Which instrument does {}",
)
NAMES_COUNT = 400
NAMES_SEED = 7
SEED = 1234
# The sensitivity's own sample (another seed: not the text Ĉ was measured on).
SENSITIVITY_SEED = 4321
SENSITIVITY_TOKENS = 4096
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
        return _load_layers(path, layers)
    cov = compute(backend, layers, n_tokens, progress)
    _store(path, {f"layer.{k}": memit.to_numpy(v) for k, v in cov.items()})
    return cov


def prior_path(cache: Path, fingerprint: str, layers: Sequence[int], kind: str) -> Path:
    name = f"{fingerprint[:16]}-L{'_'.join(map(str, layers))}-r{RECIPE}"
    return cache / "priors" / kind / f"{name}.safetensors"


def load_or_compute_prior(
    kind: str, backend: Backend, layers: Sequence[int], cache: Path, fingerprint: str
) -> dict[int, np.ndarray]:
    """The prior ``kind`` of ``PRIORS`` per layer, read from the cache or probed and cached."""
    path = prior_path(cache, fingerprint, layers, kind)
    if path.exists():
        return _load_layers(path, layers)
    moments = PRIORS[kind](backend, layers)
    _store(path, {f"layer.{k}": v for k, v in moments.items()})
    # As stored, so that the first start edits exactly as every later one.
    return {k: v.astype(np.float32).astype(np.float64) for k, v in moments.items()}


def other_names(count: int = NAMES_COUNT, seed: int = NAMES_SEED) -> list[str]:
    """``count`` distinct full names drawn from ``GIVEN_NAMES`` × ``SURNAMES`` with a fixed
    seed, in the order drawn."""
    rng = random.Random(seed)
    names: dict[str, None] = {}
    while len(names) < count:
        names[f"{rng.choice(GIVEN_NAMES)} {rng.choice(SURNAMES)}"] = None
    return list(names)


def names_covariance(backend: Backend, layers: Sequence[int]) -> dict[int, np.ndarray]:
    """E[k kᵀ] over keys at the last token of other people's names, each read once after a
    plain prefix and once in a chat question (the contexts a fact's own keys come from).

    A fact is keyed where the model has read its subject's name; what that key shares with
    every other name is where an edit would also change answers about people it was never
    told about. Added to Ĉ (``EditConfig.cov_names``), it makes eq. 3 pay for that reach.
    """
    rows, positions = [], []
    for i, name in enumerate(other_names()):
        question = NAME_QUESTIONS[i % len(NAME_QUESTIONS)].format(name) + "?"
        for text in (
            NAME_PREFIXES[i % len(NAME_PREFIXES)] + name,
            backend.chat_text([{"role": "user", "content": question}]),
        ):
            at = subject_positions(backend, text, name)
            if at:
                rows.append(backend.encode(text))
                positions.append(at)
    return _second_moments(backend, rows, positions, layers)


def chat_covariance(backend: Backend, layers: Sequence[int]) -> dict[int, np.ndarray]:
    """E[k kᵀ] over every token of the chat prompts Ĉ's chat samples start from (``REQUESTS``
    in the chat template: system prompt, role headers, the request, the assistant's header).

    Every chat goes through those contexts before the model answers, while in Ĉ they are a
    small share beside the sampled text. An edit that reaches into them changes the answer
    to every question, however unrelated; added to Ĉ (``EditConfig.cov_chat``), eq. 3 pays
    for that reach.
    """
    rows = [backend.encode(backend.chat_text([{"role": "user", "content": r}])) for r in REQUESTS]
    return _second_moments(backend, rows, [list(range(len(r))) for r in rows], layers)


def text_covariance(backend: Backend, layers: Sequence[int]) -> dict[int, np.ndarray]:
    """E[k kᵀ] over every token of prose written for sleeptui (``data/prior_text.txt``:
    stories, news, letters, recipes, notices; never the perplexity reference text).

    Ĉ comes from the model's own samples, and real text has more variance in Ĉ's weak
    directions than Ĉ says (README "Shrinking Ĉ"): an edit solved against Ĉ alone reaches
    further into written text than the solve believes. Added to Ĉ (``EditConfig.cov_text``),
    eq. 3 pays for that reach.
    """
    rows = [backend.encode(p) for p in prior_text()]
    return _second_moments(backend, rows, [list(range(len(r))) for r in rows], layers)


def prior_text() -> list[str]:
    """The paragraphs of ``data/prior_text.txt``."""
    from importlib.resources import files

    text = files("sleeptui").joinpath("data/prior_text.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _second_moments(
    backend: Backend,
    rows: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int],
) -> dict[int, np.ndarray]:
    """E[k kᵀ] per layer over the keys at ``positions`` of ``rows``."""
    sums: dict[int, np.ndarray] = {}
    count = 0
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = slice(start, start + CHUNK_ROWS)
        keys, _ = backend.probe(rows[chunk], positions[chunk], layers, None)
        for layer in layers:
            k = np.asarray(keys[layer], dtype=np.float64)
            sums[layer] = sums.get(layer, 0) + k.T @ k
        count += sum(len(p) for p in positions[chunk])
    return {layer: s / count for layer, s in sums.items()}


# The priors ``EditConfig.cov_priors`` can add to eq. 3's regulariser, by name.
PRIORS: dict[str, Callable[[Backend, Sequence[int]], dict[int, np.ndarray]]] = {
    "names": names_covariance,
    "chat": chat_covariance,
    "text": text_covariance,
}


def sensitivity_path(cache: Path, fingerprint: str, layers: Sequence[int]) -> Path:
    name = f"{fingerprint[:16]}-L{'_'.join(map(str, layers))}-T{SENSITIVITY_TOKENS}-r{RECIPE}"
    return cache / "sensitivity" / f"{name}.safetensors"


def load_or_compute_sensitivity(
    backend: Backend,
    layers: Sequence[int],
    cache: Path,
    fingerprint: str,
    progress: Progress | None = None,
) -> np.ndarray:
    """M (d_model × d_model, float32), read from the cache or sampled, measured and cached."""
    path = sensitivity_path(cache, fingerprint, layers)
    if path.exists():
        return load_file(str(path))["sensitivity"]
    m = sensitivity(backend, layers, SENSITIVITY_TOKENS, progress)
    _store(path, {"sensitivity": m})
    return m


def sensitivity(
    backend: Backend, layers: Sequence[int], n_tokens: int, progress: Progress | None = None
) -> np.ndarray:
    """M = the mean over ``layers`` of F_l / (tr F_l / d), with F_l = E[g gᵀ] and g the
    gradient of a sampled row's NLL with respect to the output of layer l at one of its
    tokens: the Fisher information of the residual stream on the model's own text.

    A shift δ added to the residual stream at many tokens of such text costs about
    ½ δᵀ F δ nats per token, so δᵀ M δ / ‖δ‖² says how sensitive the model's predictions
    are along δ, relative to a direction picked at random (mean eigenvalue 1). An edit
    adds its δ, scaled by vᵀx, at every token x its key direction v picks up
    (``EditConfig.fisher_decay``).
    """
    seeds = _seeds(backend)
    if progress:
        progress(0, 2)
    rows = backend.sample(seeds, max(16, n_tokens // len(seeds)), seed=SENSITIVITY_SEED)
    if progress:
        progress(1, 2)
    fisher = backend.residual_fisher(rows, layers)
    d = next(iter(fisher.values())).shape[0]
    m = sum(f / (np.trace(f) / d) for f in fisher.values()) / len(fisher)
    if progress:
        progress(2, 2)
    return ((m + m.T) / 2).astype(np.float32)


def _seeds(backend: Backend) -> tuple[str, ...]:
    chats = tuple(backend.chat_text([{"role": "user", "content": r}]) for r in REQUESTS)
    return OPENERS + chats


def _load_layers(path: Path, layers: Sequence[int]) -> dict[int, np.ndarray]:
    """Per-layer matrices that ``_store`` wrote as ``layer.<l>``, as float64."""
    stored = load_file(str(path))
    return {layer: stored[f"layer.{layer}"].astype(np.float64) for layer in layers}


def _store(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` (as float32) to ``path`` at once: a killed start leaves no half file."""
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    write_cache_file(path, lambda tmp: save_file(arrays, tmp))


def compute(
    backend: Backend, layers: Sequence[int], n_tokens: int, progress: Progress | None = None
) -> dict[int, memit.Array]:
    """Ĉ = (1/M) Σ k kᵀ over about ``n_tokens`` sampled token positions (eq. 2)."""
    seeds = _seeds(backend)
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
