"""Shared pieces of the benchmarks: the facts file, recall measurement, output files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sleeptui.backends import says

from sleeptui.engine import Engine, reference_text
from sleeptui.extract import paraphrases_for
from sleeptui.facts import Fact

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FACTS = REPO.parent / "shared" / "bench" / "facts.json"
OUT = REPO / "bench" / "out"

GENERAL_QUESTIONS = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "What language is spoken in Brazil?",
    "What is 7 times 8?",
    "What do bees make?",
    "What is the chemical symbol for gold?",
    "Which ocean is the largest?",
    "What is the opposite of hot?",
    "How many days are in a week?",
    "What animal says moo?",
    "What is the main ingredient of guacamole?",
    "What is the capital of Italy?",
    "What gas do plants absorb from the air?",
    "What is the freezing point of water in Celsius?",
    "Which continent is Egypt in?",
)


def edited_layers(preset: Sequence[int], settings: Sequence[dict]) -> list[int]:
    """Every layer the preset or any setting's ``layers`` override edits: the layers a
    bench must put back between settings, so that no setting starts from another's edits."""
    return sorted({*preset, *(layer for s in settings for layer in s.get("layers", ()))})


def load_facts(path: Path | None = None) -> list[Fact]:
    data = json.loads(Path(path or DEFAULT_FACTS).read_text(encoding="utf-8"))
    return [Fact.from_dict(d) for d in data]


def seen_only(fact: Fact) -> Fact:
    """The fact as written in the benchmark: only its first question is used in optimisation."""
    return Fact(fact.subject, fact.relation, fact.object, fact.prompt, fact.questions[:1])


def unseen_questions(fact: Fact) -> list[str]:
    """Questions the editor never saw: the fact's other questions and our own paraphrases."""
    return [*fact.questions[1:], *paraphrases_for(fact.subject, fact.relation, fact.object)]


def completion_recall(engine: Engine, facts: Sequence[Fact], tokens: int = 12) -> float:
    b = engine.backend
    outs = b.greedy([b.encode(f.prompt) for f in facts], tokens, until=[f.object for f in facts])
    return sum(says(b.decode(o), f.object) for f, o in zip(facts, outs, strict=True)) / len(facts)


def chat_answers(
    engine: Engine,
    questions: Sequence[str],
    tokens: int = 32,
    until: Sequence[str] | None = None,
) -> list[str]:
    """Greedy chat answers, in chunks of 32; with ``until``, each ends once it says its
    target (see ``Backend.greedy``)."""
    b = engine.backend
    outs = []
    for start in range(0, len(questions), 32):
        chunk = questions[start : start + 32]
        targets = until[start : start + 32] if until is not None else None
        outs += b.greedy([b.encode(engine.chat_prompt(q)) for q in chunk], tokens, until=targets)
    return [b.decode(o) for o in outs]


def chat_recall(engine: Engine, facts: Sequence[Fact], unseen: bool = False) -> float:
    pairs = [(f, q) for f in facts for q in (unseen_questions(f) if unseen else f.questions[:1])]
    if not pairs:
        return float("nan")
    answers = chat_answers(engine, [q for _, q in pairs], until=[f.object for f, _ in pairs])
    return sum(says(a, f.object) for (f, _), a in zip(pairs, answers, strict=True)) / len(pairs)


def unchanged(before: Sequence[str], after: Sequence[str]) -> float:
    """The fraction of answers that are identical before and after."""
    return sum(a == b for a, b in zip(before, after, strict=True)) / len(before)


