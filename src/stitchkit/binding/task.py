"""The indirect-retrieval task (binding.md §2): colour -> shape -> item, as token sequences.

One token per symbol. Text layout of an example with N objects (length 5N + 4):

    BOS  a_1 e_1 ... a_N e_N  CTX_END  e_p1 IS t_p1 ... e_pN IS t_pN  QUE a_q    ->  target t(e_q)

a_i colours and e_i shapes of the context (the i-th object), p a uniform permutation (the associations are in
an order independent of the context, or ordinal lookup would also solve the second hop), t(e) the item of shape
e. Colours, shapes and items are distinct within an example. The image version replaces `a_1 e_1 ... a_N e_N`
by the image's tokens (IMG placeholders, filled with projected encoder features); associations and query stay
text. Grounding examples ask for the shape of a colour or the colour of a shape in the image.

Noise (§5): filler tokens that nothing attends to but that consume positions equal deleting them and leaving
gaps in `position_ids`, so noise is encoded as gaps: `gaps[k]` positions are skipped before context slot k
(k = 0..2N, slot 2N is CTX_END).

Every example comes from its own generator seeded by (seed, split, N, index), so any example of any split can be
regenerated alone, and splits never share a stream.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stitchkit.errors import ConfigError

SPECIALS = ("PAD", "BOS", "CTX_END", "QUE", "IS", "IMG", "GND_C2S", "GND_S2C")
PAD, BOS, CTX_END, QUE, IS, IMG, GND_C2S, GND_S2C = range(len(SPECIALS))


@dataclass(frozen=True)
class Vocabulary:
    """Token ids: the specials, then C0..C{colours-1}, S0..S{shapes-1}, T0..T{items-1}."""

    colours: int
    shapes: int
    items: int

    def colour(self, i) -> int:
        return len(SPECIALS) + i

    def shape(self, j) -> int:
        return len(SPECIALS) + self.colours + j

    def item(self, t) -> int:
        return len(SPECIALS) + self.colours + self.shapes + t

    @property
    def size(self) -> int:
        return len(SPECIALS) + self.colours + self.shapes + self.items

    @property
    def max_objects(self) -> int:
        return min(self.colours, self.shapes, self.items)

    def names(self) -> list[str]:
        return (
            list(SPECIALS)
            + [f"C{i}" for i in range(self.colours)]
            + [f"S{j}" for j in range(self.shapes)]
            + [f"T{t}" for t in range(self.items)]
        )


@dataclass(frozen=True)
class Example:
    """One context of N objects: object i has colour colours[i] and shape shapes[i]; shape shapes[i] is
    associated with item items[i]. Associations are listed in `order` (a permutation of 0..N-1); the query asks
    for object `query`'s colour."""

    colours: tuple[int, ...]
    shapes: tuple[int, ...]
    items: tuple[int, ...]
    order: tuple[int, ...]
    query: int

    @property
    def n(self) -> int:
        return len(self.colours)

    @property
    def answer(self) -> int:
        return self.items[self.query]

    def item_of_shape(self, shape: int) -> int:
        return self.items[self.shapes.index(shape)]


@dataclass
class Encoded:
    """A token sequence and where everything sits in it (indices into input_ids)."""

    input_ids: list[int]
    position_ids: list[int]
    target: int  # the answer's token id, predicted at the last position
    colour_pos: list[int]  # a_i (text contexts only)
    shape_pos: list[int]  # e_i (text contexts only)
    assoc_shape_pos: list[int]  # the shape token of the association of object i
    assoc_item_pos: list[int]  # the item token of the association of object i
    image_pos: list[int]  # IMG placeholders (image contexts only)

    @property
    def query_pos(self) -> int:
        return len(self.input_ids) - 1


SPLITS = ("train", "eval", "probe", "interventions", "images", "eval_images", "gate")


