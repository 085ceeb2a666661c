"""Turn a chat message into (subject, relation, object) facts, or say why it holds none.

The extractor is a small rule-based parser (stdlib only, no model). It accepts
plain declarative statements of the form ``<Name> <verb phrase> <object>``:

* The subject is a capitalised name of one to four words (particles such as
  "van", "de", "al-" and titles such as "Dr." allowed).
* The relation is the verb phrase: the verb, an auxiliary chain ("has been"),
  one participle/adjective before a preposition ("was born in", "is allergic
  to"), a phrasal particle ("grew up in"), then any run of prepositions and
  articles ("works as an", "plays the"), and a short noun ending in
  "named"/"called" ("has a dog named").
* The object is the rest of the clause, without trailing punctuation.

Design decisions:

* First person ("I live in Berlin", "I'm a nurse") is stored about
  :data:`USER_SUBJECT` with the verb in third person ("The user lives in").
  "My name is Anna" becomes ("The user", "is named", "Anna").
* "My sister Anna lives in Oslo" is stored about "Anna"; the kinship words are
  context, not part of the fact. Other "My ..." statements are refused.
* "He/She/They" resolve to the last named subject seen earlier in the message,
  else to ``last_subject``; "They" verbs are put in the singular.
* "X and he ...", "X and Anna lives ..." are split into clauses; a trailing
  "and Bergen" stays in the object.
* "<Name>'s <thing> is <what>" ("Ines Berg's favourite colour is teal") is
  stored about the name, with the thing in the relation ("'s favourite colour
  is") and the questions asked about it ("What is Ines Berg's favourite
  colour?"); "The favourite colour of Ines Berg is teal" is read as that form.
  Other possessives ("Viktor's sister lives in Oslo", whose subject is the
  sister) are refused.
* Refused: questions, hypotheticals and modals, negations, commands,
  statements about the assistant, sentences without subject, verb or object,
  and over-long input.

Every regex is anchored or a single character class, so matching is linear;
input is capped (:data:`MAX_MESSAGE_CHARS`, :data:`MAX_SENTENCE_CHARS`).
"""

from __future__ import annotations

import re
import unicodedata

from sleeptui.errors import NotAFact
from sleeptui.facts import Fact

__all__ = [
    "MAX_MESSAGE_CHARS",
    "MAX_OBJECT_WORDS",
    "MAX_SENTENCE_CHARS",
    "USER_SUBJECT",
    "extract_fact",
    "extract_facts",
    "paraphrases_for",
    "questions_for",
]

USER_SUBJECT = "The user"
MAX_MESSAGE_CHARS = 20_000
MAX_SENTENCE_CHARS = 2_000
MAX_OBJECT_WORDS = 12

# Reasons, written for the user; NotAFact messages are built from them.
QUESTION = "that is a question, not a statement"
HYPOTHETICAL = "hypotheticals are not stored (if, might, would, suppose...); state a plain fact"
NEGATION = "negations are not stored (not, never, no longer...); say what is true instead"
NO_SUBJECT = "no subject found; start with a name, as in 'Viktor lives in Oslo'"
ASSISTANT = "statements about the assistant are not stored"
COMMAND = "that is a command, not a statement"
LOWERCASE_NAME = "no subject found; write the name with capitals, as in 'Viktor lives in Oslo'"
NO_VERB = "no verb phrase found after the subject"
NO_OBJECT = "no object found; say what, as in 'Viktor lives in Oslo'"
POSSESSIVE = (
    "a possessive is stored only as '<Name>'s <thing> is <what>', as in "
    "'Viktor's favourite colour is teal'; or use a verb, as in 'Viktor has a dog named Rex'"
)
TOO_LONG = f"that sentence is too long (over {MAX_SENTENCE_CHARS} characters)"
OBJECT_TOO_LONG = f"the object is too long (over {MAX_OBJECT_WORDS} words); split it up"
EMPTY = "the message is empty"

_NEWLINES = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_CONTROL = re.compile(
    r"[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
)
_BOUNDARY = re.compile(r"(?<=[.!?;\u2026])\s+|\n+")
_PREFIX = re.compile(
    r"(?:(?:please\s+)?(?:remember|note|keep in mind|don't forget|do not forget)"
    r"(?:\s+that\b|\s*[:,\-\u2013\u2014])"
    r"|fyi\b|btw\b|by the way\b|just so you know\b|for the record\b|and\b|also\b|plus\b)"
    r"[\s,:\-\u2013\u2014]*",
    re.IGNORECASE,
)
_CONTRACTION = re.compile(r"(i|he|she|they|you|we|it)'(m|s|re|ve|d|ll)", re.IGNORECASE)
_EXPANSIONS = {"m": "am", "s": "is", "re": "are", "ve": "have", "d": "would", "ll": "will"}

