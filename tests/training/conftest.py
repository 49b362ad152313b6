"""A small real dataset for the training tests: real photographs (scikit-image's bundled
samples), real text tokenized with the real LLaMA-family tokenizer, written with the engine's
own dataset writer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.config import IMAGE_TOKEN_ID
from engine.data.format import IndexedDatasetWriter
from engine.data.images import encode_jpeg, preprocess
from engine.data.tokenizer import SentencePieceTokenizer, encode_document

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "colorwheel", "camera", "moon", "horse", "clock", "coins"]

# Lecture-style passages in the spirit of the Multimodal Textbook corpus (keyframe, transcript).
TEXTS = [
    "In today's lecture we look at how a camera turns light into a picture.",
    "The lens gathers light from every point of the scene and focuses it onto the sensor, where "
    "each pixel counts the photons that arrive during the exposure.",
    "Notice how the colours in this photograph are stored as three numbers per pixel: red, green "
    "and blue. Mixing them in different amounts gives every colour we can see on a screen.",
    "A cup of coffee is a good example of a mixture. Water extracts oils, acids and caffeine from "
    "the ground beans, and the temperature of the water changes how much of each dissolves.",
    "Cats are crepuscular animals, which means they are most active at dawn and dusk. Their eyes "
    "have a reflective layer that helps them see when there is very little light.",
    "A rocket moves forward because it pushes exhaust gas backward. This is Newton's third law: "
    "for every action there is an equal and opposite reaction.",
    "The Hubble Space Telescope took this image by pointing at a tiny, dark patch of sky for many "
    "days. Almost every spot of light you see is a galaxy containing billions of stars.",
    "Under the microscope, stained tissue shows the cells and the structures between them. The "
    "brown colour marks where a particular protein is present.",
    "The colour wheel arranges hues in a circle so that complementary colours sit opposite each "
    "other. Painters use it to choose colours that contrast or harmonise.",
    "Let us review what we learned. Light enters through the lens, the sensor measures it, and "
    "the computer stores the measurements as numbers that we can process and display.",
    "The surface of the Moon is covered with craters left by impacts over billions of years. "
    "Because there is no wind or rain, the craters stay sharp for a very long time.",
    "A pendulum clock keeps time because the period of a swing depends only on the length of the "
    "pendulum and on gravity, not on how far it swings.",
    "Coins are made by pressing a blank metal disc between two dies. The pressure is so high that "
    "the metal flows into every detail of the design.",
    "Horses can sleep standing up thanks to a system of tendons and ligaments that locks their "
    "legs in place, so their muscles can relax without the animal falling over.",
]


def _photo(name: str) -> bytes:
    import skimage.data

    arr = getattr(skimage.data, name)()
    img = Image.fromarray(arr).convert("RGB")
    return encode_jpeg(preprocess(img, 336))


def write_dataset(prefix, tokenizer_model: str, num_docs: int = 16, seed: int = 0) -> str:
    """Documents of 1-3 images between 1-3 passages each; returns the prefix."""
    tok = SentencePieceTokenizer(tokenizer_model)
    assert tok.image_token_id == IMAGE_TOKEN_ID
    photos = {name: _photo(name) for name in PHOTOS}
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, image_token_id=IMAGE_TOKEN_ID, image_size=336) as writer:
        for d in range(num_docs):
            segments, images = [], []
            if d % 3 == 0:  # some documents start with text (no loss before the first image)
                segments.append(TEXTS[rng.integers(len(TEXTS))])
            for _ in range(1 + d % 2):
                name = PHOTOS[rng.integers(len(PHOTOS))]
                segments.append(None)
                images.append(photos[name])
                for _ in range(1 + rng.integers(3)):
                    segments.append(TEXTS[rng.integers(len(TEXTS))])
            writer.add_document(encode_document(tok, segments), images)
    return str(prefix)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tokenizer_model) -> str:
    return write_dataset(tmp_path_factory.mktemp("data") / "sample", tokenizer_model)
