"""A word-level tokenizer for the shapes world's captions: no downloads, no tokenizer files.

The world's captions use a small closed vocabulary (categories, colours, sizes, positions, a few function
words), so one id per lower-cased word is enough. The vocabulary is saved as vocab.json next to the dual
encoder that was trained with it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stitchkit.errors import ModelNotFoundError
from stitchkit.runs import atomic_write_json

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
# CLIP's text tower treats eos_token_id == 2 as a legacy "argmax of ids" pooling rule; our EOS id must not be 2.
assert EOS_ID != 2


def split_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@dataclass(frozen=True)
class WordVocab:
    tokens: tuple[str, ...]  # SPECIAL_TOKENS first, then the words in sorted order

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "WordVocab":
        words = sorted({w for t in texts for w in split_words(t)})
        return cls(SPECIAL_TOKENS + tuple(words))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention_mask), both (N, length): <bos> words <eos> then <pad>; long captions are cut."""
        index = {tok: i for i, tok in enumerate(self.tokens)}
        ids = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, text in enumerate(texts):
            words = [index.get(w, UNK_ID) for w in split_words(text)][: length - 2]
            seq = [BOS_ID, *words, EOS_ID]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids, mask

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, {"tokens": list(self.tokens)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordVocab":
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"no vocabulary at {path}")
        return cls(tuple(json.loads(path.read_text())["tokens"]))