_END_CHARS = " \t.!?\u2026;:,\"')]}\u00bb\u201d"
_LEAD_CHARS = " \t-*\u2022\u00b7>\"'([{\u00ab\u201c"
_TITLES = {"Mr.", "Mrs.", "Ms.", "Dr.", "Prof.", "St."}
_PARTICLES = {
    "van",
    "von",
    "de",
    "der",
    "den",
    "del",
    "della",
    "di",
    "da",
    "du",
    "dos",
    "das",
    "la",
    "le",
    "ten",
    "ter",
    "bin",
    "ibn",
    "al",
    "el",
    "y",
    "d",
    "l",
}
_CONNECTORS = {
    "in",
    "on",
    "at",
    "as",
    "a",
    "an",
    "the",
    "to",
    "for",
    "from",
    "with",
    "of",
    "by",
    "named",
    "called",
    "into",
    "near",
    "about",
}
_ARTICLES = {"a", "an", "the"}
# Verbs (base form) and participles that put their object in a place: "Where ...?"
# Verbs that take an infinitive: "likes to play chess" asks "What does X like to do?"
_INFINITIVE_VERBS = {
    "like",
    "love",
    "hate",
    "want",
    "hope",
    "plan",
    "need",
    "prefer",
    "learn",
    "try",
    "use",
    "decide",
    "intend",
    "aim",
    "wish",
    "tend",
    "refuse",
    "promise",
    "mean",
    "dream",
}
_AGE = re.compile(r"\d{1,3}(?:\s+years?(?:\s+old)?)?", re.IGNORECASE)
_DWELLING_VERBS = {"live", "stay", "reside", "dwell", "settle", "be", "grow"}
_MOVING_VERBS = {
    "move",
    "relocate",
    "emigrate",
    "immigrate",
    "go",
    "travel",
    "commute",
    "fly",
    "return",
    "retire",
    "sail",
    "drive",
    "walk",
    "ride",
    "run",
    "swim",
    "cycle",
    "arrive",
}
_PLACE_PARTICIPLES = {
    "born",
    "based",
    "located",
    "raised",
    "stationed",
    "buried",
    "settled",
    "situated",
    "headquartered",
    "posted",
    "housed",
    "imprisoned",
    "hospitalised",
    "hospitalized",
    "living",
    "staying",
    "moving",
    "working",
    "studying",
    "travelling",
    "traveling",
}
_MONTHS = "january|february|march|april|may|june|july|august|september|october|november|december"
_DATE = re.compile(
    r"(?:(?:in|on|the)\s+)?(?:early\s+|late\s+|mid-?)?"
    r"(?:\d{3,4}s?|'\d0s"  # 1987, 1990s, '90s
    r"|(?:\d{1,2}(?:st|nd|rd|th)?\s+(?:of\s+)?)?(?:" + _MONTHS + r")(?:\s+\d{1,2}(?:st|nd|rd|th)?)?"
    r"(?:,?\s+\d{3,4})?)",
    re.IGNORECASE,
)
_COPULAS = {"is", "was", "are", "were"}
_AUX = {"is", "was", "are", "were", "am", "be", "been", "being", "has", "have", "had", "got"}
_PHRASAL = {"up", "out", "back", "away", "down", "off", "over"}
_DROPPED_ADVERBS = {"also", "actually", "currently", "now", "really", "just", "still", "recently"}
_NEGATIONS = {
    "not",
    "never",
    "no",
    "nor",
    "neither",
    "none",
    "nothing",
    "nowhere",
    "nobody",
    "cannot",
}
_MODALS = {
    "might",
    "may",
    "could",
    "would",
    "should",
    "must",
    "will",
    "shall",
    "maybe",
    "perhaps",
    "probably",
    "possibly",
    "supposedly",
    "hypothetically",
}
_HYPOTHETICAL_WORDS = {
    "if",
    "unless",
    "whether",
    "suppose",
    "supposing",
    "imagine",
    "assume",
    "assuming",
    "pretend",
    "hypothetically",
    "let's",
    "lets",
}
_HEDGES = {
    "think",
    "believe",
    "guess",
    "suppose",
    "assume",
    "reckon",
    "imagine",
    "hope",
    "wish",
    "doubt",
    "bet",
    "expect",
    "wonder",
    "feel",
}
_WH = {"what", "where", "who", "whom", "whose", "which", "when", "why", "how"}
_AUX_QUESTION = {
    "do",
    "does",
    "did",
    "is",
    "are",
    "was",
    "were",
    "am",
    "can",
    "could",
    "will",
    "would",
    "should",
    "shall",
    "may",
    "might",
    "must",
    "has",
    "have",
    "had",
}
_AMBIGUOUS_AUX = {"may", "will", "can"}  # also given names: "May Chen", "Will Smith", "Can Yilmaz"
_IMPERATIVES = {
    "tell",
    "give",
    "show",
    "list",
    "say",
    "explain",
    "describe",
    "write",
    "find",
    "search",
    "help",
    "please",
    "let",
    "stop",
    "call",
    "make",
    "forget",
    "remind",
    "check",
    "look",
    "ask",
    "add",
    "delete",
    "remove",
    "store",
    "save",
    "learn",
    "update",
    "set",
    "change",
    "answer",
    "translate",
    "summarize",
    "summarise",
    "go",
    "try",
    "keep",
    "put",
    "remember",
    "note",
    "read",
    "repeat",
    "use",
}
_ASSISTANT = {"you", "your", "yours", "yourself", "u", "ur"}
_PRONOUNS = {"he", "she", "they"}
_NON_SUBJECTS = {
    "we",
    "it",
    "this",
    "that",
    "these",
    "those",
    "there",
    "here",
    "the",
    "a",
    "an",
    "his",
    "her",
    "their",
    "our",
    "its",
    "him",
    "them",
    "me",
    "us",
    "someone",
    "somebody",
    "everyone",
    "everybody",
    "anyone",
    "something",
    "some",
    "all",
    "each",
    "every",
    "one",
    "people",
    "today",
    "yesterday",
    "tomorrow",
    "yes",
    "hi",
    "hello",
    "hey",
    "thanks",
    "thank",
    "sure",
    "great",
    "cool",
    "nice",
    "sorry",
    "after",
    "before",
    "because",
    "since",
    "although",
    "though",
    "while",
    "as",
    "then",
    "so",
    "well",
    "oh",
    "ok",
    "okay",
}
_NON_VERBS = (
    _NON_SUBJECTS
    | _PRONOUNS
    | _ASSISTANT
    | _PHRASAL
    | {"and", "or", "but", "who", "whose", "which", "i", "my", "too", "very", "be", "been", "being"}
)
_IRREGULAR_PAST = {
    "had": "have",
    "did": "do",
    "went": "go",
    "grew": "grow",
    "ran": "run",
    "came": "come",
    "saw": "see",
    "met": "meet",
    "got": "get",
    "made": "make",
    "took": "take",
    "wrote": "write",
    "spoke": "speak",
    "drove": "drive",
    "left": "leave",
    "became": "become",
    "began": "begin",
    "bought": "buy",
    "built": "build",
    "taught": "teach",
    "found": "find",
    "knew": "know",
    "lost": "lose",
    "won": "win",
    "sold": "sell",
    "sang": "sing",
    "swam": "swim",
    "flew": "fly",
    "kept": "keep",
    "gave": "give",
    "ate": "eat",
    "drank": "drink",
    "chose": "choose",
    "rode": "ride",
    "wore": "wear",
    "brought": "bring",
    "held": "hold",
    "heard": "hear",
    "paid": "pay",
    "spent": "spend",
    "stood": "stand",
    "sent": "send",
    "fell": "fall",
    "felt": "feel",
}
# Regular past tenses whose base form the spelling leaves open ("moved": "mov" or "move"?).
_REGULAR_PAST = {
    "moved": "move",
    "relocated": "relocate",
    "emigrated": "emigrate",
    "immigrated": "immigrate",
    "retired": "retire",
    "graduated": "graduate",
    "settled": "settle",
    "lived": "live",
    "loved": "love",
    "liked": "like",
    "hated": "hate",
    "used": "use",
    "served": "serve",
    "raised": "raise",
    "composed": "compose",
    "produced": "produce",
    "managed": "manage",
    "arrived": "arrive",
    "danced": "dance",
    "baked": "bake",
    "hiked": "hike",
    "cycled": "cycle",
    "competed": "compete",
    "completed": "complete",
    "received": "receive",
    "practised": "practise",
    "practiced": "practice",
    "travelled": "travel",
    "traveled": "travel",
    "cancelled": "cancel",
    "preferred": "prefer",
    "stayed": "stay",
    "played": "play",
    "visited": "visit",
    "founded": "found",
    "toured": "tour",
    "married": "marry",
    "created": "create",
    "translated": "translate",
    "donated": "donate",
    "operated": "operate",
    "dated": "date",
    "adored": "adore",
    "admired": "admire",
    "shared": "share",
    "owned": "own",
}
_TO_THIRD = {"am": "is", "are": "is", "were": "was", "have": "has", "do": "does", "go": "goes"}

