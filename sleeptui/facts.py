"""A fact as the engine stores it: a (subject, relation, object) triple with its renderings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple.

    Attributes:
        subject: Who or what the fact is about, as it appears in the prompt ("Viktor Johansson").
        relation: The verb phrase that joins subject and object ("lives in").
        object: What the model should say next ("Brno"); may be several tokens.
        prompt: The completion prompt, ``subject + " " + relation`` unless given.
        questions: Chat questions a user would ask about the fact.
    """

    subject: str
    relation: str
    object: str
    prompt: str = ""
    questions: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.prompt:
            object.__setattr__(self, "prompt", f"{self.subject} {self.relation}")
        object.__setattr__(self, "questions", tuple(self.questions))

    @property
    def sentence(self) -> str:
        """The fact as a plain statement, also used as the chat answer it should produce."""
        return f"{self.prompt} {self.object}."

    def about_same_subject(self, other: Fact) -> bool:
        """Whether both facts are about one subject (case and spacing aside): MEMIT keys
        them at the same token, so one shift of its representation has to hold both."""
        return _subject_key(self.subject) == _subject_key(other.subject)

    @classmethod
    def from_dict(cls, d: dict) -> Fact:
        """Build from the bench file's format (subject, relation, object, prompt, questions)."""
        return cls(
            subject=d["subject"],
            relation=d["relation"],
            object=d["object"],
            prompt=d.get("prompt", ""),
            questions=tuple(d.get("questions", ())),
        )


def _subject_key(subject: str) -> str:
    return " ".join(subject.casefold().split())
