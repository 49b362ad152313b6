"""Every prompt string, pinned: a change here changes every score."""

from engine.evaluation.items import Item
from engine.evaluation.templates import build_prompt, demo_answer, stop_strings

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions.")

VQA_DEMO = Item("1", "What animal is this?", "a.jpg", "a", ("dog", "cat", "cat", "dog", "cat"))
VQA_QUERY = Item("2", "What color is the bus?", "b.jpg", "b", ("red",))
OCR_QUERY = Item("3", "what brand is this?", "c.jpg", "c", ("nikon",), info={"ocr_tokens": ("nikon", "d90")})
OCR_NONE = Item("4", "what does it say?", "d.jpg", "d", ("stop",), info={"ocr_tokens": ()})
SQA = Item("5", "Which is a mammal?", "e.png", "e", ("B",), ("frog", "whale"), info={"hint": "Animals live here."})
SQA_NOHINT = Item("6", "Which is hot?", "f.png", "f", ("A",), ("sun", "ice"), info={"hint": ""})
MATH_CHOICE = Item("7", "Find x.", "g.jpg", "g", ("5",), ("3", "5"), info={"question_type": "choice"})
MATH_FREE = Item("8", "Find y.", "h.jpg", "h", ("2.5",), info={"question_type": "free"})


def test_seed_vqa_zero_and_two_shot():
    assert build_prompt("seed", "vqa", [], VQA_QUERY) == (
        SYSTEM + " USER: <image>\nWhat color is the bus?\nAnswer the question using a single word or phrase."
        " ASSISTANT:")
    assert build_prompt("seed", "vqa", [VQA_DEMO, VQA_DEMO], VQA_QUERY) == (
        SYSTEM + " USER: <image>\nWhat animal is this?\nAnswer the question using a single word or phrase."
        " ASSISTANT: cat</s>USER: <image>\nWhat animal is this?\nAnswer the question using a single word or phrase."
        " ASSISTANT: cat</s>USER: <image>\nWhat color is the bus?\nAnswer the question using a single word or"
        " phrase. ASSISTANT:")


def test_seed_textvqa_ocr():
    assert build_prompt("seed", "vqa_ocr", [], OCR_QUERY) == (
        SYSTEM + " USER: <image>\nwhat brand is this?\nReference OCR token: nikon, d90\n"
        "Answer the question using a single word or phrase. ASSISTANT:")
    assert build_prompt("seed", "vqa_ocr", [], OCR_NONE) == (
        SYSTEM + " USER: <image>\nwhat does it say?\nAnswer the question using a single word or phrase. ASSISTANT:")
    # without OCR the same question reads as plain VQA
    assert build_prompt("seed", "vqa", [], OCR_QUERY).count("Reference OCR token") == 0


def test_seed_scienceqa():
    assert build_prompt("seed", "scienceqa", [SQA_NOHINT], SQA) == (
        SYSTEM + " USER: <image>\nWhich is hot?\nA. sun\nB. ice\n"
        "Answer with the option's letter from the given choices directly. ASSISTANT: A</s>"
        "USER: <image>\nContext: Animals live here.\nWhich is a mammal?\nA. frog\nB. whale\n"
        "Answer with the option's letter from the given choices directly. ASSISTANT:")


def test_seed_math():
    assert build_prompt("seed", "math", [MATH_FREE], MATH_CHOICE) == (
        SYSTEM + " USER: <image>\nFind y. ASSISTANT: 2.5</s>USER: <image>\nFind x.\nChoices:\n(A) 3\n(B) 5 ASSISTANT:")


def test_flamingo():
    assert build_prompt("flamingo", "vqa", [VQA_DEMO], VQA_QUERY) == (
        "<image>Question:What animal is this? Short answer:cat\n<image>Question:What color is the bus? Short answer:")
    assert build_prompt("flamingo", "vqa_ocr", [], OCR_QUERY) == (
        "<image>Question:what brand is this? Reference OCR token: nikon, d90 Short answer:")
    assert build_prompt("flamingo", "scienceqa", [], SQA) == (
        "<image>Question:Context: Animals live here. Which is a mammal? (A) frog (B) whale Short answer:")
    assert build_prompt("flamingo", "math", [MATH_CHOICE], MATH_FREE) == (
        "<image>Question:Find x. Choices: (A) 3 (B) 5 Short answer:B\n<image>Question:Find y. Short answer:")


def test_demo_answers_and_stops():
    assert demo_answer("vqa", Item("1", "q", None, "k", ("a", "b", "b", "a"))) == "a"  # tie: first listed
    assert demo_answer("math", MATH_CHOICE) == "B"  # MathVista's option text becomes its letter
    assert demo_answer("scienceqa", SQA) == "B"
    assert stop_strings("seed", "vqa") == ("\n",) and stop_strings("flamingo", "scienceqa") == ("\n",)
    assert stop_strings("seed", "math") == ("</s>", "USER:")
    assert stop_strings("flamingo", "math") == ("\n<image>", "<image>Question:")


def test_one_marker_per_image():
    prompt = build_prompt("seed", "vqa", [VQA_DEMO] * 4, VQA_QUERY)
    assert prompt.count("<image>") == 5