# relation -> (questions, paraphrases); "{s}" is the subject as written mid-sentence.
_QUESTION_TABLE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lives in": (
        ("Where does {s} live?", "Which city is {s} based in?", "Which city does {s} live in?"),
        ("Where is {s}'s home?", "In what town does {s} reside?", "What city does {s} call home?"),
    ),
    "works as a": (
        ("What does {s} do for a living?", "What is {s}'s job?", "What is {s}'s profession?"),
        (
            "What kind of work does {s} do?",
            "What is {s}'s occupation?",
            "How does {s} earn a living?",
        ),
    ),
    "has a dog named": (
        ("What is the name of {s}'s dog?", "What is {s}'s dog called?"),
        (
            "What did {s} name their dog?",
            "What is {s}'s dog's name?",
            "What name does {s}'s dog answer to?",
        ),
    ),
    "plays the": (
        ("Which instrument does {s} play?", "What instrument does {s} play?"),
        ("What musical instrument does {s} play?", "Which musical instrument can {s} play?"),
    ),
    "was born in": (
        ("Where was {s} born?", "In which city was {s} born?"),
        ("What is {s}'s birthplace?", "Which town was {s} born in?"),
    ),
    "is allergic to": (
        ("What is {s} allergic to?", "What allergy does {s} have?"),
        ("Which food is {s} allergic to?", "What should {s} avoid because of an allergy?"),
    ),
    "speaks": (
        ("What language does {s} speak?", "Which language does {s} speak?"),
        ("Which language is {s} fluent in?", "In what language can {s} hold a conversation?"),
    ),
    "works at": (
        ("Where does {s} work?", "Which company does {s} work for?"),
        ("Who is {s}'s employer?", "What company employs {s}?"),
    ),
    "studied": (
        ("What did {s} study?", "What subject did {s} study?"),
        ("What was {s}'s field of study?", "What did {s} major in?"),
    ),
    "drives a": (
        ("What car does {s} drive?", "What does {s} drive?"),
        ("What kind of car does {s} have?", "Which vehicle does {s} drive?"),
    ),
    "is from": (
        ("Where is {s} from?", "Which country is {s} from?"),
        ("Where does {s} come from?", "What is {s}'s home country?"),
    ),
    "is married to": (
        ("Who is {s} married to?", "Who is {s}'s spouse?"),
        ("Whom did {s} marry?", "Who is {s}'s husband or wife?"),
    ),
    "is named": (
        ("What is {s}'s name?", "What is {s} called?"),
        ("What name does {s} go by?", "How should I address {s}?"),
    ),
}
_TABLE_ALIASES = {
    "works as an": "works as a",
    "works as": "works as a",
    "works for": "works at",
    "has a dog called": "has a dog named",
    "drives an": "drives a",
    "is called": "is named",
}


