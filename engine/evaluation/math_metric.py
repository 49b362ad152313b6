"""Rule-based answer extraction and comparison for MathVista, MathVision and MathVerse.

The published numbers for these benchmarks use a GPT model to extract the answer from the
output; that cannot run offline, so this metric is a fixed set of rules instead (deterministic:
the same output always gets the same score, on any machine). Scores from it are close to but
not the same as judge-extracted ones.

Rules, applied to the generated text:
1. The part after the last "answer is" / "answer:" (any case) is taken when present, else the
   whole text; surrounding whitespace, `$` and a trailing period are removed.
2. A choice question's answer is an option letter: a leading "A", "(A)", "A." or "A:"; or, when
   no letter leads, the option whose text the answer equals (ignoring case); no match is wrong.
   The reference is the option letter (MathVista stores the option's text; it is mapped).
3. A free-form question with a numeric reference compares numbers: the first number of the
   answer (thousands commas dropped, so the item's unit or any trailing word is stripped),
   against the reference, both rounded to the item's precision (MathVista's `precision`, else
   the number of decimals the reference is written with).
4. Any other free-form answer compares text: lower case, the item's unit, spaces, `$` and a
   trailing period removed.
"""

from __future__ import annotations

import re

from engine.evaluation.items import Item
from engine.evaluation.math_readers import choice_letter

LETTERS = "ABCDEFGHIJ"
_ANSWER_PART = re.compile(r"answer(?:\s+is|\s*:)\s*", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\(?([A-J])\)?(?:[.:)\s]|$)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def _answer_part(raw: str) -> str:
    parts = _ANSWER_PART.split(raw)
    text = parts[-1].strip()
    text = text.split("\n", 1)[0] if len(parts) > 1 else text
    return text.strip().strip("$").strip().rstrip(".").strip()


def _number(text: str) -> float | None:
    m = _NUMBER.search(re.sub(r"(\d),(\d{3})", r"\1\2", text))
    return float(m.group()) if m else None


def _decimals(reference: str, precision) -> int:
    if precision is not None:
        try:
            return int(float(precision))
        except (TypeError, ValueError):
            pass
    return len(reference.split(".", 1)[1]) if "." in reference else 0


def _text(s: str, unit: str) -> str:
    s = s.lower()
    if unit:
        s = s.replace(unit.lower(), "")
    return re.sub(r"[\s$]", "", s).rstrip(".")


def extract_answer(raw: str, item: Item) -> str:
    """The answer the rules read from the output ('' when none): a letter for choice questions."""
    text = _answer_part(raw)
    if item.info.get("question_type") == "choice":
        m = _LEADING_LETTER.match(text)
        if m and (not item.choices or LETTERS.index(m.group(1)) < len(item.choices)):
            return m.group(1)
        for i, choice in enumerate(item.choices):
            if text.lower() == choice.strip().lower():
                return LETTERS[i]
        return ""
    ref = item.answers[0]
    if _number(ref) is not None and _NUMBER.fullmatch(ref.strip().replace(",", "")):
        num = _number(text)
        return "" if num is None else repr(num)
    return text


def math_score(parsed: str, item: Item) -> float:
    """1.0 when the extracted answer matches the reference under the rules, else 0.0."""
    if not parsed:
        return 0.0
    ref = item.answers[0].strip()
    if item.info.get("question_type") == "choice":
        return 1.0 if parsed == choice_letter(item) else 0.0
    if _NUMBER.fullmatch(ref.replace(",", "")):
        try:
            pred = float(parsed)
        except ValueError:
            return 0.0
        digits = _decimals(ref, item.info.get("precision"))
        return 1.0 if round(pred, digits) == round(float(ref.replace(",", "")), digits) else 0.0
    unit = str(item.info.get("unit") or "")
    return 1.0 if _text(parsed, unit) == _text(ref, unit) else 0.0
