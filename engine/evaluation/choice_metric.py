"""ScienceQA letter accuracy, with the seed's parsing of the generated text.

The answer is, in order: the whole stripped output when it is one of the option letters; its
first character when the output starts with a letter followed by ". " (as in "B. the moon");
the letter of a single "The answer is X." in the output. Anything else is FAILED (wrong).
"""

from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
FAILED = "FAILED"


def parse_letter(raw: str, num_choices: int) -> str:
    options = LETTERS[:num_choices]
    pred = raw.strip()
    if pred in options and pred:
        return pred
    if len(pred) >= 3 and pred[0] in options and pred[1:3] == ". ":
        return pred[0]
    found = _ANSWER_IS.findall(pred)
    if len(found) == 1:
        return found[0]
    return FAILED


def letter_accuracy(parsed: str, reference: str) -> float:
    return 1.0 if parsed == reference else 0.0
