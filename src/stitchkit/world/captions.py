"""Captions: "two red stars and a blue circle".

Objects are grouped by (colour, category) in order of first appearance; a group of one takes an article, larger
groups a number word and the plural. The vocabulary is closed (ontology names, number words, "a", "an", "and"),
so a tiny word-level tokenizer covers every caption.
"""

from __future__ import annotations

from collections import Counter

from stitchkit.world.scene import Scene

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]
EMPTY_CAPTION = "nothing"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_phrases(phrases: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    groups = Counter((o.colour.name, o.category) for o in scene.objects)  # insertion-ordered
    phrases = []
    for (colour, category), count in groups.items():
        if count == 1:
            phrases.append(f"{article(colour)} {colour} {category.name}")
        else:
            phrases.append(f"{number_word(count)} {colour} {category.plural}")
    return join_phrases(phrases) or EMPTY_CAPTION