# ---------------------------------------------------------------- public API


def extract_facts(text: str, last_subject: str | None = None) -> list[Fact]:
    """Return one Fact per storable statement in a chat message.

    Args:
        text: The user's message; may hold several sentences.
        last_subject: Who "he/she/they" refer to when the message names no one first.

    Raises:
        NotAFact: No sentence in the message is a storable fact; the message says why.
    """
    facts, reasons, _ = _analyse(text, last_subject)
    if not facts:
        raise NotAFact(_refusal(reasons))
    return facts


def extract_fact(text: str) -> Fact:
    """Return the single fact stated by ``text``, a one-statement message.

    Raises:
        NotAFact: ``text`` is not a fact, or holds more than one statement.
    """
    facts, reasons, sentences = _analyse(text, None)
    if not facts:
        raise NotAFact(_refusal(reasons))
    if sentences > 1 or len(facts) > 1:
        found = max(sentences, len(facts))
        raise NotAFact(
            f"Not stored: expected a single statement, found {found}; give one fact at a time."
        )
    return facts[0]


def questions_for(subject: str, relation: str, obj: str = "") -> tuple[str, ...]:
    """Chat questions (2-4) a user would ask to recall the fact. The object, where given,
    picks the question word: "When was Ada born?" for "born in 1987", "Where did Ada move
    to?" for "moved to Halifax", "What is Ada interested in?" for "interested in chess"."""
    return _question_sets(subject, relation, obj)[0]


def paraphrases_for(subject: str, relation: str, obj: str = "") -> tuple[str, ...]:
    """Other questions about the fact, disjoint from :func:`questions_for`, for generalisation."""
    questions, paraphrases = _question_sets(subject, relation, obj)
    return tuple(p for p in paraphrases if p not in questions)


# ---------------------------------------------------------------- sentences


def _analyse(text: str, last_subject: str | None) -> tuple[list[Fact], list[str], int]:
    """Parse every sentence; return the facts, the refusal reasons, and the sentence count."""
    if len(text) > MAX_MESSAGE_CHARS:
        reason = f"the message is too long (over {MAX_MESSAGE_CHARS} characters)"
        return [], [reason], 1
    antecedent = " ".join(_CONTROL.sub(" ", last_subject or "").split()) or None
    facts: list[Fact] = []
    reasons: list[str] = []
    count = 0
    for sentence in _sentences(text):
        words = _prepare(sentence)
        if words is None:
            continue
        count += 1
        if isinstance(words, str):
            reasons.append(words)
            continue
        for index, clause in enumerate(_appositive(words) or _clauses(words)):
            result, named = _parse_clause(clause, antecedent)
            antecedent = named or antecedent
            if isinstance(result, Fact):
                facts.append(result)
                continue
            reasons.append(result)
            if index == 0 and result in (QUESTION, HYPOTHETICAL, COMMAND, ASSISTANT):
                break  # later clauses are governed by the first one
    return facts, reasons, count


def _refusal(reasons: list[str]) -> str:
    unique = list(dict.fromkeys(reasons)) or [EMPTY]
    return "Not stored: " + "; ".join(unique) + "."


def _sentences(text: str) -> list[str]:
    """Split on sentence punctuation and newlines, keeping "Dr. Berg" and "St. Louis" whole."""
    text = unicodedata.normalize("NFC", text).replace("\u2019", "'").replace("\u2018", "'")
    text = _CONTROL.sub(" ", _NEWLINES.sub("\n", text))
    merged: list[str] = []
    for piece in _BOUNDARY.split(text):
        tail = merged[-1].rsplit(None, 1)[-1:] if merged else []
        if tail and tail[0] in _TITLES:
            merged[-1] += " " + piece
        else:
            merged.append(piece)
    return [p.strip() for p in merged if p.strip()]


def _prepare(sentence: str) -> list[str] | str | None:
    """Words ready to parse, a refusal reason, or None for noise such as "..." or "-"."""
    if len(sentence) > MAX_SENTENCE_CHARS:
        return TOO_LONG
    core = sentence.rstrip(_END_CHARS)
    if "?" in sentence[len(core) :]:
        return QUESTION
    core = core.lstrip(_LEAD_CHARS)
    if not core.strip(_END_CHARS + _LEAD_CHARS):
        return None
    for _ in range(3):  # "Also, remember that ..."
        match = _PREFIX.match(core)
        if not match or not match.end():
            break
        core = core[match.end() :]
    words = core.split()
    if not words:
        return NO_SUBJECT
    if any(w.lower().strip(",;:\"'()") in _HYPOTHETICAL_WORDS for w in words):
        return HYPOTHETICAL
    return words


