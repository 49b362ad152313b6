"""Tokenizers, and how an interleaved document becomes one token stream.

A document is a list of *segments* in reading order: a text string, or ``None`` for an image.
Its token stream is built the way LLaVA's ``tokenizer_image_token`` builds one, without ever
putting the string ``"<image>"`` through the tokenizer (so a literal "<image>" or "</s>" inside
the text stays text):

1. Join the segments into a text the way the seed does (DAMO-NLP-SG/multimodal_textbook): text
   segments separated by one space, no space on either side of an image, one space between two
   consecutive images. Empty text segments are dropped. ``render_text`` returns that text with
   ``<image>`` marking the images, e.g. ``[None, "a", None, None, "b"] -> "<image>a<image> <image>b"``.
2. Split it at the images into chunks (``["", "a", " ", "b"]``) and encode each chunk on its own,
   as ``tokenizer(chunk)`` does in ``tokenizer_image_token``. SentencePiece therefore adds its
   dummy-prefix space at the start of *every* chunk: the text after an image is tokenized as if
   it started a line (``"a" -> "▁a"``), and the single space between two images becomes the
   token ``"▁▁"``. An empty chunk contributes nothing.
3. Stream = BOS, chunk 0, <image>, chunk 1, <image>, ..., last chunk, EOS. (In
   ``tokenizer_image_token`` every chunk carries its own BOS and all but the first are dropped.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    image_token_id: int

    def encode(self, text: str) -> list[int]: ...  # no BOS/EOS

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model file (LLaMA / Mistral family); `<image>` gets id `vocab_size`."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.model_path = str(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_path}: the model defines no BOS or EOS piece")
        # LLaMA models define no pad piece; LLaVA pads with <unk> (id 0), and so do we.
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
        self.image_token_id = self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if i != self.image_token_id])

    def __getstate__(self):  # the SentencePiece processor itself does not pickle
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


class HFTokenizer:
    """A Hugging Face tokenizer directory. `<image>` keeps its id if the tokenizer has one
    (llava-hf checkpoints), otherwise it gets the next free id, `len(tokenizer)`."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = str(path)
        self._tok = AutoTokenizer.from_pretrained(self.path)
        self.vocab_size = len(self._tok)
        self.bos_id, self.eos_id = self._tok.bos_token_id, self._tok.eos_token_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{path}: the tokenizer defines no BOS or EOS token")
        self.pad_id = next(i for i in (self._tok.pad_token_id, self._tok.unk_token_id, self.eos_id) if i is not None)
        image_id = self._tok.convert_tokens_to_ids("<image>")
        self.image_token_id = image_id if image_id is not None and image_id != self._tok.unk_token_id else self.vocab_size

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: text that spells a special token ("</s>", "<image>") stays text.
        return self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if i != self.image_token_id])

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def build_tokenizer(tokenizer_type: str, model_path: str | os.PathLike) -> Tokenizer:
    """`tokenizer_type` is ``sentencepiece`` (a .model file) or ``hf`` (a tokenizer directory)."""
    if tokenizer_type == "sentencepiece":
        return SentencePieceTokenizer(model_path)
    if tokenizer_type == "hf":
        return HFTokenizer(model_path)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose sentencepiece or hf")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer by its path alone: a directory is a Hugging Face tokenizer, a file a
    SentencePiece model."""
    return build_tokenizer("hf" if os.path.isdir(path) else "sentencepiece", path)


def _chunks(segments: Sequence[str | None]) -> list[str]:
    """The text between images (one more chunk than there are images), per the module docstring."""
    chunks, run, prev_image = [], [], False
    for seg in segments:
        if seg is None:
            chunks.append(" " if prev_image and not run else " ".join(run))
            run, prev_image = [], True
        elif seg:
            run.append(seg)
            prev_image = False
    chunks.append(" ".join(run))
    return chunks


def render_text(segments: Sequence[str | None], image_marker: str = "<image>") -> str:
    """The document as the seed's training text (without EOS), `image_marker` at each image."""
    return image_marker.join(_chunks(segments))


def encode_document(tokenizer: Tokenizer, segments: Sequence[str | None]) -> np.ndarray:
    """BOS, text tokens and one `image_token_id` per image, EOS (int64)."""
    ids = [tokenizer.bos_id]
    for k, chunk in enumerate(_chunks(segments)):
        if k:
            ids.append(tokenizer.image_token_id)
        if chunk:
            piece = tokenizer.encode(chunk)
            if tokenizer.image_token_id in piece:  # only possible with a tokenizer that parses "<image>"
                raise ValueError("the tokenizer produced the <image> id from plain text")
            ids.extend(piece)
    ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)