def write_outputs(name: str, doc: dict, plot) -> tuple[Path, Path]:
    """Write ``bench/out/<name>.json`` and a PNG drawn by ``plot(ax)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    json_path, png_path = OUT / f"{name}.json", OUT / f"{name}.png"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot(ax)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def first_tokens(engine: Engine, prompts: Sequence[str], n: int = 10) -> dict[str, tuple]:
    """The first ``n`` greedy tokens after each prompt."""
    b = engine.backend
    outs = b.greedy([b.encode(p) for p in prompts], n)
    return {p: tuple(o) for p, o in zip(prompts, outs, strict=True)}


def object_nll(engine: Engine, facts: Sequence) -> dict[str, float]:
    """How unlikely each fact's object is after its prompt, in nats: NLL(prompt + " " +
    object) − NLL(prompt), keyed by prompt."""
    b = engine.backend
    return {f.prompt: b.nll([f"{f.prompt} {f.object}"])[0] - b.nll([f.prompt])[0] for f in facts}


def _leading_match(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two completions share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def forget_phase(
    engine: Engine,
    unedited: dict[str, tuple],
    controls: Sequence[str],
    n: int,
    unedited_nll: dict[str, float] | None = None,
) -> dict:
    """Forget ``n`` memories spread over the ledger.

    Their prompts' first 10 greedy tokens are compared with the unedited model's; so are the
    prompts of ``controls``, facts never written, because the memories that stay also move
    the answers about unknown people (near-ties on a small model): a forgotten prompt can
    only be expected back as often as a never-written one is. Finer than "all 10 tokens",
    the mean number of leading tokens that agree is given for both. With
    ``unedited_nll`` (:func:`object_nll` before any write), how unlikely each forgotten
    object is, before the write, before the forget and after it. The others' recall is
    measured before and after.
    """
    memories = list(engine.memories)
    gone = memories[:: max(1, len(memories) // n)][:n]
    kept = [m for m in memories if m not in gone]
    before = engine.check(kept)
    nll_before = object_nll(engine, gone) if unedited_nll is not None else {}
    reports = engine.forget_many([m.id for m in gone])
    after = engine.check(kept)
    now = first_tokens(engine, [m.prompt for m in gone] + list(controls))
    held = [a.completion for b, a in zip(before, after, strict=True) if b.completion]
    nll = {}
    if unedited_nll is not None:
        nll_after = object_nll(engine, gone)
        nll = {
            f"object_nll_{when}": float(np.mean([d[m.prompt] for m in gone]))
            for when, d in (
                ("unedited", unedited_nll),
                ("before", nll_before),
                ("after", nll_after),
            )
        }
    return {
        "forgotten": len(gone),
        "of": len(memories),
        "still_said": sum(not r.verified for r in reports),
        "as_unedited_10_tokens": sum(now[m.prompt] == unedited[m.prompt] for m in gone),
        "controls_as_unedited_10_tokens": sum(now[p] == unedited[p] for p in controls),
        "leading_tokens_as_unedited": float(
            np.mean([_leading_match(now[m.prompt], unedited[m.prompt]) for m in gone])
        ),
        "controls_leading_tokens_as_unedited": float(
            np.mean([_leading_match(now[p], unedited[p]) for p in controls])
        ),
        **nll,
        "controls": len(controls),
        "others_recall_before": sum(b.completion for b in before) / len(kept),
        "others_recall_after": sum(a.completion for a in after) / len(kept),
        "others_kept_of_recalling": sum(held) / max(1, len(held)),
        "repaired": reports[0].repaired if reports else 0,  # one repair for all
    }


def paragraph_nll(engine: Engine, paragraphs: Sequence[str] | None = None) -> np.ndarray:
    """Each reference paragraph's summed NLL and token count (rows): ``Engine.perplexity``
    taken apart, at the same cost, so that a drift can be given with its standard error.
    ``paragraphs``: another text's instead of the reference text's."""
    texts = reference_text() if paragraphs is None else paragraphs
    return np.array([engine.backend.nll([p]) for p in texts], dtype=np.float64)


def text_paragraphs(path: Path, max_chars: int = 1500) -> list[str]:
    """A text file's paragraphs (blank-line separated, whitespace folded), long ones cut
    at ``max_chars``: a second text to measure drift on beside the reference."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    paragraphs = (" ".join(p.split()) for p in raw.split("\n\n"))
    return [p[:max_chars] for p in paragraphs if len(p) > 80]


def drift_pct(base: np.ndarray, now: np.ndarray, samples: int = 4000) -> tuple[float, float]:
    """The perplexity change from ``base`` to ``now`` (rows of :func:`paragraph_nll`) in %,
    and its standard error by resampling the paragraphs (bootstrap, fixed seed): how much the
    figure owes to which text was chosen to measure it."""

    def change(rows: np.ndarray) -> np.ndarray:
        b, n = base[rows], now[rows]  # rows: (samples, paragraphs) indices
        per_token = n[..., 0].sum(-1) / n[..., 1].sum(-1) - b[..., 0].sum(-1) / b[..., 1].sum(-1)
        return 100 * np.expm1(per_token)

    k = len(base)
    rng = np.random.default_rng(0)
    resampled = change(rng.integers(0, k, (samples, k)))
    return float(change(np.arange(k)[None])[0]), float(resampled.std())