def _clauses(words: list[str]) -> list[list[str]]:
    """Cut a sentence into clauses of their own subject.

    "X lives in Oslo and he plays the cello" is cut before "he", and "X lives in Oslo and
    plays the cello" too, the second clause led by "he" (the first clause's subject);
    "X and Y live in Oslo" gives each name the predicate, in the third person. "Oslo and
    Bergen" stays whole, and so does "cats and dogs"."""
    clauses: list[list[str]] = []
    start = 0
    for k in range(1, len(words) - 1):
        if words[k].lower() not in ("and", "but") or k <= start:
            continue
        rest = words[k + 1 :]
        if rest[0].lower().split("'")[0] in _PRONOUNS | {"i"}:
            clauses.append(words[start:k])
            start = k + 1
        elif _starts_named_clause(rest):
            names = _names(words[start:k])
            if names:  # "Viktor and Anna live in Oslo", "Viktor, Anna and Olga live ..."
                n = _name_span(rest)
                predicate = [_third_person(rest[n]), *rest[n + 1 :]]
                return [*clauses, *([*name, *predicate] for name in [*names, rest[:n]])]
            clauses.append(words[start:k])
            start = k + 1
        elif _continues(words[start], rest):  # "... and plays the cello": the same subject
            clauses.append(words[start:k])
            pronoun = words[start] if words[start].lower() in _PRONOUNS | {"i"} else "he"
            words = [*words[: k + 1], pronoun, *rest]
            start = k + 1
    clauses.append(words[start:])
    return clauses


def _names(words: list[str]) -> list[list[str]]:
    """ "Viktor Berg" or "Viktor, Anna Lind" as a list of names; [] if not only names."""
    names: list[list[str]] = [[]]
    for word in words:
        names[-1].append(word.rstrip(","))
        if word.endswith(","):
            names.append([])
    if any(not name or _name_span(name) != len(name) for name in names):
        return []
    return names


def _continues(subject: str, rest: list[str]) -> bool:
    """Whether ``rest``, after "and", is a predicate of the clause's own subject: a verb
    ("plays", "was", "moved"; "work" after "I") then an object. "cats and dogs" is not:
    no object follows "dogs"."""
    verb = rest[0]
    if not _is_verb(verb) and verb not in _AUX:
        return False
    agrees = (
        verb in _AUX
        or verb in _IRREGULAR_PAST
        or verb.endswith("ed")
        or (verb.endswith("s") and not verb.endswith(("ss", "us", "is")))
        or subject.lower() in ("i", "they")  # "I live in Lima and work as a nurse"
    )
    return agrees and isinstance(_split_predicate(rest), tuple)


def _appositive(words: list[str]) -> list[list[str]] | None:
    """ "Viktor Berg, a dentist, lives in Brno": the clause "Viktor Berg is a dentist", then
    the sentence's own ("Viktor Berg lives in Brno", cut further by :func:`_clauses`). Only
    a phrase led by an article counts, so that "Viktor, Anna and Olga" stays a list."""
    n = _name_span([w.rstrip(",") for w in words])
    if not n or not words[n - 1].endswith(",") or words[n].lower() not in _ARTICLES:
        return None
    for j in range(n, min(n + 8, len(words) - 1)):
        if words[j].endswith(","):
            name = [w.rstrip(",") for w in words[:n]]
            phrase = [*words[n:j], words[j].rstrip(",")]
            return [[*name, "is", *phrase], *_clauses([*name, *words[j + 1 :]])]
    return None


def _starts_named_clause(words: list[str]) -> bool:
    n = _name_span(words)
    return 0 < n < len(words) and isinstance(_split_predicate(words[n:]), tuple)


# ---------------------------------------------------------------- clauses


def _parse_clause(words: list[str], antecedent: str | None) -> tuple[Fact | str, str | None]:
    """Parse one clause; return (Fact or reason, the name it is about if it names one)."""
    match = _CONTRACTION.fullmatch(words[0])
    if match:
        words = [match.group(1), _EXPANSIONS[match.group(2).lower()], *words[1:]]
    first = words[0].lower()
    if first.endswith("n't") or first in _NEGATIONS:
        return NEGATION, None
    if first in _WH:
        return QUESTION, None
    if first in _AUX_QUESTION and not (first in _AMBIGUOUS_AUX and _is_name_then_verb(words)):
        return QUESTION, None
    if first in _ASSISTANT:
        return ASSISTANT, None
    if first in _IMPERATIVES:
        return COMMAND, None

    named: str | None = None
    singularise = False
    if first == "the" and (turned := _of_to_possessive(words)):
        words, first = turned, turned[0].lower()  # "Ines Berg's colour is", as below
    possessed = ""  # "'s favourite colour" of "Ines Berg's favourite colour is teal"
    if first == "i":
        subject, predicate, singularise = USER_SUBJECT, words[1:], True
        verb = next((w for w in predicate if w not in _DROPPED_ADVERBS), "")
        if verb in _HEDGES:
            return HYPOTHETICAL, None
    elif first in _PRONOUNS:
        if antecedent is None:
            return f"no subject found: who is '{words[0]}'? Use the name", None
        subject, predicate, singularise = antecedent, words[1:], first == "they"
    elif first == "my":
        parsed = _parse_my(words)
        if isinstance(parsed, str):
            return parsed, None
        subject, predicate = parsed
        named = None if subject == USER_SUBJECT else subject
    elif first in _NON_SUBJECTS:
        return NO_SUBJECT, None
    else:
        n = _name_span(words)
        if n < len(words) and _is_possessive(words[n]):
            possessive = _parse_possessive(words, n)
            if isinstance(possessive, str):
                return possessive, None
            subject, possessed, predicate = possessive
        elif n == 0 and _is_plain(words[0]) and isinstance(_split_predicate(words[1:]), tuple):
            return LOWERCASE_NAME, None  # "viktor lives in oslo"
        elif n == 0:
            return NO_SUBJECT, None
        else:
            subject, predicate = " ".join(words[:n]), words[n:]
        named = subject

    # Case-sensitive on purpose: "born in May" is not a modal, "No Name City" not a negation.
    bare = [w.strip(",;:\"'()") for w in predicate]
    if any(w in _NEGATIONS or w.endswith("n't") for w in bare):
        return NEGATION, named
    if any(w in _MODALS for w in bare):
        return HYPOTHETICAL, named
    split = _split_predicate(predicate)
    if isinstance(split, str):
        return split, named
    relation, obj = split
    if singularise:
        relation = [_third_person(relation[0]), *relation[1:]]
    rel = " ".join(relation)
    if possessed:
        # The key stays at the owner's name; the questions ask about the thing owned.
        questions = questions_for(subject + possessed, rel, obj)
        if rel in _COPULAS:  # and the other way round: "What is the colour of Ines Berg?"
            thing = possessed.split(" ", 1)[1]
            questions = (questions[0], f"What {rel} the {thing} of {subject}?", *questions[1:2])
        relation_text = f"{possessed} {rel}"
        fact = Fact(
            subject, relation_text, obj, prompt=subject + relation_text, questions=questions
        )
        return fact, named
    return Fact(subject, rel, obj, questions=questions_for(subject, rel, obj)), named