def example_rng(seed: int, split: str, n: int, index: int) -> np.random.Generator:
    """The generator of one example: independent of every other (seed, split, N, index)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), n, index])


def check_objects(n: int, vocab: Vocabulary, colour_pool: int | None = None, shape_pool: int | None = None) -> None:
    limit = min(colour_pool or vocab.colours, shape_pool or vocab.shapes, vocab.items)
    if not 1 <= n <= limit:
        raise ConfigError(f"contexts of {n} objects need {n} distinct colours, shapes and items; this vocabulary has {limit}")


def sample_example(
    rng: np.random.Generator, n: int, vocab: Vocabulary, colour_pool: int | None = None, shape_pool: int | None = None
) -> Example:
    """N objects with distinct colours (from the first `colour_pool` colours), distinct shapes and distinct items;
    a uniform association order and a uniform query."""
    check_objects(n, vocab, colour_pool, shape_pool)
    colours = rng.choice(colour_pool or vocab.colours, size=n, replace=False)
    shapes = rng.choice(shape_pool or vocab.shapes, size=n, replace=False)
    items = rng.choice(vocab.items, size=n, replace=False)
    order = rng.permutation(n)
    query = int(rng.integers(n))
    as_tuple = lambda a: tuple(int(v) for v in a)  # noqa: E731
    return Example(as_tuple(colours), as_tuple(shapes), as_tuple(items), as_tuple(order), query)


def noise_room(span: int, n: int) -> int:
    """The most noise positions a context of N objects gets: K ~ U{0..span - 2N} (§5), none once 2N >= span."""
    return max(span - 2 * n, 0)


def noise_warning(span: int, largest: int) -> str | None:
    """A warning when the noise can hardly move positions: at the largest trained context the gaps add at most
    noise_room positions, and below the context's own 2N tokens a positional shortcut survives them (the paper's
    span 196 leaves 180 at N = 8; the micro encoders' 16 tokens leave 4 at N = 6)."""
    room = noise_room(span, largest)
    if room >= 2 * largest:
        return None
    return (f"noise span {span}: at N = {largest} (the largest trained context) the noise adds at most {room} positions, "
            f"fewer than the context's own {2 * largest} tokens, so it hardly shifts positions; set noise.span to "
            f"{4 * largest} or more for noise that does")


def noise_gaps(rng: np.random.Generator, n: int, span: int, between_pairs_only: bool = False) -> list[int]:
    """How many positions to skip before each of the 2N + 1 context slots: K ~ U{0..span - 2N} in total, spread
    as a uniformly random composition (§5). between_pairs_only: gaps only before a colour (never inside a pair)."""
    total = int(rng.integers(0, noise_room(span, n) + 1))
    slots = list(range(0, 2 * n + 1, 2)) if between_pairs_only else list(range(2 * n + 1))
    # A uniform composition of `total` into len(slots) parts: choose the bar positions among total + parts - 1.
    bars = np.sort(rng.choice(total + len(slots) - 1, size=len(slots) - 1, replace=False))
    parts = np.diff(np.concatenate([[-1], bars, [total + len(slots) - 1]])) - 1
    gaps = [0] * (2 * n + 1)
    for slot, count in zip(slots, parts):
        gaps[slot] = int(count)
    return gaps


def _tail(ex: Example, vocab: Vocabulary, ids: list[int], positions: list[int]) -> tuple[list[int], list[int]]:
    """Append associations, QUE and the query colour; returns the positions of association shapes and items
    (indexed by object)."""
    shape_at, item_at = [0] * ex.n, [0] * ex.n
    for i in ex.order:
        shape_at[i] = len(ids)
        item_at[i] = len(ids) + 2
        ids += [vocab.shape(ex.shapes[i]), IS, vocab.item(ex.items[i])]
    ids += [QUE, vocab.colour(ex.colours[ex.query])]
    positions += list(range(positions[-1] + 1, positions[-1] + 1 + 3 * ex.n + 2))
    return shape_at, item_at


