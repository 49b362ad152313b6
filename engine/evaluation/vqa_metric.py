"""VQA accuracy with the official answer normalisation.

Accuracy of a prediction against the 10 annotators' answers: for each of the 10 subsets that
leave one annotator out, min(1, matches / 3) where matches counts the subset's answers equal to
the prediction; the mean over the subsets. A prediction given by 1, 2, 3 or at least 4
annotators scores 0.3, 0.6, 0.9 or 1.0.

Both the prediction and the answers are normalised first, by the rules of the VQA evaluation
(as its EvalAI answer processor applies them to every answer): lower case; newlines and tabs to
spaces; punctuation removed, or turned into a space where it joins two words, unless it sits
next to a space or the answer holds a number with a thousands comma; a period removed unless
it is a decimal point; number words zero to ten as digits; the articles a, an, the dropped;
contractions missing their apostrophe restored (dont -> don't).
"""

from __future__ import annotations

import re

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_THOUSANDS = re.compile(r"(\d)(,)(\d)")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've "
    "it'll let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock "
    "oughtn't shan't she'd she'd've she'll she's should've shouldn't shouldn't've somebody'd "
    "somebody'll somebody's someone'd someone'll someone's something'd something'll that's "
    "there'd there're there's they'd they'll they're they've 'twas wasn't we'd we'll we're we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'll who's "
    "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd y'all'll "
    "you'd you'll you're you've"
).split()
CONTRACTIONS = {w.replace("'", ""): w for w in _CONTRACTED}


def _punctuation(text: str) -> str:
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _THOUSANDS.search(text):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    return _PERIOD.sub("", text)


def _words(text: str) -> str:
    out = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        out.append(CONTRACTIONS.get(word, word))
    return " ".join(out)


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _words(_punctuation(text))


def vqa_accuracy(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """Mean over the leave-one-out subsets of min(1, matches / 3)."""
    if not answers:
        raise ValueError("vqa_accuracy: no reference answers")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    total = 0.0
    for i in range(len(refs)):
        matches = sum(1 for j, r in enumerate(refs) if j != i and r == pred)
        total += min(1.0, matches / 3)
    return total / len(refs)


def parse_short_answer(raw: str) -> str:
    """A short answer is the generated text up to its first newline, stripped."""
    return raw.split("\n", 1)[0].strip()