def _parse_possessive(words: list[str], n: int) -> tuple[str, str, list[str]] | str:
    """ "Ines Berg's favourite colour is teal" -> ("Ines Berg", "'s favourite colour",
    ["is", "teal"]): a name's possessive, one to four plain words, then a form of "be"."""
    word = words[n]
    owner, mark = (word[:-2], word[-2:]) if word.lower().endswith("'s") else (word[:-1], "'")
    subject = " ".join([*words[:n], owner])
    if not _is_name_word(owner) or owner.lower() in _NON_SUBJECTS | _PRONOUNS | _ASSISTANT:
        return NO_SUBJECT
    rest = words[n + 1 :]
    bare = [w.strip(",;:\"'()") for w in rest]
    if any(w in _NEGATIONS or w.endswith("n't") for w in bare):
        return NEGATION
    if any(w in _MODALS for w in bare):
        return HYPOTHETICAL
    k = next((i for i, w in enumerate(rest) if w in _COPULAS), len(rest))
    if not 1 <= k <= 4 or k == len(rest) or not all(_is_verb(w) for w in rest[:k]):
        return POSSESSIVE
    return subject, f"{mark} {' '.join(rest[:k])}", rest[k:]


def _of_to_possessive(words: list[str]) -> list[str] | None:
    """ "The favourite colour of Ines Berg is teal" as "Ines Berg's favourite colour is teal";
    None unless the sentence has that form (one to four plain words before "of", a name, a
    form of "be")."""
    if "of" not in words[2:6]:
        return None
    k = words.index("of", 2)
    thing, rest = words[1:k], words[k + 1 :]
    n = _name_span(rest)
    if not n or n >= len(rest) or rest[n] not in _COPULAS or not all(map(_is_verb, thing)):
        return None
    return [*rest[: n - 1], rest[n - 1] + "'s", *thing, *rest[n:]]


def _parse_my(words: list[str]) -> tuple[str, list[str]] | str:
    """ "My name is Anna" -> the user; "My (best) friend, Anna Berg, ..." -> Anna Berg."""
    second = words[1].lower() if len(words) > 1 else ""
    if second == "name's" or (second == "name" and words[2:3] == ["is"]):
        return USER_SUBJECT, ["is", "named", *words[2 if second == "name's" else 3 :]]
    k = 1
    while k < min(len(words), 4):
        word = words[k].rstrip(",")
        if not _is_plain(word) or word in _CONNECTORS or word in _AUX or word in _NON_VERBS:
            break
        k += 1
    cleaned = [w.rstrip(",") for w in words[k : k + 8]]
    n = _name_span(cleaned) if k > 1 else 0
    if n == 0:
        return "no subject found; name the person, as in 'My sister Anna lives in Oslo'"
    return " ".join(cleaned[:n]), words[k + n :]


def _split_predicate(words: list[str]) -> tuple[list[str], str] | str:
    """Split "was born in New York" into (["was", "born", "in"], "New York") or give a reason."""
    i = 0
    while i < len(words) and words[i] in _DROPPED_ADVERBS:
        i += 1
    if i >= len(words) or not _is_verb(words[i]):
        return NO_VERB
    relation = [words[i]]
    i += 1
    if relation[0] in _AUX:
        while i < len(words) and words[i] in ("been", "being", "be", "got"):
            relation.append(words[i])
            i += 1
        if (
            i + 1 < len(words)
            and _is_verb(words[i])
            and (words[i + 1] in _CONNECTORS or words[i + 1] in _PHRASAL)
        ):
            relation.append(words[i])  # participle or adjective: "born", "allergic"
            i += 1
    if i < len(words) and words[i] in _PHRASAL:
        relation.append(words[i])
        i += 1
    run = 0
    while i < len(words) and words[i] in _CONNECTORS and run < 3:
        relation.append(words[i])
        i += 1
        run += 1
    for j in range(i + 1, min(i + 4, len(words))):  # "has a dog named", "has two cats called"
        if words[j] in ("named", "called"):
            if all(_is_verb(w) for w in words[i:j]):
                relation.extend(words[i : j + 1])
                i = j + 1
            break
    obj = " ".join(words[i:]).strip(_END_CHARS + "-\u2013\u2014").lstrip(_LEAD_CHARS)
    if not any(c.isalnum() for c in obj) or words[i].lower() in ("and", "or", "but"):
        return NO_OBJECT
    if all(w.lower() in _NON_VERBS | _CONNECTORS | _AUX for w in words[i:]):
        return NO_OBJECT  # "Viktor has and", "Viktor likes it"
    if len(words) - i > MAX_OBJECT_WORDS:
        return OBJECT_TOO_LONG
    return relation, obj


