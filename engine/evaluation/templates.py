"""Every prompt string of the evaluation, in one table.

A prompt is a header, one turn per demonstration (question and answer) and the query turn (the
question, the answer left for the model). Two templates:

- `seed`: the LLaVA v1 conversation the seed evaluation uses: the system prompt, then
  `USER: <image>\\n{body} ASSISTANT: {answer}</s>` per demonstration, and
  `USER: <image>\\n{body} ASSISTANT:` for the query (LLaVA's separators: a space after the system
  prompt and after each user message, `</s>` after each assistant message).
- `flamingo`: `<image>Question:{body} Short answer:{answer}` per demonstration, turns separated by
  a newline, for a base model that never saw a chat format.

The body depends on the task (`BODIES`): VQA adds the seed's single-word instruction; TextVQA
with OCR adds `Reference OCR token: t1, t2, ...` (the line is left out when a picture has no
tokens); ScienceQA writes the context (the problem's hint), the options as `A. text` lines and
the seed's letter instruction; math questions list their options as `(A) text` after `Choices:`.
The flamingo bodies keep everything on one line, since a newline ends a short answer.
A demonstration's answer is its reference: the most frequent of the annotators' answers for VQA
(first-listed on ties), the option letter for ScienceQA and choice math questions, the answer
otherwise. Every string here is pinned by tests/evaluation/test_templates.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from engine.evaluation.items import Item

SEED_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VQA_INSTRUCTION = "Answer the question using a single word or phrase."
SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Template:
    name: str
    header: str          # before the first turn
    demo: str            # one demonstration: {body}, {answer}
    query: str           # the question to answer: {body}
    separator: str       # between turns
    long_stop: tuple[str, ...]  # where a long (math) answer ends: the next turn's start


TEMPLATES = {
    "seed": Template("seed", header=SEED_SYSTEM + " ",
                     demo="USER: <image>\n{body} ASSISTANT: {answer}</s>",
                     query="USER: <image>\n{body} ASSISTANT:", separator="",
                     long_stop=("</s>", "USER:")),
    "flamingo": Template("flamingo", header="", demo="<image>Question:{body} Short answer:{answer}",
                         query="<image>Question:{body} Short answer:", separator="\n",
                         long_stop=("\n<image>", "<image>Question:")),
}

BODIES = {
    ("seed", "vqa"): "{question}\n" + VQA_INSTRUCTION,
    ("seed", "vqa_ocr"): "{question}\n{ocr}" + VQA_INSTRUCTION,
    ("seed", "scienceqa"): "{context}{question}\n{options}\n" + SQA_INSTRUCTION,
    ("seed", "math"): "{question}{options}",
    ("flamingo", "vqa"): "{question}",
    ("flamingo", "vqa_ocr"): "{question}{ocr}",
    ("flamingo", "scienceqa"): "{context}{question} {options}",
    ("flamingo", "math"): "{question}{options}",
}

# How the optional pieces are written, per template.
OCR_LINE = {"seed": "Reference OCR token: {tokens}\n", "flamingo": " Reference OCR token: {tokens}"}
CONTEXT = {"seed": "Context: {hint}\n", "flamingo": "Context: {hint} "}
SQA_OPTION = {"seed": ("{letter}. {text}", "\n"), "flamingo": ("({letter}) {text}", " ")}
MATH_OPTIONS = {"seed": ("\nChoices:\n", "({letter}) {text}", "\n"),
                "flamingo": (" Choices: ", "({letter}) {text}", " ")}


def body(template: str, task: str, item: Item) -> str:
    """The question part of a turn for `item`."""
    fields = {"question": item.question, "ocr": "", "context": "", "options": ""}
    if task == "vqa_ocr" and item.info.get("ocr_tokens"):
        fields["ocr"] = OCR_LINE[template].format(tokens=", ".join(item.info["ocr_tokens"]))
    if task == "scienceqa":
        if item.info.get("hint"):
            fields["context"] = CONTEXT[template].format(hint=item.info["hint"])
        fmt, sep = SQA_OPTION[template]
        fields["options"] = sep.join(fmt.format(letter=LETTERS[i], text=c) for i, c in enumerate(item.choices))
    if task == "math" and item.choices:
        lead, fmt, sep = MATH_OPTIONS[template]
        fields["options"] = lead + sep.join(fmt.format(letter=LETTERS[i], text=c)
                                            for i, c in enumerate(item.choices))
    return BODIES[(template, task)].format(**fields)


def demo_answer(task: str, item: Item) -> str:
    """The answer a demonstration shows."""
    if task in ("vqa", "vqa_ocr"):
        counts = Counter(item.answers)
        best = max(counts.values())
        return next(a for a in item.answers if counts[a] == best)
    ref = item.answers[0]
    if task == "math" and item.info.get("question_type") == "choice" and ref in item.choices:
        return LETTERS[item.choices.index(ref)]
    return ref


def build_prompt(template: str, task: str, demos: list[Item], query: Item) -> str:
    """The full prompt: header, demonstrations in the given order, then the query."""
    if template not in TEMPLATES:
        raise ValueError(f"--template: unknown template {template!r} (choose from {', '.join(TEMPLATES)})")
    t = TEMPLATES[template]
    turns = [t.demo.format(body=body(template, task, d), answer=demo_answer(task, d)) for d in demos]
    turns.append(t.query.format(body=body(template, task, query)))
    return t.header + t.separator.join(turns)


def stop_strings(template: str, task: str) -> tuple[str, ...]:
    """Short answers end at a newline; math answers at the next turn (EOS ends both)."""
    return TEMPLATES[template].long_stop if task == "math" else ("\n",)
