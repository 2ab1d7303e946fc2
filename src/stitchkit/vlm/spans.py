"""Vision-token spans: where each image's tokens sit in each tokenised sequence.

A span is the [start, end) range of one image's block, separator tokens included (LLaVA-OneVision's
image-newline feature is one of the image's own tokens; Qwen2-VL's <|vision_start|> and <|vision_end|>
are absorbed when they touch the block). Spans are always recomputed from the final input ids (after
pooling), and masking, pooling and attention analysis all read them: one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stitchkit.errors import IncompatibleError


@dataclass(frozen=True)
class ImageSpan:
    start: int  # first position of the block (a leading separator, if any)
    end: int  # one past the last position (a trailing separator, if any)
    tokens: tuple[int, int]  # [start, end) of the image's feature tokens (the image placeholder ids) only

    def __len__(self) -> int:
        return self.end - self.start


def find_image_spans(
    input_ids: torch.Tensor,
    image_token_id: int,
    images_per_row: list[int],
    tokens_per_image: list[int] | None = None,
    open_ids: frozenset[int] = frozenset(),
    close_ids: frozenset[int] = frozenset(),
) -> list[list[ImageSpan]]:
    """The spans of every row of `input_ids` (B, S).

    tokens_per_image: the number of placeholder tokens of every image of the batch, in order (row by row).
    With it, adjacent images (no text token between them) are still told apart; without it every maximal
    run of placeholder tokens is one image. A separator id in open_ids (close_ids) right before (after) a
    block joins the span.
    """
    ids = input_ids.tolist()
    counts = iter(tokens_per_image) if tokens_per_image is not None else None
    spans: list[list[ImageSpan]] = []
    for row, (tokens, n_images) in enumerate(zip(ids, images_per_row, strict=True)):
        positions = [i for i, t in enumerate(tokens) if t == image_token_id]
        blocks = _blocks_by_count(positions, counts, n_images, row) if counts else _runs(positions)
        if len(blocks) != n_images:
            raise IncompatibleError(
                f"row {row}: found {len(blocks)} image blocks in the tokens but the row has {n_images} images"
            )
        row_spans = []
        for start, end in blocks:
            outer_start = start - 1 if start > 0 and tokens[start - 1] in open_ids else start
            outer_end = end + 1 if end < len(tokens) and tokens[end] in close_ids else end
            row_spans.append(ImageSpan(outer_start, outer_end, (start, end)))
        spans.append(row_spans)
    return spans


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    blocks: list[tuple[int, int]] = []
    for p in positions:
        if blocks and blocks[-1][1] == p:
            blocks[-1] = (blocks[-1][0], p + 1)
        else:
            blocks.append((p, p + 1))
    return blocks


def _blocks_by_count(positions: list[int], counts, n_images: int, row: int) -> list[tuple[int, int]]:
    blocks, used = [], 0
    for _ in range(n_images):
        n = next(counts)
        chunk = positions[used : used + n]
        if len(chunk) != n or chunk[-1] - chunk[0] != n - 1:
            raise IncompatibleError(f"row {row}: the image placeholder tokens do not form blocks of {n} tokens")
        blocks.append((chunk[0], chunk[-1] + 1))
        used += n
    if used != len(positions):
        raise IncompatibleError(f"row {row}: {len(positions) - used} image placeholder tokens belong to no image")
    return blocks


def block_ids(spans: list[list[ImageSpan]], seq_len: int) -> torch.Tensor:
    """(B, S) long: j inside image j's span, -1 for text and padding."""
    ids = torch.full((len(spans), seq_len), -1, dtype=torch.long)
    for row, row_spans in enumerate(spans):
        for j, span in enumerate(row_spans):
            ids[row, span.start : span.end] = j
    return ids