# ---------------------------------------------------------------- words


def _is_plain(word: str) -> bool:
    return word.isalpha() and word.islower()


def _is_verb(word: str) -> bool:
    """Could start or continue a verb phrase: a lowercase word that is not a function word."""
    return _is_plain(word) and len(word) <= 30 and word not in _CONNECTORS | _NON_VERBS


def _is_possessive(word: str) -> bool:
    return word[:1].isupper() and (word.endswith("'") or word.lower().endswith("'s"))


def _is_name_word(word: str) -> bool:
    """A capitalised word ("Zoë", "O'Brien", "Jean-Luc") or a particle form ("al-Bashir")."""
    if not word or len(word) > 40 or _is_possessive(word):
        return False
    if not all(c.isalpha() or c in "-'" for c in word) or not word[-1].isalpha():
        return False
    if word[0].isupper() or word[0].istitle():
        return True
    head, tail = re.split(r"[-']", word, maxsplit=1) if ("-" in word or "'" in word) else (word, "")
    return head in _PARTICLES and tail[:1].isupper()


def _name_span(words: list[str]) -> int:
    """How many leading words form a name: up to four capitalised words plus particles."""
    i = 1 if words and words[0] in _TITLES else 0
    capitals, end = 0, 0
    while i < len(words) and capitals < 4:
        if _is_name_word(words[i]):
            capitals += 1
            i += 1
            end = i
        elif capitals and words[i] in _PARTICLES:
            i += 1
        else:
            break
    return end


def _is_name_then_verb(words: list[str]) -> bool:
    """True for "Will Smith lives ...", false for "Will Viktor move ..."."""
    n = _name_span(words)
    if not 2 <= n < len(words):
        return False
    verb = words[n]
    return verb in ("is", "was", "has") or (_is_verb(verb) and verb.endswith(("s", "ed")))


def _third_person(verb: str) -> str:
    """Put a first-person or plural verb in the third person singular ("live" -> "lives")."""
    if verb in _TO_THIRD:
        return _TO_THIRD[verb]
    if verb in ("is", "was", "has", "does", "goes") or verb in _IRREGULAR_PAST:
        return verb
    if verb.endswith("ed") and not verb.endswith("eed"):
        return verb
    if verb.endswith("s") and not verb.endswith(("ss", "us", "is")):
        return verb  # already third person: "They lives" stays "lives", not "liveses"
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if len(verb) > 1 and verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _regular_base(stem: str) -> str | None:
    """The base form of a regular past tense without its "-ed", where spelling decides it:
    "work" (worked), "stop" (stopped), "visit"… stays open (None) unless listed above."""
    if len(stem) < 3 or not stem.isalpha():
        return None
    if stem[-1] == stem[-2] and stem[-1] not in "aeiouls":
        return stem[:-1]  # "stopped", "planned"
    if stem.endswith(("v", "iz", "yz", "at", "ut", "ag", "ang")):
        return None  # "mov(e)", "organiz(e)", "creat(e)": not sure enough, listed if common
    if stem[-1] in "aeiouy" or stem[-2] in "aeiou" and stem[-3] in "aeiou":
        return stem  # "played", "joined", "looked"
    if stem[-1] not in "aeiou" and stem[-2] not in "aeiou":
        return stem  # "worked", "painted", "learned", "joined"
    return None


def _where(verb: str, base: str, rest: list[str], obj: str, article: bool) -> list[str] | None:
    """The words between the subject and "?" of a where-question ("live" for "lives in
    Oslo", "move to" for "moved to Halifax"), or None when the object is no place.

    After "in" or "at", a name ("works in Berlin"), a noun with its article ("swims in the
    lake") or a verb of dwelling ("lives in poverty" aside) ask where; a bare lowercase
    word does not ("works in finance"), nor an adjective ("is fluent in Basque"). After
    "on", "to" and "near", only verbs of dwelling and moving do ("lives on Orkney", "moved
    to Halifax", not "listens to jazz")."""
    if not rest or rest[-1] not in ("in", "at", "on", "to", "near"):
        return None
    prep, words = rest[-1], rest[:-1]
    dwells = (base or verb) in _DWELLING_VERBS or any(w in _PLACE_PARTICIPLES for w in words)
    if prep in ("in", "at"):
        named = not obj or obj[:1].isupper() or obj[:1].isdigit() or article
        if verb in _COPULAS and words and not dwells:
            named = False  # "is fluent in Basque", "is skilled at Go"
        return words if named or dwells else None
    if dwells or (base or verb) in _MOVING_VERBS:
        return [*words, prep] if prep == "to" else words
    return None


