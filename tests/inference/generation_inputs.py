"""Interleaved requests over the bundled photographs (examples/data/images)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = sorted(str(p) for p in (REPO / "examples" / "data" / "images").rglob("*.jpg"))

TEXTS = ["A lecture about animals.", "The figure shows", "Question: what is in the picture? Answer:",
         "In this chapter we study the sky.", "Look closely:", "Compare the two photographs.", "A cat",
         "Here is a rocket before launch.", "Notes on coffee and its history.", "Describe the scene."]


def interleaved_requests(n: int = 24):
    """n prompts of 0-3 images each, text before, between and after, different lengths."""
    from engine.inference import Request

    out = []
    for i in range(n):
        k = i % 4
        parts = [TEXTS[i % len(TEXTS)]]
        images = []
        for j in range(k):
            parts.append("<image>")
            parts.append(TEXTS[(i + j + 1) % len(TEXTS)] if (i + j) % 3 else "")
            images.append(IMAGES[(i * 3 + j) % len(IMAGES)])
        out.append(Request(id=f"r{i}", prompt=" ".join(parts), images=tuple(images)))
    return out
