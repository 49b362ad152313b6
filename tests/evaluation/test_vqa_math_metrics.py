"""Metrics on hand-computed cases."""

import pytest

from engine.evaluation.choice_metric import FAILED, parse_letter
from engine.evaluation.items import Item
from engine.evaluation.math_metric import extract_answer, math_score
from engine.evaluation.vqa_metric import normalize_answer, parse_short_answer, vqa_accuracy


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_matching_annotators(matches, expected):
    answers = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_normalisation():
    assert normalize_answer("The Cat.") == "cat"
    assert normalize_answer("two dogs") == "2 dogs"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("1,000") == "1000"          # a thousands comma: punctuation removed
    assert normalize_answer("black/white") == "black white"
    assert normalize_answer("yes , sir") == "yes sir"
    assert normalize_answer("an\tapple\n") == "apple"
    # normalisation applies to the references too: "a cat" x3 counts as "cat"
    assert vqa_accuracy("Cat!", ["a cat", "the cat", "cat"] + ["dog"] * 7) == pytest.approx(0.9)


def test_short_answer_parsing():
    assert parse_short_answer("  red\nThe bus is red.") == "red"


def test_scienceqa_letters():
    assert parse_letter("B", 3) == "B"
    assert parse_letter(" C. the moon", 3) == "C"
    assert parse_letter("I think The answer is A.", 3) == "A"
    assert parse_letter("D", 3) == FAILED           # not an option of a 3-choice question
    assert parse_letter("banana", 3) == FAILED
    assert parse_letter("The answer is A. The answer is B.", 3) == FAILED


CHOICE = Item("1", "q", None, "k", ("5",), ("3", "5", "7"), info={"question_type": "choice"})
LETTER = Item("2", "q", None, "k", ("C",), ("1", "2", "3", "4", "5"), info={"question_type": "choice"})
VERSE = Item("3", "q", None, "k", ("B",), info={"question_type": "choice"})
FLOAT = Item("4", "q", None, "k", ("2.5",), info={"question_type": "free", "unit": "cm", "precision": 1.0})
INT = Item("5", "q", None, "k", ("12",), info={"question_type": "free", "precision": None})
PREC2 = Item("6", "q", None, "k", ("1.25",), info={"question_type": "free", "precision": 2.0})
TEXT = Item("7", "q", None, "k", ("2\\sqrt{3}",), info={"question_type": "free", "unit": ""})


@pytest.mark.parametrize("item,raw,parsed,score", [
    (CHOICE, "B", "B", 1.0),
    (CHOICE, "(A) 3", "A", 0.0),
    (CHOICE, "5", "B", 1.0),                   # the option's text
    (CHOICE, "The answer is B.", "B", 1.0),
    (CHOICE, "seven", "", 0.0),
    (LETTER, "C", "C", 1.0),
    (VERSE, "B: 60", "B", 1.0),
    (FLOAT, "2.5 cm", "2.5", 1.0),             # unit stripped
    (FLOAT, "2.54", "2.54", 1.0),              # compared at one decimal
    (FLOAT, "2.6", "2.6", 0.0),
    (INT, "12.0", "12.0", 1.0),
    (INT, "There are 1,2 squares", "1.0", 0.0),
    (INT, "so the answer is 12 squares", "12.0", 1.0),
    (PREC2, "1.249", "1.249", 1.0),
    (PREC2, "1.2", "1.2", 0.0),
    (TEXT, "$2\\sqrt{3}$", "2\\sqrt{3}", 1.0),
    (TEXT, "", "", 0.0),
])
def test_math_rules(item, raw, parsed, score):
    got = extract_answer(raw, item)
    assert got == parsed
    assert math_score(got, item) == score