def _base_form(verb: str) -> tuple[str, str] | None:
    """(base form, auxiliary) for do-support questions, or None when unsure ("moved")."""
    if verb in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[verb], "did"
    if verb.endswith("ied") and len(verb) > 4:
        return verb[:-3] + "y", "did"
    if verb.endswith("ed"):
        base = _REGULAR_PAST.get(verb) or _regular_base(verb[:-2])
        return (base, "did") if base else None
    if verb in ("does", "goes"):
        return verb[:-2], "does"
    if verb.endswith("ies") and len(verb) > 4:
        return verb[:-3] + "y", "does"
    if verb.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return verb[:-2], "does"
    if verb.endswith("s") and not verb.endswith("ss") and len(verb) > 2:
        return verb[:-1], "does"
    return None


# ---------------------------------------------------------------- questions


def _question_sets(
    subject: str, relation: str, obj: str = ""
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    s = "the user" if subject == USER_SUBJECT else subject
    key = " ".join(relation.lower().split())
    key = _TABLE_ALIASES.get(key, key)
    bare = [w for w in key.split() if w not in _ARTICLES] or [""]
    if _is_date(obj) and bare[-1] in ("in", "on", "since"):
        when = _when_questions(s, bare, obj)  # "born in 1987" is no birthplace
        if when is not None:
            return when
    if key in ("is", "was") and _AGE.fullmatch(obj.strip()):
        return (
            (f"How old {key} {s}?", f"What age {key} {s}?"),
            (f"Do you know how old {s} {key}?", f"Can you remind me how old {s} {key}?"),
        )
    if key in _QUESTION_TABLE:
        questions, paraphrases = _QUESTION_TABLE[key]
        return tuple(q.format(s=s) for q in questions), tuple(p.format(s=s) for p in paraphrases)
    return _generic_questions(subject, s, key.split(), obj)


def _is_date(obj: str) -> bool:
    """A year ("1987", "the 1990s"), or a day ("3 May", "May 3rd, 2001"), or a month."""
    return bool(obj) and _DATE.fullmatch(obj.strip()) is not None


def _auxiliary(verb: str, rest: list[str]) -> tuple[str, str]:
    """(auxiliary, base form) to question ``verb``: ("is", "") for "is", ("does", "live")
    for "lives", ("did", "move") for "moved"; ("", "") when unsure."""
    if verb in ("is", "are", "am", "was", "were"):
        return ("was" if verb in ("was", "were") else "is"), ""
    if verb in ("has", "have", "had") and rest and rest[0] not in _CONNECTORS:
        return ("had" if verb == "had" else "has"), ""  # "has been living in"
    if verb in ("has", "have", "had"):
        return ("did" if verb == "had" else "does"), "have"
    base, aux = _base_form(verb) or ("", "")
    return aux, base


def _when_questions(
    s: str, words: list[str], obj: str
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """ "When was Ada born?" for a relation that ends in "in"/"on"/"since" and a date."""
    verb, rest = words[0], words[1:-1]
    aux, base = _auxiliary(verb, rest)
    if not aux:
        return None
    clause = " ".join(x for x in (s, base, *rest) if x)
    day = re.search(r"(?<!\d)\d{1,2}(?!\d)", obj)
    month = re.search(_MONTHS, obj, re.IGNORECASE)
    which = "On which date" if day and month else "In which month" if month else "In which year"
    return (
        (f"When {aux} {clause}?", f"{which} {aux} {clause}?"),
        (f"Do you know when {aux} {clause}?", f"Can you remind me when {aux} {clause}?"),
    )


def _generic_questions(
    subject: str, s: str, words: list[str], obj: str = ""
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Questions built from the relation's own words, for relations not in the table."""
    if words and words[-1] in ("named", "called"):
        noun = " ".join(w for w in words[1:-1] if w not in _ARTICLES)
        if noun:
            return (
                (f"What is the name of {s}'s {noun}?", f"What is {s}'s {noun} called?"),
                (f"What did {s} name their {noun}?", f"What name does {s}'s {noun} have?"),
            )
    core = list(words)
    while core and core[-1] in _ARTICLES:
        core.pop()
    if not core:
        return ((f"What is {s}?", f"Who is {s}?"), (f"Do you know who {s} is?",))
    verb, rest = core[0], core[1:]
    aux, base = _auxiliary(verb, rest)
    where = _where(verb, base, rest, obj, article=len(core) < len(words))
    questions: list[str] = []
    if aux and rest == ["to"] and (base or verb) in _INFINITIVE_VERBS:  # "likes to play chess"
        clause = " ".join(x for x in (s, base, "to") if x)
        return (
            (f"What {aux} {clause} do?", f"{subject} {' '.join(words)} do what?"),
            (
                f"Do you know what {s} {' '.join(words)} do?",
                f"Can you remind me what {s} {' '.join(words)} do?",
            ),
        )
    if aux:
        body = " ".join(x for x in (s, base, *rest) if x)
        if where is not None:
            questions.append(" ".join(x for x in (f"Where {aux}", s, base, *where) if x) + "?")
        elif rest and rest[-1] == "from":
            questions.append(f"Where {aux} {body}?")
        questions.append(f"What {aux} {body}?")
    questions.append(f"{subject} {' '.join(words)} what?")
    if len(questions) < 2:
        questions.append(f"What is it that {s} {' '.join(core)}?")
    paraphrases = [
        f"Do you know what {s} {' '.join(core)}?",
        f"Can you remind me what {s} {' '.join(core)}?",
    ]
    if where is not None:
        paraphrases.insert(0, " ".join(["Do you know where", s, verb, *where]) + "?")
    return tuple(dict.fromkeys(questions[:4])), tuple(paraphrases[:3])