def encode_text(ex: Example, vocab: Vocabulary, gaps: list[int] | None = None) -> Encoded:
    gaps = gaps or [0] * (2 * ex.n + 1)
    ids, positions = [BOS], [0]
    colour_pos, shape_pos = [], []
    for i in range(ex.n):
        for slot, (token, where) in enumerate(((vocab.colour(ex.colours[i]), colour_pos), (vocab.shape(ex.shapes[i]), shape_pos))):
            where.append(len(ids))
            positions.append(positions[-1] + 1 + gaps[2 * i + slot])
            ids.append(token)
    positions.append(positions[-1] + 1 + gaps[2 * ex.n])
    ids.append(CTX_END)
    shape_at, item_at = _tail(ex, vocab, ids, positions)
    return Encoded(ids, positions, vocab.item(ex.answer), colour_pos, shape_pos, shape_at, item_at, [])


def encode_hop(ex: Example, vocab: Vocabulary, hop: Literal[1, 2], gaps: list[int] | None = None) -> Encoded:
    """One hop of the task alone on a text context, for hop practice (Stage.hop_practice, off by default):
    hop 1 asks the query colour's shape in the context, `BOS a1 e1 .. aN eN QUE a_q -> e_q` (no associations);
    hop 2 asks the query shape's item, the task's sequence ending `QUE e_q -> t_q`."""
    task = encode_text(ex, vocab, gaps)
    if hop == 2:
        return dataclasses.replace(task, input_ids=task.input_ids[:-1] + [vocab.shape(ex.shapes[ex.query])])
    end = task.input_ids.index(CTX_END)  # QUE takes CTX_END's place
    ids = task.input_ids[:end] + [QUE, vocab.colour(ex.colours[ex.query])]
    positions = task.position_ids[: end + 1] + [task.position_ids[end] + 1]
    return Encoded(ids, positions, vocab.shape(ex.shapes[ex.query]), task.colour_pos, task.shape_pos, [], [], [])


def encode_image(ex: Example, vocab: Vocabulary, image_tokens: int) -> Encoded:
    """BOS, the image's tokens (IMG placeholders at consecutive positions, raster order), CTX_END, associations, query."""
    ids = [BOS] + [IMG] * image_tokens + [CTX_END]
    positions = list(range(len(ids)))
    shape_at, item_at = _tail(ex, vocab, ids, positions)
    return Encoded(ids, positions, vocab.item(ex.answer), [], [], shape_at, item_at, list(range(1, 1 + image_tokens)))


def encode_grounding(ex: Example, vocab: Vocabulary, image_tokens: int, obj: int, colour_to_shape: bool) -> Encoded:
    """The grounding auxiliary task (§3): `BOS [img] CTX_END GND_C2S a_j -> e_j`, or `GND_S2C e_j -> a_j`."""
    if colour_to_shape:
        tail, target = [GND_C2S, vocab.colour(ex.colours[obj])], vocab.shape(ex.shapes[obj])
    else:
        tail, target = [GND_S2C, vocab.shape(ex.shapes[obj])], vocab.colour(ex.colours[obj])
    ids = [BOS] + [IMG] * image_tokens + [CTX_END] + tail
    return Encoded(ids, list(range(len(ids))), target, [], [], [], [], list(range(1, 1 + image_tokens)))


def with_noise(enc: Encoded, filler: int = PAD) -> tuple[list[int], list[int], list[bool]]:
    """The explicit form of a gapped sequence: a filler token in every skipped position. Returns (input_ids,
    position_ids, is_real); used to check that gaps equal unattendable fillers."""
    ids, positions, real = [], [], []
    expected = 0
    for token, position in zip(enc.input_ids, enc.position_ids):
        while expected < position:
            ids.append(filler)
            positions.append(expected)
            real.append(False)
            expected += 1
        ids.append(token)
        positions.append(position)
        real.append(True)
        expected = position + 1
    return ids, positions, real


def replace(ex: Example, **changes) -> Example:
    return dataclasses.replace(ex, **changes)
