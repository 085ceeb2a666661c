"""The contexts in which a fact is written and checked: raw prompts and chat turns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from sleeptui.backends import Backend, Rendering
from sleeptui.facts import Fact

KL_TEMPLATE = "{subject} is a"


@dataclass(frozen=True)
class FactRenderings:
    """Everything the editor tokenises for one fact.

    Attributes:
        targets: Contexts whose target tokens v* makes likely (eq. 1): the raw prompts
            first, then the chat turns.
        key_groups: Groups of contexts; the keys of each group are averaged into one column
            of K (the raw prompt under several prefixes; the chat turns).
        kl: Contexts whose next-token distribution the KL term preserves.
    """

    targets: tuple[Rendering, ...]
    key_groups: tuple[tuple[Rendering, ...], ...]
    kl: tuple[Rendering, ...]
    n_raw: int = 0  # how many of ``targets`` are raw prompts

    def shares(self, chat_share: float | None) -> tuple[float, ...]:
        """Each target's share of v*'s NLL when the chat turns together get ``chat_share``
        (empty, meaning equal shares, when it is None or there are no chat turns)."""
        n_chat = len(self.targets) - self.n_raw
        if chat_share is None or not n_chat or not self.n_raw:
            return ()
        return ((1 - chat_share) / self.n_raw,) * self.n_raw + (chat_share / n_chat,) * n_chat

    def bare(self) -> FactRenderings:
        """The bare prompt (no prefix) and the chat turns."""
        raw = self.targets[: min(1, self.n_raw)]
        return replace(self, targets=raw + self.targets[self.n_raw :], n_raw=len(raw))


def subject_positions(backend: Backend, text: str, subject: str) -> list[int]:
    """Token positions of the last token of each occurrence of ``subject`` in ``text``."""
    return [span[-1] for span in subject_spans(backend, text, subject)]


def _positions(backend: Backend, text: str, subject: str) -> dict[str, tuple[int, ...]]:
    """A rendering's subject positions (each occurrence's last token) and inner positions
    (its other tokens), from one pass over the occurrences."""
    spans = subject_spans(backend, text, subject)
    return {
        "subject_positions": tuple(span[-1] for span in spans),
        "inner_positions": tuple(p for span in spans for p in span[:-1]),
    }


def subject_spans(backend: Backend, text: str, subject: str) -> list[range]:
    """The token positions of each occurrence of ``subject`` in ``text``.

    Relies on the tokeniser splitting before spaces and punctuation, so that the tokens of
    ``text[:end]`` are a prefix of the tokens of ``text``; occurrences where that does not
    hold are skipped.
    """
    full = backend.encode(text)
    found = []
    at = text.find(subject)
    while at >= 0:
        head = backend.encode(text[: at + len(subject)])
        before = backend.encode(text[:at].rstrip(" ")) if at else []  # " Name" is one token
        if head and full[: len(head)] == head:
            first = len(before) if head[: len(before)] == before else len(head) - 1
            found.append(range(first, len(head)))
        at = text.find(subject, at + len(subject))
    return found


def completion(backend: Backend, prefix: str, fact: Fact) -> Rendering:
    """``prefix + prompt`` followed by the object's tokens as the target."""
    context = prefix + fact.prompt
    ids = backend.encode(context)
    target = backend.encode(" " + fact.object)
    return Rendering(
        ids=tuple(ids + target),
        target_positions=tuple(range(len(ids), len(ids) + len(target))),
        **_positions(backend, context, fact.subject),
    )


def chat_turn(backend: Backend, question: str, fact: Fact) -> Rendering:
    """The question in the chat template, the fact's sentence as the assistant's answer."""
    context = backend.chat_text([{"role": "user", "content": question}])
    ids = backend.encode(context)
    answer = backend.encode(fact.sentence)
    text = context + fact.sentence
    return Rendering(
        ids=tuple(ids + answer),
        target_positions=tuple(range(len(ids), len(ids) + len(answer))),
        **_positions(backend, text, fact.subject),
    )


def kl_prompt(backend: Backend, fact: Fact) -> Rendering:
    text = KL_TEMPLATE.format(subject=fact.subject)
    return Rendering(
        ids=tuple(backend.encode(text)),
        subject_positions=tuple(subject_positions(backend, text, fact.subject)),
        target_positions=(),
    )


def render(
    backend: Backend, fact: Fact, prefixes: Sequence[str], chat: bool, chat_keys: bool
) -> FactRenderings:
    """The renderings of ``fact``: completions under ``prefixes`` and, if ``chat``, its questions."""
    raw = tuple(completion(backend, p, fact) for p in prefixes)
    turns = tuple(chat_turn(backend, q, fact) for q in fact.questions) if chat else ()
    groups: tuple[tuple[Rendering, ...], ...] = (raw,)
    if chat_keys and turns:
        groups = (raw, turns)
    return FactRenderings(
        targets=raw + turns, key_groups=groups, kl=(kl_prompt(backend, fact),), n_raw=len(raw)
    )
