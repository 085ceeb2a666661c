"""Behaviour of the rule-based fact extractor (sleeptui.extract)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sleeptui.errors import NotAFact
from sleeptui.extract import (
    MAX_MESSAGE_CHARS,
    USER_SUBJECT,
    extract_fact,
    extract_facts,
    paraphrases_for,
    questions_for,
)

BENCH_FILE = Path(__file__).parents[3] / "shared" / "bench" / "facts.json"


def _bench_entries() -> list[dict]:
    if not BENCH_FILE.is_file():
        return []
    return json.loads(BENCH_FILE.read_text(encoding="utf-8"))


def _triple(text: str) -> tuple[str, str, str]:
    fact = extract_fact(text)
    return fact.subject, fact.relation, fact.object


def _refusal(text: str, last_subject: str | None = None) -> str:
    with pytest.raises(NotAFact) as caught:
        extract_facts(text, last_subject)
    return str(caught.value)


# ---------------------------------------------------------------- bench pool


@pytest.mark.skipif(not BENCH_FILE.is_file(), reason=f"bench file {BENCH_FILE} is absent")
def test_every_bench_sentence_extracts_exactly_its_triple() -> None:
    entries = _bench_entries()
    assert len(entries) == 300
    wrong = [
        (e["sentence"], _triple(e["sentence"]))
        for e in entries
        if _triple(e["sentence"]) != (e["subject"], e["relation"], e["object"])
    ]
    assert wrong == []


@pytest.mark.skipif(not BENCH_FILE.is_file(), reason=f"bench file {BENCH_FILE} is absent")
def test_bench_questions_are_among_the_generated_questions() -> None:
    for entry in _bench_entries():
        generated = questions_for(entry["subject"], entry["relation"])
        assert set(entry["questions"]) <= set(generated), entry["sentence"]
        assert extract_fact(entry["sentence"]).prompt == entry["prompt"]


@pytest.mark.parametrize(
    ("sentence", "triple"),
    [
        ("Halima Zelenko plays the drums.", ("Halima Zelenko", "plays the", "drums")),
        ("Lucca Suzuki works as an economist.", ("Lucca Suzuki", "works as an", "economist")),
        ("Stellan Suzuki works as a nurse.", ("Stellan Suzuki", "works as a", "nurse")),
        ("Ciro Castillo has a dog named Mango.", ("Ciro Castillo", "has a dog named", "Mango")),
        ("Lars Kowalski lives in Tromsø.", ("Lars Kowalski", "lives in", "Tromsø")),
    ],
)
def test_bench_relations_extract_without_the_bench_file(
    sentence: str, triple: tuple[str, str, str]
) -> None:
    assert _triple(sentence) == triple


# ---------------------------------------------------------------- general forms


@pytest.mark.parametrize(
    ("sentence", "triple"),
    [
        ("Viktor Voronov was born in Nagoya.", ("Viktor Voronov", "was born in", "Nagoya")),
        ("Ines Berg is allergic to sesame.", ("Ines Berg", "is allergic to", "sesame")),
        ("Maria Lopez speaks Portuguese.", ("Maria Lopez", "speaks", "Portuguese")),
        ("Tomas Novak works at Siemens.", ("Tomas Novak", "works at", "Siemens")),
        ("Aiko Tanaka studied physics.", ("Aiko Tanaka", "studied", "physics")),
        ("Olga Petrova drives a Volvo.", ("Olga Petrova", "drives a", "Volvo")),
        ("Viktor lives in New York.", ("Viktor", "lives in", "New York")),
        (
            "Łukasz Wróbel works as an electrical engineer.",
            ("Łukasz Wróbel", "works as an", "electrical engineer"),
        ),
        ("Zoë Müller grew up in Malmö.", ("Zoë Müller", "grew up in", "Malmö")),
        ("Conan O'Brien has a cat called Tom.", ("Conan O'Brien", "has a cat called", "Tom")),
        ("Ludwig van Beethoven plays the piano.", ("Ludwig van Beethoven", "plays the", "piano")),
        ("Jean-Luc Picard is married to Beverly.", ("Jean-Luc Picard", "is married to", "Beverly")),
        ("Omar al-Farouk is from Cairo.", ("Omar al-Farouk", "is from", "Cairo")),
        ("Dr. Anna Berg lives in St. Louis.", ("Dr. Anna Berg", "lives in", "St. Louis")),
        ("Viktor has been living in Oslo.", ("Viktor", "has been living in", "Oslo")),
        ("Viktor was born in May.", ("Viktor", "was born in", "May")),
        ("Viktor is 34 years old.", ("Viktor", "is", "34 years old")),
        ("Will Smith lives in Philadelphia.", ("Will Smith", "lives in", "Philadelphia")),
        ("Viktor also lives in Oslo!", ("Viktor", "lives in", "Oslo")),
        ("- Viktor works at \u201cAcme\u201d.", ("Viktor", "works at", "Acme")),
    ],
)
def test_general_statements_split_into_subject_relation_object(
    sentence: str, triple: tuple[str, str, str]
) -> None:
    assert _triple(sentence) == triple


@pytest.mark.parametrize(
    "prefix",
    [
        "Remember that ",
        "Remember: ",
        "remember, ",
        "Note that ",
        "FYI ",
        "FYI: ",
        "Please remember that ",
        "Just so you know, ",
    ],
)
def test_memory_prefixes_are_stripped_before_extraction(prefix: str) -> None:
    assert _triple(prefix + "Viktor lives in Oslo.") == ("Viktor", "lives in", "Oslo")


def test_kinship_words_are_dropped_and_the_named_person_is_the_subject() -> None:
    assert _triple("My sister Anna lives in Oslo.") == ("Anna", "lives in", "Oslo")
    assert _triple("My best friend, Anna Berg, works as a nurse.") == (
        "Anna Berg",
        "works as a",
        "nurse",
    )


def test_fact_carries_default_prompt_and_chat_questions() -> None:
    fact = extract_fact("Viktor Voronov was born in Nagoya.")
    assert fact.prompt == "Viktor Voronov was born in"
    assert fact.questions == questions_for("Viktor Voronov", "was born in")
    assert "Where was Viktor Voronov born?" in fact.questions


# ---------------------------------------------------------------- first person


@pytest.mark.parametrize(
    ("sentence", "relation", "obj"),
    [
        ("I live in Berlin.", "lives in", "Berlin"),
        ("I work as a nurse.", "works as a", "nurse"),
        ("I'm allergic to peanuts.", "is allergic to", "peanuts"),
        ("I am from Ghana.", "is from", "Ghana"),
        ("I have a dog named Rex.", "has a dog named", "Rex"),
        ("I was born in Lyon.", "was born in", "Lyon"),
        ("I studied physics.", "studied", "physics"),
        ("I watch anime.", "watches", "anime"),
        ("I study law.", "studies", "law"),
        ("I go to Oxford.", "goes to", "Oxford"),
        ("My name is Anna.", "is named", "Anna"),
    ],
)
def test_first_person_facts_are_about_the_user_in_third_person(
    sentence: str, relation: str, obj: str
) -> None:
    assert _triple(sentence) == (USER_SUBJECT, relation, obj)


def test_first_person_fact_reads_as_a_sentence_and_asks_about_the_user() -> None:
    fact = extract_fact("I live in Berlin.")
    assert fact.sentence == "The user lives in Berlin."
    assert "Where does the user live?" in fact.questions


# ---------------------------------------------------------------- pronouns


@pytest.mark.parametrize(
    ("sentence", "relation", "obj"),
    [
        ("He lives in Oslo.", "lives in", "Oslo"),
        ("She plays the cello.", "plays the", "cello"),
        ("They work as a chef.", "works as a", "chef"),
        ("She's a dentist.", "is a", "dentist"),
    ],
)
def test_pronouns_resolve_to_the_last_subject(sentence: str, relation: str, obj: str) -> None:
    [fact] = extract_facts(sentence, last_subject="Viktor Voronov")
    assert (fact.subject, fact.relation, fact.object) == ("Viktor Voronov", relation, obj)


def test_pronouns_prefer_a_subject_named_earlier_in_the_message() -> None:
    facts = extract_facts("Anna Berg lives in Oslo. She plays the harp.", last_subject="Viktor")
    assert [(f.subject, f.object) for f in facts] == [("Anna Berg", "Oslo"), ("Anna Berg", "harp")]


def test_pronoun_without_antecedent_has_no_subject() -> None:
    assert "no subject found" in _refusal("He lives in Oslo.")
    with pytest.raises(NotAFact, match="no subject found"):
        extract_fact("She plays the cello.")


# ---------------------------------------------------------------- several facts


def test_multi_sentence_message_yields_one_fact_per_statement() -> None:
    facts = extract_facts("Viktor lives in Oslo. Anna Berg works as a baker!\nKim speaks Thai")
    assert [(f.subject, f.relation, f.object) for f in facts] == [
        ("Viktor", "lives in", "Oslo"),
        ("Anna Berg", "works as a", "baker"),
        ("Kim", "speaks", "Thai"),
    ]


def test_clauses_joined_by_and_become_separate_facts() -> None:
    facts = extract_facts("Viktor lives in Oslo and he plays the cello, but Anna works at Lego.")
    assert [(f.subject, f.relation, f.object) for f in facts] == [
        ("Viktor", "lives in", "Oslo"),
        ("Viktor", "plays the", "cello"),
        ("Anna", "works at", "Lego"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Tomas Kral lives in Olomouc and works as a baker.",
            [("Tomas Kral", "lives in", "Olomouc"), ("Tomas Kral", "works as a", "baker")],
        ),
        (
            "Tomas Kral was born in Brno and grew up in Prague.",
            [("Tomas Kral", "was born in", "Brno"), ("Tomas Kral", "grew up in", "Prague")],
        ),
        (
            "I live in Lima and work as a nurse.",
            [(USER_SUBJECT, "lives in", "Lima"), (USER_SUBJECT, "works as a", "nurse")],
        ),
        (
            "Viktor and Anna Lind live in Oslo.",
            [("Viktor", "lives in", "Oslo"), ("Anna Lind", "lives in", "Oslo")],
        ),
        (
            "Viktor, Anna and Olga Berg live in Rome.",
            [
                ("Viktor", "lives in", "Rome"),
                ("Anna", "lives in", "Rome"),
                ("Olga Berg", "lives in", "Rome"),
            ],
        ),
        (
            "Viktor Johansson, a dentist, lives in Brno.",
            [("Viktor Johansson", "is a", "dentist"), ("Viktor Johansson", "lives in", "Brno")],
        ),
        ("Tomas Kral collects stamps and coins.", [("Tomas Kral", "collects", "stamps and coins")]),
        ("Tomas Kral likes cats and dogs.", [("Tomas Kral", "likes", "cats and dogs")]),
    ],
)
def test_and_and_appositives_share_a_subject_or_a_predicate(
    text: str, expected: list[tuple[str, str, str]]
) -> None:
    assert [(f.subject, f.relation, f.object) for f in extract_facts(text)] == expected


@pytest.mark.parametrize(
    ("text", "questions"),
    [
        ("Tomas Kral likes to play chess.", ["What does Tomas Kral like to do?"]),
        ("Tomas Kral is 42 years old.", ["How old is Tomas Kral?", "What age is Tomas Kral?"]),
        ("Tomas Kral is 42.", ["How old is Tomas Kral?"]),
    ],
)
def test_infinitives_and_ages_get_their_own_questions(text: str, questions: list[str]) -> None:
    assert set(questions) <= set(extract_fact(text).questions)


def test_a_lowercase_name_is_refused_with_how_to_write_it() -> None:
    assert "write the name with capitals" in _refusal("viktor lives in oslo")


def test_and_inside_an_object_stays_in_the_object() -> None:
    assert _triple("Viktor is allergic to peanuts and Brazil nuts.") == (
        "Viktor",
        "is allergic to",
        "peanuts and Brazil nuts",
    )


def test_non_facts_are_skipped_when_other_sentences_are_facts() -> None:
    facts = extract_facts("Where does Anna live? Viktor lives in Oslo. He doesn't drive.")
    assert [(f.subject, f.object) for f in facts] == [("Viktor", "Oslo")]


def test_extract_fact_refuses_more_than_one_statement() -> None:
    with pytest.raises(NotAFact, match="single statement"):
        extract_fact("Viktor lives in Oslo. Anna lives in Riga.")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "text",
    [
        "Where does Viktor live?",
        "Does Viktor live in Oslo",
        "Is Anna a nurse",
        "Viktor lives in Oslo?",
        "Will Viktor move to Oslo",
        "who is Anna",
    ],
)
def test_questions_are_refused(text: str) -> None:
    assert "question" in _refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "If Viktor lived in Oslo, he would be happy.",
        "Viktor might live in Oslo.",
        "Viktor would live in Oslo.",
        "Suppose Viktor lives in Oslo.",
        "Imagine Anna is a pilot.",
        "Viktor probably lives in Oslo.",
        "I think Viktor lives in Oslo.",
        "I'd live in Rome.",
    ],
)
def test_hypotheticals_are_refused(text: str) -> None:
    assert "hypotheticals are not stored" in _refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Viktor does not live in Oslo.",
        "Viktor doesn't live in Oslo.",
        "Viktor never lived here.",
        "Viktor isn't a nurse.",
        "Viktor no longer lives in Oslo.",
        "Viktor has no siblings.",
        "I don't drive.",
        "Nobody lives in Oslo.",
    ],
)
def test_negations_are_refused(text: str) -> None:
    assert "negations are not stored" in _refusal(text)


@pytest.mark.parametrize(
    "text", ["You live in Oslo.", "You are a helpful bot.", "You're funny.", "Your name is Bob."]
)
def test_statements_about_the_assistant_are_refused(text: str) -> None:
    assert "statements about the assistant are not stored" in _refusal(text)


@pytest.mark.parametrize(
    "text", ["Tell me about Viktor.", "Please list my facts.", "Remember Viktor's birthday."]
)
def test_commands_are_refused(text: str) -> None:
    assert "command" in _refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "It is raining.",
        "The weather is nice today.",
        "viktor lives in oslo.",
        "We live in Rome.",
        "My dog is named Rex.",
        "123 lives in Oslo.",
        "Remember that.",
    ],
)
def test_sentences_without_a_named_subject_are_refused(text: str) -> None:
    assert "no subject found" in _refusal(text)


def test_sentences_without_verb_or_object_are_refused() -> None:
    assert "no verb phrase" in _refusal("Viktor Voronov.")
    assert "no verb phrase" in _refusal("Viktor and Anna.")
    assert "no object" in _refusal("Viktor sleeps.")
    assert "no object" in _refusal("Viktor lives in.")


@pytest.mark.parametrize(
    ("text", "subject", "relation", "obj", "prompt", "question"),
    [
        (
            "Ignatius Brell's favourite colour is teal.",
            "Ignatius Brell",
            "'s favourite colour is",
            "teal",
            "Ignatius Brell's favourite colour is",
            "What is Ignatius Brell's favourite colour?",
        ),
        (
            "Viktor's dog is named Rex.",
            "Viktor",
            "'s dog is named",
            "Rex",
            "Viktor's dog is named",
            "What is Viktor's dog's name?",
        ),
        (
            "Anna Berg's favourite food was sushi.",
            "Anna Berg",
            "'s favourite food was",
            "sushi",
            "Anna Berg's favourite food was",
            "What was Anna Berg's favourite food?",
        ),
        ("James' car is a Volvo.", "James", "' car is a", "Volvo", "James' car is a", None),
        (
            "The favourite colour of Ines Berg is teal.",
            "Ines Berg",
            "'s favourite colour is",
            "teal",
            "Ines Berg's favourite colour is",
            "What is the favourite colour of Ines Berg?",
        ),
    ],
)
def test_a_names_possessive_with_is_is_stored_about_the_name(
    text: str, subject: str, relation: str, obj: str, prompt: str, question: str | None
) -> None:
    fact = extract_fact(text)
    assert (fact.subject, fact.relation, fact.object, fact.prompt) == (
        subject,
        relation,
        obj,
        prompt,
    )
    assert fact.sentence == f"{prompt} {obj}."
    if question:
        assert question in fact.questions


def test_other_possessives_are_refused_with_a_hint() -> None:
    assert "possessive" in _refusal("Viktor's sister lives in Oslo.")  # about the sister
    assert "possessive" in _refusal("Viktor's is the best.")
    assert "possessive" in _refusal("Viktor's older brother's name is Lars.")
    assert "no subject" in _refusal("Today's weather is nice.")
    assert "no subject" in _refusal("The colour of the sky is blue.")
    assert "no subject" in _refusal("The best friend of Anna Berg lives in Oslo.")
    assert "negations" in _refusal("Viktor's dog is not named Rex.")
    assert "hypotheticals" in _refusal("Viktor's dog might be named Rex.")


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...", "- "])
def test_empty_messages_are_refused(text: str) -> None:
    assert "empty" in _refusal(text)


def test_refusal_lists_each_distinct_reason_once() -> None:
    message = _refusal("Where is Oslo? Viktor never left. Anna does not drive.")
    assert "question" in message and "negations are not stored" in message
    assert message.count("negations") == 1


# ---------------------------------------------------------------- long and odd input


def test_overlong_sentence_is_refused_as_too_long() -> None:
    assert "too long" in _refusal("Viktor lives in " + "x" * 5000)
    assert "too long" in _refusal("Viktor lives in " + "very " * 30 + "big house.")


@pytest.mark.parametrize(
    "text",
    [
        "a" * 10**5,
        "Viktor lives in Oslo. " * 5000,
        " ".join(["Aa"] * 50_000),
        "(" * 10**5,
        "Dr. " * 25_000,
        ("and he " * 14_000)[:MAX_MESSAGE_CHARS],
    ],
)
def test_huge_inputs_are_refused_quickly(text: str) -> None:
    started = time.perf_counter()
    with pytest.raises(NotAFact):
        extract_facts(text)
    assert time.perf_counter() - started < 2.0


def test_control_characters_do_not_hide_a_fact() -> None:
    facts = extract_facts("\x00Viktor\u200b lives in\x07 Oslo\u2028Anna\u00a0plays\tthe harp.")
    assert [(f.subject, f.relation, f.object) for f in facts] == [
        ("Viktor", "lives in", "Oslo"),
        ("Anna", "plays the", "harp"),
    ]


def _check(text: str, last_subject: str | None = None) -> None:
    try:
        facts = extract_facts(text, last_subject)
    except NotAFact as refused:
        assert str(refused).startswith("Not stored:")
        return
    assert facts
    for fact in facts:
        for part in (fact.subject, fact.relation, fact.object):
            assert part and part == part.strip() and "\n" not in part
        assert 2 <= len(fact.questions) <= 4


@settings(max_examples=400, deadline=None)
@given(st.text(), st.one_of(st.none(), st.text()))
def test_arbitrary_text_returns_facts_or_raises_not_a_fact(
    text: str, last_subject: str | None
) -> None:
    _check(text, last_subject)


_VOCAB = [
    "Viktor",
    "Anna Berg",
    "He",
    "she",
    "They",
    "I",
    "I'm",
    "You",
    "My",
    "sister",
    "lives",
    "in",
    "Oslo",
    "works",
    "as",
    "a",
    "an",
    "the",
    "named",
    "dog",
    "has",
    "is",
    "was",
    "born",
    "not",
    "never",
    "might",
    "if",
    "and",
    "but",
    "?",
    ".",
    "!",
    ",",
    "'s",
    "Remember that",
    "FYI",
    "\x00",
    "\n",
    "\u200b",
    "Zoë",
    "van",
    "al-Sayed",
    "O'Brien",
    "Dr.",
    "Will",
    "May",
    "what",
    "does",
    "to",
    "up",
    "been",
    "named",
    "called",
    "Tell",
    "me",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(_VOCAB), max_size=25),
    st.sampled_from([None, "Kim", " K\nim\x00 "]),
)
def test_word_salad_from_the_grammar_vocabulary_never_crashes(
    words: list[str], last_subject: str | None
) -> None:
    _check(" ".join(words), last_subject)


# ---------------------------------------------------------------- questions


BENCH_QUESTIONS = {
    "lives in": ["Where does Viktor live?", "Which city is Viktor based in?"],
    "works as a": ["What does Viktor do for a living?", "What is Viktor's job?"],
    "works as an": ["What does Viktor do for a living?", "What is Viktor's job?"],
    "has a dog named": ["What is the name of Viktor's dog?", "What is Viktor's dog called?"],
    "plays the": ["Which instrument does Viktor play?", "What instrument does Viktor play?"],
    "was born in": ["Where was Viktor born?", "In which city was Viktor born?"],
    "is allergic to": ["What is Viktor allergic to?"],
}


@pytest.mark.parametrize(("relation", "expected"), sorted(BENCH_QUESTIONS.items()))
def test_known_relations_get_their_table_questions(relation: str, expected: list[str]) -> None:
    assert set(expected) <= set(questions_for("Viktor", relation))


@pytest.mark.parametrize(
    ("relation", "expected"),
    [
        ("likes", "What does Viktor like?"),
        ("watches", "What does Viktor watch?"),
        ("grew up in", "Where did Viktor grow up?"),
        ("is based in", "Where is Viktor based?"),
        ("has been living in", "Where has Viktor been living?"),
        ("has a cat named", "What is the name of Viktor's cat?"),
        ("moved to", "Viktor moved to what?"),
    ],
)
def test_unknown_relations_get_grammatical_generic_questions(relation: str, expected: str) -> None:
    assert expected in questions_for("Viktor", relation)


@pytest.mark.parametrize(
    ("statement", "first", "absent"),
    [
        ("Leocadia Brandt was born in 1987.", "When was Leocadia Brandt born?", "Where"),
        ("Ada Lind was born on 3 May 1990.", "When was Ada Lind born?", "Where"),
        ("Ada Lind retired in 2019.", "When did Ada Lind retire?", "Where"),
        ("Ada Lind married in June.", "When did Ada Lind marry?", "Where"),
        ("Anselm Vukovic moved to Halifax.", "Where did Anselm Vukovic move to?", None),
        ("Solveig Matuszak lives on Orkney.", "Where does Solveig Matuszak live?", None),
        ("Lena Ortiz works in Berlin.", "Where does Lena Ortiz work?", None),
        ("Lena Ortiz swims in the lake.", "Where does Lena Ortiz swim?", None),
        ("Lena Ortiz works in finance.", "What does Lena Ortiz work in?", "Where"),
        ("Lena Ortiz is interested in astronomy.", "What is Lena Ortiz interested in?", "Where"),
        ("Lena Ortiz is fluent in Basque.", "What is Lena Ortiz fluent in?", "Where"),
        ("Lena Ortiz listens to jazz.", "What does Lena Ortiz listen to?", "Where"),
        ("Lena Ortiz created a podcast.", "What did Lena Ortiz create?", None),
        ("Lena Ortiz stopped smoking.", "What did Lena Ortiz stop?", None),
    ],
)
def test_the_object_picks_the_question_word(statement: str, first: str, absent: str | None):
    """A date asks when, a place where, anything else what: "Where was Leocadia Brandt
    born?" would train the edit to answer a year to a question about a town."""
    questions = extract_facts(statement)[0].questions
    assert questions[0] == first
    assert absent is None or not any(q.startswith(absent) for q in questions)


RELATIONS = [
    *BENCH_QUESTIONS,
    "speaks",
    "works at",
    "studied",
    "drives a",
    "is from",
    "is married to",
    "is named",
    "likes",
    "grew up in",
    "moved to",
    "is a",
    "has",
    "has a cat named",
    "is based in",
    "",
]


@pytest.mark.parametrize("relation", RELATIONS)
def test_questions_and_paraphrases_are_disjoint_well_formed_sets(relation: str) -> None:
    questions = questions_for("Anna Berg", relation)
    paraphrases = paraphrases_for("Anna Berg", relation)
    assert 2 <= len(questions) <= 4
    assert paraphrases
    assert not set(questions) & set(paraphrases)
    for question in (*questions, *paraphrases):
        assert question.endswith("?") and "Anna Berg" in question
    assert len(set(questions)) == len(questions)


def test_questions_about_the_user_use_lowercase_mid_sentence() -> None:
    assert questions_for(USER_SUBJECT, "lives in")[0] == "Where does the user live?"
    assert "What is the user's name?" in questions_for(USER_SUBJECT, "is named")
