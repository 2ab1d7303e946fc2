"""Synthetic IDs (two letters + three digits, as the official code) and the first-token check.

The official evaluator ranks candidates by the logit of their *first* token only and aborts when two
candidates share one (visual_stitching.md §1.2, §4). So IDs are generated with pairwise-distinct first
letters (which keeps " ar413" and " fl346" apart under any tokenizer that keeps the space and the first
letter together) and then checked under the tokenizer actually used; a clash regenerates the IDs, and
user-given IDs that clash are refused with one clear error.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from stitchkit.errors import IncompatibleError, InputError

ID_PATTERN = re.compile(r"^[a-z]{2}[0-9]{3}$")
# Two-letter English words: an ID that starts with one would carry a prior meaning into its first token. The
# Scrabble dictionaries' two-letter words (NWL2020, and Collins' additions such as ch, ee, oo, zo) and common
# abbreviations (tv, uk, dr, ...): 142 of the 676 letter pairs; every first letter keeps at least 9 second letters.
COMMON_WORDS = frozenset(
    """aa ab ad ae ag ah ai al am an ar as at aw ax ay ba be bi bo by da de do ed ef eh el em en er es ew ex fa fe
    gi go ha he hi hm ho id if in is it jo ka ki la li lo ma me mi mm mo mu my na ne no nu od oe of oh oi ok om on
    op or os ow ox oy pa pe pi po qi re sh si so ta te ti to uh um un up us ut we wo xi xu ya ye yo za
    ch di ea ee fy gu io ja ko ky ny ob oo ou st ug ur yu ze zo
    bc cd dc dj dr eu fm hr ip mr ms pc pr tv uk vs""".split()
)
MAX_ATTEMPTS = 100


def _draw_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n IDs with distinct first letters (n <= 26): a seeded permutation of the alphabet, then a second
    letter and three digits each; two-letter words are redrawn."""
    letters = string.ascii_lowercase
    firsts = rng.permutation(len(letters))[:n]
    ids = []
    for first in firsts:
        while True:
            prefix = letters[first] + letters[int(rng.integers(len(letters)))]
            if prefix not in COMMON_WORDS:
                break
        ids.append(f"{prefix}{int(rng.integers(1000)):03d}")
    return ids


def first_tokens(tokenizer, candidates: Sequence[str]) -> list[int]:
    """The first token id of every candidate, tokenised alone without special tokens (as the official
    evaluator does, leading space included: pass " ar413", not "ar413")."""
    tokens = []
    for candidate in candidates:
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(f"candidate {candidate!r} tokenises to nothing")
        tokens.append(int(ids[0]))
    return tokens


def first_token_clashes(tokenizer, candidates: Sequence[str]) -> dict[str, list[str]]:
    """{first token text: [candidates]} for every first token shared by two or more candidates."""
    groups: dict[int, list[str]] = {}
    for candidate, token in zip(candidates, first_tokens(tokenizer, candidates)):
        groups.setdefault(token, []).append(candidate)
    return {tokenizer.convert_ids_to_tokens(t): c for t, c in groups.items() if len(c) > 1}


def check_first_tokens(tokenizer, candidates: Sequence[str]) -> None:
    """Refuse candidates whose first tokens are not pairwise distinct (the evaluator could not rank them)."""
    clashes = first_token_clashes(tokenizer, candidates)
    if clashes:
        listed = "; ".join(f"{token!r}: {', '.join(repr(c) for c in group)}" for token, group in clashes.items())
        raise IncompatibleError(
            f"candidates share a first token under this tokenizer, so first-token ranking cannot tell them apart: {listed}"
        )


def check_id_format(ids: Sequence[str]) -> None:
    bad = [i for i in ids if not ID_PATTERN.match(i)]
    if bad:
        raise InputError(f"IDs must be two lowercase letters and three digits (e.g. ar413); got {bad}")
    if len(set(ids)) != len(ids):
        raise InputError(f"IDs must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")


def generate_ids(n: int, seed: int, tokenizer=None, response: str = " {id}") -> list[str]:
    """n IDs (two letters + three digits) from `seed`, with distinct first letters and, if a tokenizer is
    given, distinct first tokens of `response.format(id=...)`; clashing draws are regenerated."""
    if not 1 <= n <= len(string.ascii_lowercase):
        raise InputError(f"IDs with distinct first letters allow 1 to 26 items, got {n}")
    rng = np.random.default_rng([seed, n])
    ids = _draw_ids(n, rng)
    for _ in range(MAX_ATTEMPTS - 1):
        if tokenizer is None or not first_token_clashes(tokenizer, [response.format(id=i) for i in ids]):
            return ids
        ids = _draw_ids(n, rng)
    check_first_tokens(tokenizer, [response.format(id=i) for i in ids])  # the last draw: returns or names the clash
    return ids
