"""The binding suite: task, image version, model plumbing, curricula, interventions, probes, knockouts, CLI."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stitchkit.binding.config import BindingConfig, NoiseSettings
from stitchkit.binding.data import ExampleStream, StreamSpec, as_sample, collate
from stitchkit.binding.interventions import (
    LABELS,
    OUTCOMES,
    correct_pairs,
    make_pair,
    patch_outcomes,
    run_interventions,
    sample_pairs,
    symbolic_positional_ratio,
)
from stitchkit.binding.knockouts import edges, run_knockouts
from stitchkit.binding.model import BindingModel, ModelSettings, answer_loss, load_binding_model, save_binding_model
from stitchkit.binding.probes import binding_signature, collect, probe_layers
from stitchkit.binding.render import BACKGROUND, Placement, glyph_set, render_context
from stitchkit.binding.subjects import TokenSubject, WordSubject, capture_residuals, forward_patched
from stitchkit.binding.task import (
    BOS,
    CTX_END,
    IMG,
    IS,
    QUE,
    Vocabulary,
    encode_grounding,
    encode_image,
    encode_text,
    example_rng,
    noise_gaps,
    sample_example,
    with_noise,
)
from stitchkit.cli import main
from stitchkit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = Vocabulary(12, 12, 12)
TINY = ModelSettings(layers=2, hidden=32, heads=2, ffn=64, max_positions=256, projector_hidden=16)


def parse_and_answer(ids: list[int], vocab: Vocabulary) -> int:
    """An independent reading of a text sequence: colour -> shape from the context, shape -> item from the
    associations, then look up the query colour. Returns the answer's token id."""
    assert ids[0] == BOS
    end = ids.index(CTX_END)
    context = ids[1:end]
    colour_to_shape = dict(zip(context[0::2], context[1::2]))
    que = ids.index(QUE)
    assoc = ids[end + 1 : que]
    shape_to_item = {assoc[k]: assoc[k + 2] for k in range(0, len(assoc), 3) if assoc[k + 1] == IS}
    return shape_to_item[colour_to_shape[ids[que + 1]]]


def report_table(text: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the markdown table in `text` whose header starts with `first_column`, as {column: cell}."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    header, rows = split(lines[start]), []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, split(line))))
    return rows


def tiny_model(seed: int = 0, encoder_dim: int | None = None) -> BindingModel:
    torch.manual_seed(seed)
    return BindingModel(TINY, VOCAB, encoder_dim).eval()


def context_model(seed: int = 1) -> BindingModel:
    """A tiny model whose answers depend on the context. At random init the last token's own embedding dominates,
    so every intervention is reflexive; sharper, larger attention gives the four outcomes at the inner layers.
    About 1 pair in 70 is answered right on both sides, so 1600 candidates give ~20 pairs."""
    model = tiny_model(seed)
    with torch.no_grad():
        for layer in model.lm.model.layers:
            layer.self_attn.o_proj.weight.mul_(10)
            layer.self_attn.q_proj.weight.mul_(3)
            layer.self_attn.k_proj.weight.mul_(3)
    return model


# ---- task -----------------------------------------------------------------------------------------------


def test_every_answer_is_recomputed_from_the_tokens():
    for n in range(1, 13):
        for i in range(20):
            ex = sample_example(example_rng(3, "eval", n, i), n, VOCAB)
            enc = encode_text(ex, VOCAB)
            assert len(enc.input_ids) == 5 * n + 4
            assert parse_and_answer(enc.input_ids, VOCAB) == enc.target
            assert len(set(ex.colours)) == len(set(ex.shapes)) == len(set(ex.items)) == n
            assert [enc.input_ids[p] for p in enc.colour_pos] == [VOCAB.colour(c) for c in ex.colours]


def test_examples_are_deterministic_per_seed_and_split():
    a = sample_example(example_rng(0, "train", 5, 7), 5, VOCAB)
    assert a == sample_example(example_rng(0, "train", 5, 7), 5, VOCAB)
    others = [sample_example(example_rng(*key), 5, VOCAB) for key in [(1, "train", 5, 7), (0, "eval", 5, 7), (0, "train", 5, 8)]]
    assert all(o != a for o in others)


def test_training_streams_never_contain_ood_contexts():
    spec = StreamSpec(0.0, True, 40, False, 0.0)
    stream = ExampleStream(spec, 400, 0, "train/seed0/S1", VOCAB, (1, 6), None)
    sizes = {sum(1 for t in stream[i]["input_ids"] if VOCAB.colour(0) <= t < VOCAB.shape(0)) - 1 for i in range(400)}
    assert sizes == set(range(1, 7))  # context colours = N (the query colour excluded): 1..6, never more


def test_hop_practice_asks_each_hop_alone_and_leaves_the_rest_of_the_stream_unchanged():
    plain = ExampleStream(StreamSpec(0.0, True, 40, False, 0.0), 400, 0, "train/seed0/S1", VOCAB, (1, 6), None)
    practice = ExampleStream(StreamSpec(0.0, True, 40, False, 0.0, hop_practice=0.5), 400, 0, "train/seed0/S1", VOCAB, (1, 6), None)
    shapes = {VOCAB.shape(k) for k in range(VOCAB.shapes)}
    hops = {1: 0, 2: 0}
    for i in range(400):
        sample, ids, task = practice[i], practice[i]["input_ids"], plain[i]["input_ids"]
        if CTX_END not in ids:  # hop 1: the task's context, then QUE and the query colour -> its shape
            que = ids.index(QUE)
            assert que == len(ids) - 2 and ids[:que] == task[: task.index(CTX_END)]
            assert sample["target"] == dict(zip(ids[1:que:2], ids[2:que:2]))[ids[-1]]
            hops[1] += 1
        elif ids[-1] in shapes:  # hop 2: the task's sequence queried by a shape -> its item
            assert ids[:-1] == task[:-1]
            assoc = ids[ids.index(CTX_END) + 1 : ids.index(QUE)]
            assert sample["target"] == {assoc[k]: assoc[k + 2] for k in range(0, len(assoc), 3)}[ids[-1]]
            hops[2] += 1
        else:
            assert sample == plain[i] and parse_and_answer(ids, VOCAB) == sample["target"]
    assert 60 <= hops[1] <= 140 and 60 <= hops[2] <= 140  # half the examples, the hops with equal odds


def test_noise_gaps_shift_positions_but_not_tokens():
    rng = np.random.default_rng(0)
    for n in (1, 4, 8):
        gaps = noise_gaps(rng, n, 40)
        assert len(gaps) == 2 * n + 1 and 0 <= sum(gaps) <= 40 - 2 * n
        ex = sample_example(rng, n, VOCAB)
        plain, noisy = encode_text(ex, VOCAB), encode_text(ex, VOCAB, gaps)
        assert plain.input_ids == noisy.input_ids
        assert noisy.position_ids[-1] == plain.position_ids[-1] + sum(gaps)
        pairs_only = noise_gaps(rng, n, 40, between_pairs_only=True)
        assert all(g == 0 for g in pairs_only[1::2])


def test_the_noise_room_is_what_the_gaps_can_add_and_a_small_one_is_warned_about():
    """D9: K ~ U{0..span - 2N}: the most any draw adds is span - 2N (none once 2N >= span); a span that leaves the
    largest trained context fewer gap positions than its own 2N tokens is warned about, the paper's is not."""
    from stitchkit.binding.task import noise_room, noise_warning

    rng = np.random.default_rng(0)
    for span, n, most in ((16, 6, 4), (16, 8, 0), (40, 8, 24)):
        assert max(sum(noise_gaps(rng, n, span)) for _ in range(400)) == most == noise_room(span, n)
    assert noise_warning(196, 8) is None and noise_warning(24, 6) is None  # 12 positions for a 12-token context
    warning = noise_warning(16, 6)
    assert "at most 4 positions" in warning and "noise.span" in warning


def test_filler_tokens_receive_no_attention_yet_shift_positions():
    """Noise as position gaps equals explicit filler tokens that no query may attend to (masked as keys)."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    ex = sample_example(rng, 5, VOCAB)
    enc = encode_text(ex, VOCAB, [0, 3, 0, 2, 1, 0, 0, 4, 0, 0, 2])
    gapped = model.run(torch.tensor([enc.input_ids]), position_ids=torch.tensor([enc.position_ids])).logits
    ids, positions, real = with_noise(enc)
    explicit = model.run(
        torch.tensor([ids]), position_ids=torch.tensor([positions]), attention_mask=torch.tensor([real], dtype=torch.long)
    ).logits
    torch.testing.assert_close(gapped[0], explicit[0, torch.tensor(real)], rtol=1e-5, atol=1e-5)
    no_gaps = model.run(torch.tensor([enc.input_ids])).logits
    assert not torch.allclose(no_gaps, gapped, atol=1e-4)  # the positions do matter


# ---- image version ----------------------------------------------------------------------------------------


def colour_pixels(pixels: np.ndarray, rgb) -> np.ndarray:
    """(y, x) of the pixels within 3 levels of `rgb`."""
    return np.argwhere(np.abs(pixels.astype(int) - np.asarray(rgb)).sum(-1) <= 3)


@pytest.mark.parametrize("kind", ["world", "parametric"])
def test_rendered_objects_sit_in_distinct_cells_with_their_colours(kind):
    glyphs = glyph_set(kind)
    rng = np.random.default_rng(0)
    colours, shapes = [0, 3, 5, 7], [1, 2, 4, 6]
    image, places = render_context(colours, shapes, glyphs, 64, rng, Placement("grid", cells=4))
    pixels = np.asarray(image)
    cells = [int(y // 16) * 4 + int(x // 16) for x, y, _ in places]
    assert len(set(cells)) == 4
    for colour, cell in zip(colours, cells):
        row, col = divmod(cell, 4)
        block = pixels[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16].reshape(-1, 3)
        assert (np.abs(block.astype(int) - glyphs.colours[colour]).sum(1) <= 3).sum() >= 20
    empty = [c for c in range(16) if c not in cells]
    row, col = divmod(empty[0], 4)
    assert (pixels[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] == BACKGROUND).all()
    if kind == "parametric":
        assert glyphs.renderable == (216, 216)
        assert len({g[0].shape[0] for g in glyphs.outlines}) > 1


def test_grid_objects_stay_inside_their_cells_up_to_the_largest_fill(tmp_path, capsys):
    """D3: objects are drawn at fill x U(0.9, 1.1) of their cell; at the largest fill allowed each still lies
    inside its own cell (its pixels there, nowhere else), and a larger fill is a config error naming images.fill."""
    from stitchkit.binding.render import MAX_FILL

    glyphs, rng = glyph_set("world"), np.random.default_rng(0)
    placement = Placement("grid", cells=4, fill=MAX_FILL)
    for _ in range(50):
        colours = [int(c) for c in rng.choice(10, size=6, replace=False)]
        image, places = render_context(colours, list(range(6)), glyphs, 64, rng, placement)
        pixels = np.asarray(image)
        for colour, (x, y, r) in zip(colours, places):
            cell_x, cell_y = int(x // 16), int(y // 16)
            assert cell_x * 16 <= x - r + 1e-6 and x + r <= (cell_x + 1) * 16 + 1e-6
            assert cell_y * 16 <= y - r + 1e-6 and y + r <= (cell_y + 1) * 16 + 1e-6
            found = colour_pixels(pixels, glyphs.colours[colour])
            assert len(found) and ((found // 16) == [cell_y, cell_x]).all()
    with pytest.raises(ValueError, match="fill"):
        Placement("grid", fill=1.0)
    for fill in (1.0, 0.95):
        config = tmp_path / "fill.yaml"
        config.write_text(yaml.safe_dump({"images": {"fill": fill}}))
        with pytest.raises(SystemExit) as done:
            main(["binding", "run", str(config), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert done.value.code == 2 and "images.fill: fill" in err and "0.909" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_uniform_placement_is_the_specs():
    """§3: box side ~ U[28, 40] px at 224, centres anywhere, boxes >= 4 px apart and inside the canvas; every
    object's pixels lie inside its box, and positions are not tied to the patch grid."""
    glyphs, rng = glyph_set("parametric"), np.random.default_rng(0)
    placement = Placement("uniform")
    sides, offsets = [], []
    for _ in range(40):
        colours = [int(c) for c in rng.choice(216, size=8, replace=False)]
        image, places = render_context(colours, list(range(8)), glyphs, 224, rng, placement)
        pixels = np.asarray(image)
        for i, (x, y, r) in enumerate(places):
            assert r <= x <= 224 - r and r <= y <= 224 - r
            for x2, y2, r2 in places[i + 1 :]:
                assert max(abs(x - x2), abs(y - y2)) >= r + r2 + 4 - 1e-9
            found = colour_pixels(pixels, glyphs.colours[colours[i]])
            assert len(found) and (np.abs(found - [y, x]) <= r + 1).all()  # +1: antialiased edge
            sides.append(2 * r)
            offsets.append(x % 16)
    assert 28 <= min(sides) and max(sides) <= 40 and max(sides) - min(sides) > 10
    assert len({int(o) for o in offsets}) == 16  # centres fall anywhere within a 16 px patch
    with pytest.raises(ValueError, match="do not fit"):
        render_context(list(range(20)), list(range(20)), glyphs, 224, rng, placement)


def glyph_coverage(outline: np.ndarray, side: int) -> np.ndarray:
    """An outline filled inside a side x side box, drawn at 4x and box-downsampled: ink per pixel in [0, 1]."""
    from PIL import Image, ImageDraw

    big = side * 4
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon((outline * big / 2 + big / 2).ravel().tolist(), fill=255)
    return np.asarray(canvas.resize((side, side), Image.Resampling.BOX), dtype=np.float64).ravel() / 255


def ink_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The share of two glyphs' ink that differs, sum |a - b| / sum max(a, b), of `a` against each row of `b`."""
    return np.abs(a - b).sum(-1) / np.maximum(a, b).sum(-1)


def test_parametric_silhouettes_are_all_distinct():
    """All 216 silhouettes, on the spec's mid box side (34 px), differ pairwise in more than 3% of their ink.
    Measured: the spec's stars that draw their polygon (k = 3 at .5, k = 5 at .8) differed from it by 0.4-1.8%;
    after their substitution the closest pair is two octagons 7.5 degrees apart (4.3%); triangle vs square 42%."""
    from stitchkit.world.render import regular_outline, star_outline

    ink = np.stack([glyph_coverage(outer, 34) for outer, _ in glyph_set("parametric").outlines])
    closest = min(ink_difference(ink[i], ink[i + 1 :]).min() for i in range(len(ink) - 1))
    assert closest > 0.03
    assert ink_difference(ink[0], ink[1:2])[0] > 0.3  # shape 0 is the triangle, 1 the square
    triangle_star = glyph_coverage(star_outline(3, 0.5, start_deg=-90.0), 34)  # what the spec's list would draw
    assert ink_difference(triangle_star, glyph_coverage(regular_outline(3), 34)[None])[0] < 0.03


class PixelPatchEncoder:
    """A stand-in encoder: each 4 x 4 pixel patch, flattened, is a token, after one prefix token far from any
    pixel value; it records the batches it is given and how many images had been rendered by then."""

    image_size, patch, num_prefix_tokens = 16, 4, 1

    def __init__(self, rendered: list):
        self.rendered, self.batches = rendered, []

    def preprocess(self, images) -> torch.Tensor:
        self.batches.append((len(images), len(self.rendered)))
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images]))

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        b, grid, p = len(pixels), self.image_size // self.patch, self.patch
        tokens = pixels.reshape(b, grid, p, grid, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, grid * grid, p * p * 3)
        out = tokens.new_full((b, 1 + grid * grid, p * p * 3), 1000.0)
        out[:, 1:] = tokens
        return out


def test_the_separability_gate_pools_batch_by_batch(monkeypatch):
    """F1: single-object images are rendered as the encoder takes them and mean-pooled per batch, so no token
    tensor of more than one batch is ever joined; the pooled features equal each image's own patch mean."""
    from stitchkit.binding import experiment

    cfg = BindingConfig.model_validate({"vocab": {"colours": 3, "shapes": 2, "items": 8}, "train_objects": [1, 2],
                                        "eval": {"max_objects": 2}, "images": {"gate_images": 3}})  # fmt: skip
    rendered, real_render = [], experiment.render_context

    def render(*args, **kwargs):
        rendered.append(args[:2])
        return real_render(*args, **kwargs)

    real_cat, real_stack = torch.cat, torch.stack

    def joined(real):
        def guarded(tensors, *args, **kwargs):
            assert all(t.dim() < 3 for t in tensors), "token tensors (B, T, D) were joined"
            return real(tensors, *args, **kwargs)

        return guarded

    monkeypatch.setattr(experiment, "render_context", render)
    monkeypatch.setattr(torch, "cat", joined(real_cat))
    monkeypatch.setattr(torch, "stack", joined(real_stack))
    encoder = PixelPatchEncoder(rendered)
    pooled, labels = experiment.gate_features(encoder, cfg.vocab.vocabulary, cfg, seed=5, batch_size=4)
    assert [size for size, _ in encoder.batches] == [4, 4, 4, 4, 2]
    assert [seen for _, seen in encoder.batches] == [4, 8, 12, 16, 18]  # rendered just before their batch
    assert labels.tolist() == [[c, s] for c in range(3) for s in range(2) for _ in range(3)]
    expected = []  # each image alone: the mean over its 4 x 4 grid of patches, in (row, column, channel) order
    for c, s, k in itertools.product(range(3), range(2), range(3)):
        image, _ = real_render([c], [s], glyph_set("world"), 16, example_rng(5, "gate", c * 2 + s, k), cfg.images.layout)
        expected.append(np.asarray(image, dtype=np.float64).reshape(4, 4, 4, 4, 3).mean(axis=(0, 2)).ravel() / 255)
    np.testing.assert_allclose(pooled.numpy(), np.stack(expected), atol=1e-5)
    gate = experiment.separability_gate(encoder, cfg.vocab.vocabulary, cfg, seed=5, batch_size=4)
    assert {k: gate[k] for k in ("colours", "shapes", "images")} == {"colours": 3, "shapes": 2, "images": 18}
    assert 0 <= gate["colour_accuracy"] <= 1 and 0 <= gate["shape_accuracy"] <= 1


def test_image_tokens_replace_the_placeholders_in_order():
    model = tiny_model(encoder_dim=8)
    model.image_bank = torch.randn(3, 4, 8)
    ex = sample_example(example_rng(0, "x", 3, 0), 3, VOCAB)
    image, grounding = encode_image(ex, VOCAB, 4), encode_grounding(ex, VOCAB, 4, obj=1, colour_to_shape=True)
    assert image.input_ids[1:5] == [IMG] * 4 and image.input_ids[5] == CTX_END
    assert grounding.target == VOCAB.shape(ex.shapes[1]) and grounding.input_ids[-1] == VOCAB.colour(ex.colours[1])
    batch = collate([as_sample(image, 2), as_sample(grounding, 0)])
    ids = batch["input_ids"]
    embeds = model.embed(ids, batch["image_index"])
    torch.testing.assert_close(embeds[0, 1:5], model.projector(model.image_bank[2]))
    torch.testing.assert_close(embeds[1, 1:5], model.projector(model.image_bank[0]))
    torch.testing.assert_close(embeds[0, 5:], model.lm.get_input_embeddings()(ids[0, 5:]))


def test_projector_trains_and_model_round_trips(tmp_path):
    model = tiny_model(encoder_dim=8)
    model.image_bank = torch.randn(5, 4, 8)
    bank = type("Bank", (), {"colours": [(0, 1)] * 5, "shapes": [(2, 3)] * 5, "tokens": 4, "__len__": lambda self: 5})()
    stream = ExampleStream(StreamSpec(1.0, False, 8, False, 0.5), 16, 0, "s", VOCAB, (1, 2), bank)
    loss, metrics = answer_loss(model, collate([stream[i] for i in range(16)]))
    loss.backward()
    assert model.projector[0].weight.grad.abs().sum() > 0 and 0 <= metrics["accuracy"] <= 1
    save_binding_model(model, tmp_path / "m")
    loaded, meta = load_binding_model(tmp_path / "m")
    assert meta["encoder_dim"] == 8
    ids = torch.tensor([encode_text(sample_example(example_rng(0, "x", 4, 0), 4, VOCAB), VOCAB).input_ids])
    torch.testing.assert_close(loaded.run(ids).logits, model.run(ids).logits)


# ---- interventions ------------------------------------------------------------------------------------------


def test_counterfactual_pairs_change_only_what_the_construction_says():
    for i in range(50):
        rng = example_rng(0, "interventions", 8, i)
        pair = make_pair(rng, sample_example(rng, 8, VOCAB))
        q = pair.orig.query
        assert len({q, pair.q2, pair.r, pair.s}) == 4  # r != s enforced
        labels = pair.labels
        assert len(set(labels.values())) == len(LABELS)  # each mechanism predicts a different answer
        assert pair.cf.answer == labels["reflexive"]
        orig, cf = encode_text(pair.orig, VOCAB), encode_text(pair.cf, VOCAB)
        changed = {k for k, (a, b) in enumerate(zip(orig.input_ids, cf.input_ids)) if a != b}
        expected = {orig.colour_pos[pair.q2], orig.colour_pos[pair.r], orig.shape_pos[pair.q2], orig.shape_pos[pair.s], orig.query_pos}
        assert changed == expected
        # The cf query colour is the original's colour r: a symbolic lookup in the original finds shape r.
        assert cf.input_ids[-1] == orig.input_ids[orig.colour_pos[pair.r]]
        assert pair.classify(labels["symbolic"]) == "symbolic"
        assert pair.classify(next(t for t in range(VOCAB.items) if t not in labels.values())) == "mixed"


def test_patching_layer_zero_is_swapping_the_query_token_and_resid_post_is_the_cf_output():
    model = tiny_model(seed=2)
    subject = TokenSubject(model, VOCAB)
    pairs = sample_pairs(6, 4, 0, subject)
    orig = torch.tensor([subject.encode(p.orig) for p in pairs])
    cf = torch.tensor([subject.encode(p.cf) for p in pairs])
    residuals, cf_logits = capture_residuals(subject, cf)
    assert len(residuals) == TINY.layers + 1
    swapped = orig.clone()
    swapped[:, -1] = cf[:, -1]
    torch.testing.assert_close(forward_patched(subject, orig, 0, residuals[0][:, -1]), subject.forward(swapped)[:, -1])
    torch.testing.assert_close(forward_patched(subject, orig, TINY.layers, residuals[-1][:, -1]), cf_logits)


def test_interventions_report_shares_per_layer():
    result = run_interventions(TokenSubject(tiny_model(), VOCAB), n=4, pairs=5, seed=0)
    assert len(result["layers"]) == TINY.layers + 1 and result["layers"][-1]["site"] == "resid_post"
    for row in result["layers"]:
        shares = [row[o] for o in (*LABELS, "mixed")]
        assert result["pairs"] == 0 or sum(shares) == pytest.approx(1.0)
    assert symbolic_positional_ratio(0.5, 0.0, 100) == pytest.approx(50.0)


def fake_run(branch: str, pairs: int, requested: int, ratio: float, seed: int = 0) -> dict:
    """A run record of results.json with what the mechanism table reads: interventions at N = 6 on a 2-layer model
    whose R at the last block's input (layer 1) is `ratio`."""
    shares = {o: 0.0 for o in OUTCOMES}
    layers = [{"layer": layer, **shares, "ratio": ratio if layer == 1 else 0.0} for layer in range(3)]
    inter = {"n": 6, "pairs": pairs, "requested": requested, "candidates": 4 * requested, "layers": layers}
    probes = {"accuracy": {"bound": [0.1] * 3, "previous": [0.1] * 3}, "signature": {"present": False, "strength": 0.0}}
    return {"seed": seed, "branch": branch, "encoder": None, "stages": [{"id": 0.5, "ood": 0.1, "ood_far": None}],
            "analysis": {"interventions": {"6": inter}, "probes": {"6": probes}, "knockouts": {"windows": []}}}  # fmt: skip


def test_mechanisms_over_too_few_pairs_are_not_reported(monkeypatch):
    """D2: shares over fewer than MIN_PAIRS pairs (or all that were asked for) are shown as "n/a (k of M pairs)",
    left out of the mean R and of the mechanism figure's panels, and one warning line names the runs; a model with
    no positional or symbolic effect at any layer has no peak layer (an argmax over zeros would name layer 1)."""
    from stitchkit.binding import report
    from stitchkit.binding.experiment import aggregate
    from stitchkit.binding.interventions import MIN_PAIRS, enough_pairs, peak_layer

    assert MIN_PAIRS == 20
    assert enough_pairs({"pairs": 20, "requested": 200}) and not enough_pairs({"pairs": 19, "requested": 200})
    assert enough_pairs({"pairs": 4, "requested": 4}) and not enough_pairs({"pairs": 3, "requested": 4})
    zeros = [{"layer": layer, "positional": 0.0, "symbolic": 0.0} for layer in (1, 2, 3)]
    assert peak_layer(zeros) is None
    assert peak_layer([*zeros[:2], {"layer": 3, "positional": 0.1, "symbolic": 0.0}]) == 3

    runs = [fake_run("text-only", 0, 200, 0.0), fake_run("image-text", 1, 200, 0.0), fake_run("image-text", 150, 200, 2.5, seed=1)]
    table = aggregate(runs, ["text-only", "image-text"])
    assert table["text-only"]["ratio_last_block"] is None and table["image-text"]["ratio_last_block"] == 2.5  # not (0 + 2.5) / 2
    results = {"table": table, "runs": runs, "train_objects": [1, 6], "vocab": {"colours": 12}}
    rows = {r["branch"]: r for r in report.table_rows(results, {"text-only": ["S1"], "image-text": ["S1", "S2", "S3"]})}
    assert rows["text-only"]["R (last block)"] == "n/a (0 of 200 pairs)"
    assert rows["image-text"]["R (last block)"] == "2.50 (1 of 2 runs left out: too few pairs)"
    mechanisms = {r["seed"] + 10 * (r["branch"] == "image-text"): r for r in report.analysis_rows(results, "6")}
    assert mechanisms[0]["R per layer"] == "n/a (0 of 200 pairs)" and mechanisms[0]["sym@0 %"] == "n/a"
    assert mechanisms[11]["R per layer"] == "2.5"
    warning = report.not_learned_line(results, "6")
    assert "text-only (seed 0) 0 of 800" in warning and "image-text (seed 0) 1 of 800" in warning and "seed 1" not in warning
    assert "have not learned the task at that N" in warning

    drawn = {}
    monkeypatch.setattr(report, "outcome_figure", lambda path, panels, title: drawn.update(panels))
    report.mechanism_figure(Path("unused.png"), results, "6")
    kept = [{"layer": row["layer"], **{o: row[o] for o in OUTCOMES}} for row in runs[2]["analysis"]["interventions"]["6"]["layers"]]
    assert drawn == {"text-only\n(0 of 200 pairs)": None, "image-text\n(1, 150 of 200 pairs; 1 of 2 runs left out)": kept}


# ---- probes and knockouts -----------------------------------------------------------------------------------


def test_a_probe_finds_a_planted_feature_only_where_it_is():
    rng = np.random.default_rng(0)
    examples, n, layers, dim = 200, 4, 3, 16
    labels = torch.tensor(rng.integers(0, 6, size=examples * n))
    shape = torch.tensor(rng.normal(size=(examples * n, layers, dim)), dtype=torch.float32)
    shape[:, 2, :6] += 4 * torch.nn.functional.one_hot(labels, 6)  # the bound colour is planted at layer 2 only
    features = {
        "shape": shape,
        "query": torch.randn(examples, layers, dim),
        "labels": {"bound": labels, "previous": torch.tensor(rng.integers(0, 6, size=examples * n)), "index": torch.arange(examples * n) % n,
                   "query_shape": torch.tensor(rng.integers(0, 6, size=examples)), "query_index": torch.tensor(rng.integers(0, n, size=examples))},
        "owner": torch.arange(examples).repeat_interleave(n),
        "examples": examples,
    }  # fmt: skip
    acc = probe_layers(features)["bound"]
    assert acc[2] > 0.95 and max(acc[0], acc[1]) < 0.35
    signature = binding_signature([0.1, 0.15, 0.9, 0.9], [0.1, 0.12, 0.15, 0.14])
    assert signature["present"] and signature["surge_layer"] == 2
    assert not binding_signature([0.1, 0.15, 0.9, 0.9], [0.1, 0.5, 0.9, 0.9])["present"]  # control rises too
    gradual = binding_signature([0.0, 0.16, 0.32, 0.48, 0.64, 0.8, 0.8], [0.05] * 7)  # strong, but no surge
    assert gradual["strength"] == pytest.approx(0.8) and not gradual["present"]
    assert binding_signature([0.0, 0.1, 0.45, 0.6, 0.7], [0.05] * 5)["present"]  # one step of 0.35


def test_the_probe_control_is_the_previous_pairs_colour():
    """The control must be visible to a causal model at e_i: a_{i-1}, never a_{i+1}."""
    subject = TokenSubject(tiny_model(seed=0), VOCAB)
    features = collect(subject, 4, 3, seed=0)
    exs = [sample_example(example_rng(0, "probe", 4, i), 4, VOCAB) for i in range(3)]
    assert features["labels"]["previous"].tolist() == [c for ex in exs for c in (-1, *ex.colours[:-1])]
    assert features["labels"]["bound"].tolist() == [c for ex in exs for c in ex.colours]


def test_knocking_out_keys_everywhere_equals_masking_them():
    """Edges to a key from every query in every layer = the key masked out by the attention mask (HF's own)."""
    from stitchkit.binding.knockouts import AttentionKnockout
    from stitchkit.vlm.attention import install_attention

    model = tiny_model(seed=3)
    enc = encode_text(sample_example(example_rng(0, "k", 5, 0), 5, VOCAB), VOCAB)
    ids = torch.tensor([enc.input_ids])
    dense = model.run(ids).logits
    install_attention(model.lm)
    torch.testing.assert_close(model.run(ids).logits, dense)  # installed but idle: unchanged
    hidden = torch.tensor(enc.colour_pos[1:3])
    blocked = torch.zeros(1, len(enc.input_ids), len(enc.input_ids), dtype=torch.bool)
    blocked[0, :, hidden] = True
    blocked[0, hidden, hidden] = False  # a token keeps itself (as padding keys do for their own row in HF's mask)
    knocked = model.run(ids, attention_knockout=AttentionKnockout(frozenset(range(TINY.layers)), blocked)).logits
    mask = torch.ones_like(ids)
    mask[0, hidden] = 0
    masked = model.run(ids, attention_mask=mask).logits
    keep = torch.ones(len(enc.input_ids), dtype=torch.bool)
    keep[hidden] = False
    torch.testing.assert_close(knocked[0, keep], masked[0, keep], rtol=1e-5, atol=1e-5)
    assert edges(enc, "K4") == list(zip(enc.shape_pos, enc.colour_pos))
    result = run_knockouts(model, n=5, examples=8, seed=0, window=1, sets=("K1", "K4"), pairs=8)
    assert len(result["windows"]) == 2 * TINY.layers


@pytest.mark.parametrize("label_layer", [None, 0])
def test_knockout_labels_with_no_edge_blocked_are_the_interventions_labels(monkeypatch, label_layer):
    """Oracle: run_interventions without a knockout, every layer patched. An empty edge set sends every forward
    through the knockout's attention path (explicit mask) yet must classify every pair the same way."""
    import stitchkit.binding.knockouts as knockouts

    model = context_model()
    oracle = run_interventions(TokenSubject(model, VOCAB), n=4, pairs=400, seed=0)
    monkeypatch.setattr(knockouts, "edges", lambda enc, name: [])
    result = run_knockouts(model, n=4, examples=8, seed=0, window=1, sets=("K1",), pairs=400, label_layer=label_layer)
    layer = TINY.layers - 1 if label_layer is None else label_layer
    expected = {o: oracle["layers"][layer][o] for o in OUTCOMES}
    assert result["label_layer"] == layer and result["pairs"] == oracle["pairs"] >= 5
    assert result["labels_baseline"] == expected and sum(1 for v in expected.values() if v) >= 2  # not one trivial outcome
    for window in result["windows"]:
        assert window["labels"] == expected
        assert window["labels_delta"] == {o: 0.0 for o in OUTCOMES} and window["delta"] == 0.0


def test_isolating_the_query_makes_the_patched_prediction_independent_of_the_layer():
    """Block every edge from the query position (but to itself) in every layer: its residual stream then depends
    on its own token alone, in the cf and in the patched original, so patching at any layer gives the cf's
    (knocked-out) output and every layer classifies every pair alike. Unmodified, the layers differ."""
    from stitchkit.vlm.attention import AttentionKnockout, install_attention

    model = context_model()
    subject = TokenSubject(model, VOCAB)
    install_attention(model.lm)
    pairs, _, _ = correct_pairs(subject, n=4, pairs=400, seed=0)
    length = len(subject.encode(pairs[0].orig))
    blocked = torch.zeros(len(pairs), length, length, dtype=torch.bool)
    blocked[:, -1, :-1] = True
    isolated = AttentionKnockout(frozenset(range(TINY.layers)), blocked)

    orig = torch.tensor([subject.encode(p.orig) for p in pairs])
    cf = torch.tensor([subject.encode(p.cf) for p in pairs])
    residuals, cf_logits = capture_residuals(subject, cf, attention_knockout=isolated)
    for site in range(TINY.layers + 1):
        torch.testing.assert_close(forward_patched(subject, orig, site, residuals[site][:, -1], attention_knockout=isolated), cf_logits)

    outcomes = lambda rows: [tuple(row[o] for o in OUTCOMES) for row in rows]  # noqa: E731
    knocked = outcomes(patch_outcomes(subject, pairs, range(TINY.layers + 1), isolated, batch_size=8))  # batches slice the mask
    unmodified = outcomes(patch_outcomes(subject, pairs, range(TINY.layers + 1)))
    assert len(pairs) >= 5 and len(set(knocked)) == 1 and len(set(unmodified)) > 1


# ---- pretrained models through word prompts ---------------------------------------------------------------------


def test_word_prompts_run_on_a_hugging_face_causal_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stitchkit.binding.subjects import COLOUR_WORDS, ITEM_WORDS, SHAPE_WORDS
    from stitchkit.vlm.tokenizer import word_tokenizer

    words = [*COLOUR_WORDS, *SHAPE_WORDS, *ITEM_WORDS, "objects", "items", "the", "has", "question", "item", "of", "shape", "that", "is"]
    tokenizer = word_tokenizer(words)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")  # fmt: skip
    subject = WordSubject(Qwen2ForCausalLM(config).eval(), tokenizer)
    ex = sample_example(example_rng(0, "w", 4, 0), 4, subject.vocab)
    ids = subject.encode(ex)
    assert ids[-1] == tokenizer.convert_tokens_to_ids(subject.colour_words[ex.colours[ex.query]])
    assert [ids[p] for p in subject.shape_positions(ex)] == tokenizer.convert_tokens_to_ids([subject.shape_words[s] for s in ex.shapes])
    result = run_interventions(subject, n=4, pairs=4, seed=0)
    assert len(result["layers"]) == 3

    # --chat-template: the same prompt inside the user turn of the model's template, the query colour still last
    from stitchkit.vlm.tokenizer import CHAT_SPECIAL_TOKENS, chat_template

    chat_tokenizer = word_tokenizer([*words, "user"], CHAT_SPECIAL_TOKENS, chat_template=chat_template("<image>"))
    chat_model = Qwen2ForCausalLM(config.__class__(**{**config.to_dict(), "vocab_size": len(chat_tokenizer)})).eval()
    chat = WordSubject(chat_model, chat_tokenizer, chat_template=True)
    header = chat_tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
    chat_ids = chat.encode(ex)
    words_of = lambda tok, seq: tok.convert_ids_to_tokens(seq)  # noqa: E731  (the two vocabularies number words apart)
    assert chat_ids[: len(header)] == header
    assert words_of(chat_tokenizer, chat_ids[len(header) :]) == words_of(tokenizer, ids[len(ids) - len(chat_ids) + len(header) :])
    assert words_of(chat_tokenizer, [chat_ids[p] for p in chat.shape_positions(ex)]) == [subject.shape_words[e] for e in ex.shapes]
    assert words_of(chat_tokenizer, chat_ids[-1:]) == [chat.colour_words[ex.colours[ex.query]]]
    assert len(run_interventions(chat, n=4, pairs=4, seed=0)["layers"]) == 3
    with pytest.raises(ConfigError, match="no chat template"):
        WordSubject(subject.model, tokenizer, chat_template=True)


def save_word_level_lm(folder: Path, words: list[str]) -> Path:
    """A 2-layer Llama whose word-level tokenizer knows exactly `words` (and the prompt's other words): any other
    word is its unknown token, one id, as in tokenizers that lack a word and have no fallback."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    prompt = ["Objects", ":", ",", ".", "Items", "the", "has", "Question", "item", "of", "shape", "that", "is"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "<s>", *prompt, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, bos_token_id=1, eos_token_id=None)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_prompt_words_are_single_tokens_of_their_own(tmp_path, capsys):
    """D4, D8: a word the tokenizer lacks encodes to its unknown token, one id shared by every such word, and a
    lowercasing tokenizer gives colour "orange" and item "Orange" one id: neither kind is a symbol of its own, so
    both are dropped; a context size the remaining words cannot fill is refused with the counts of each kind."""
    from transformers import AutoTokenizer

    from stitchkit.binding.subjects import COLOUR_WORDS, ITEM_WORDS, SHAPE_WORDS, _single_tokens
    from stitchkit.vlm.tokenizer import word_tokenizer

    folder = save_word_level_lm(tmp_path / "lm", [*COLOUR_WORDS[:6], *SHAPE_WORDS, *ITEM_WORDS])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.encode(" teal", add_special_tokens=False) == [tokenizer.unk_token_id]  # one token, but not a word
    colours, shapes, items = _single_tokens(tokenizer, (COLOUR_WORDS, SHAPE_WORDS, ITEM_WORDS))
    assert (colours, shapes, items) == (list(COLOUR_WORDS[:6]), list(SHAPE_WORDS), list(ITEM_WORDS))
    lowercasing = word_tokenizer([*COLOUR_WORDS, *SHAPE_WORDS, *ITEM_WORDS])
    assert lowercasing.encode(" orange", add_special_tokens=False) == lowercasing.encode(" Orange", add_special_tokens=False)
    colours, shapes, items = _single_tokens(lowercasing, (COLOUR_WORDS, SHAPE_WORDS, ITEM_WORDS))
    assert "orange" not in colours and "Orange" not in items and len(colours) == len(items) == 23 and len(shapes) == 24
    ids = [lowercasing.encode(f" {w}", add_special_tokens=False)[0] for w in [*colours, *shapes, *items]]
    assert len(set(ids)) == len(ids)

    with pytest.raises(SystemExit) as done:
        main(["binding", "analyze", "--model", str(folder), "--out", str(tmp_path / "an"), "--n", "8"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "at most 6 objects" in err
    assert "6 colour, 24 shape and 24 item words are single tokens" in err and not (tmp_path / "an").exists()


# ---- the CLI ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_encoder(tmp_path_factory) -> Path:
    return save_vit(tmp_path_factory.mktemp("vit"), hidden=24)


@pytest.fixture(scope="module")
def narrow_vit_encoder(tmp_path_factory) -> Path:
    """A second encoder like vit_encoder (16 tokens per 32 px image) whose features are narrower (16, not 24)."""
    return save_vit(tmp_path_factory.mktemp("narrow_vit"), hidden=16)


def save_vit(folder: Path, hidden: int) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ViTModel(config).save_pretrained(folder)
    return folder


def tiny_config(path: Path, encoder: Path) -> Path:
    cfg = {
        "name": "tiny",
        "seeds": [0],
        "vocab": {"colours": 8, "shapes": 8, "items": 8},
        "train_objects": [1, 4],
        "model": {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64, "max_positions": 128, "projector_hidden": 16},
        "images": {"encoder": str(encoder), "cells": 4, "pool": 16, "eval_pool": 8, "gate_images": 1},
        "optim": {"lr": 1e-3, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 4},
        "stages": {"S1": {"steps": 6, "until_id_accuracy": 0.99, "eval_every": 3, "stop_examples": 4},
                   "S2": {"steps": 3, "image_fraction": 1.0, "grounding": 0.25},
                   "S3": {"steps": 3, "image_fraction": 0.2, "noise": True}},
        "branches": {"text-only": ["S1"], "image-text": ["S1", "S2", "S3"]},
        "eval": {"max_objects": 6, "per_n": 4, "batch_size": 16},
        "analysis": {"n": [4], "pairs": 4, "probe_examples": 20, "knockout_examples": 4, "knockout_window": 1},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_one_noise_span_per_run_whatever_the_branch():
    """SN (a text branch's, shared) and S3N (an image branch's) draw K ~ U{0..span - 2N} over the same span: the
    encoders' token count, 196 without images, noise.span when set; encoders that disagree need noise.span."""
    from types import SimpleNamespace

    from stitchkit.binding.experiment import noise_span

    def banks(tokens):
        return SimpleNamespace(train=SimpleNamespace(tokens=tokens))

    cfg = BindingConfig()
    assert noise_span(cfg, {}) == 196
    assert noise_span(cfg, {"a": banks(256), "b": banks(256)}) == 256
    with pytest.raises(ConfigError, match="noise.span"):
        noise_span(cfg, {"a": banks(256), "b": banks(196)})
    assert noise_span(cfg.model_copy(update={"noise": NoiseSettings(span=100)}), {"a": banks(256), "b": banks(196)}) == 100


def test_a_diverged_stage_leaves_its_branch_out_of_the_table_and_is_not_trained_again(tmp_path, vit_encoder, monkeypatch):
    from stitchkit.binding import experiment
    from stitchkit.config import load_config
    from stitchkit.errors import TrainingDiverged

    cfg = load_config(BindingConfig, tiny_config(tmp_path / "tiny.yaml", vit_encoder))
    cfg = cfg.model_copy(update={"analysis": cfg.analysis.model_copy(update={"enabled": False})})
    original = experiment.train_stage

    def diverging(model, cfg, seed, stage_run, *args):
        if stage_run.stage == "S2":
            raise TrainingDiverged(3, float("nan"))
        return original(model, cfg, seed, stage_run, *args)

    monkeypatch.setattr(experiment, "train_stage", diverging)
    experiment.run_binding(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["table"]["text-only"]["runs"] == 1 and results["table"]["text-only"]["diverged"] == 0
    assert results["table"]["image-text"]["runs"] == 0 and results["table"]["image-text"]["diverged"] == 1
    assert results["table"]["image-text"]["id"] is None
    assert [r["diverged"] for r in results["diverged"]] == [{"stage": "train/seed0/S1/S2-encoder", "step": 3, "loss": "nan"}]
    assert {r["branch"] for r in results["runs"]} == {"text-only"}
    assert "0 (1 diverged)" in (tmp_path / "run" / "report.md").read_text()

    def untrained(model, cfg, seed, stage_run, *args):
        assert stage_run.stage != "S2", "a diverged stage was trained again"
        return original(model, cfg, seed, stage_run, *args)

    monkeypatch.setattr(experiment, "train_stage", untrained)
    experiment.run_binding(cfg, tmp_path / "run")  # the re-run reads the marker
    assert json.loads((tmp_path / "run" / "results.json").read_text())["table"] == results["table"]


def test_binding_run_and_analyze_end_to_end(tmp_path, vit_encoder, capsys):
    config = tiny_config(tmp_path / "tiny.yaml", vit_encoder)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["binding", "run", str(config), "--out", str(out)])
    assert done.value.code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"text-only", "image-text"}
    image_run = next(r for r in results["runs"] if r["branch"] == "image-text")
    assert [s["stage"] for s in image_run["stages"]] == ["S1", "S2", "S3"]
    assert image_run["stages"][0]["folder"] == "train/seed0/S1"  # shared with the text-only branch
    assert "image" in image_run["stages"][1] and "image" not in image_run["stages"][0]
    assert set(image_run["stages"][0]["text"]) == {str(n) for n in range(1, 7)}
    assert (out / "figures" / "binding_accuracy_vs_n.png").is_file() and (out / "figures" / "binding_mechanisms.png").is_file()
    report = (out / "report.md").read_text()
    assert "Separability gate" in report
    # D9: S3's noise is drawn over the encoder's (32 / 8)^2 = 16 tokens: recorded, and named in the report
    assert results["noise_span"] == 16 and "span = 16" in report and "at most 8 positions at the largest trained N = 4" in report
    # gate: 8 x 8 renderable single-object images (gate_images 1), the probe tested on the held-out fifth
    gate = results["gates"]["encoder"]
    assert gate["images"] == 64 and gate["test_images"] == 64 - int(64 * 0.8)
    assert report_table(report, "encoder")[0]["test images"] == str(gate["test_images"])
    assert "[encoder](images/encoder/sample.png)" in report and (out / "images" / "encoder" / "sample.png").is_file()
    s1_meta = json.loads((out / "train" / "seed0" / "S1" / "model" / "binding.json").read_text())
    assert s1_meta["train_objects"] == [1, 4] and s1_meta["encoder_dim"] is None and s1_meta["encoder"] is None
    for r in results["runs"]:  # knockouts also measure the intervention outcomes at L - 1, on the interventions' pairs
        knock, inter = r["analysis"]["knockouts"], r["analysis"]["interventions"]["4"]
        assert knock["label_layer"] == 1 and knock["pairs"] == inter["pairs"]
        assert knock["labels_baseline"] == {o: inter["layers"][1][o] for o in OUTCOMES}
        assert all(set(w["labels"]) == set(w["labels_delta"]) == set(OUTCOMES) for w in knock["windows"])
    assert (out / "figures" / "binding_knockout_labels.png").is_file()
    # S2 took over S1's AdamW moments (step counts continue); the projector, new in S2, started fresh.
    s1_steps = image_run["stages"][0]["steps"]
    checkpoint = out / "train" / "seed0" / "S1" / "S2-encoder" / "checkpoint"
    names = json.loads((checkpoint / "state.json").read_text())["optimizer_params"]
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    steps = {names[i]: int(s["step"]) for i, s in state.items()}
    assert steps["lm.lm_head.weight"] == s1_steps + 3 and steps["projector.0.weight"] == 3
    before = (out / "results.json").read_bytes()
    with pytest.raises(SystemExit):
        main(["binding", "run", str(config), "--out", str(out)])  # every step finished: skipped, same bytes
    assert (out / "results.json").read_bytes() == before

    model_dir = out / "train" / "seed0" / "S1" / "S2-encoder" / "S3-encoder" / "model"  # S3 shows images too
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["binding", "analyze", "--model", str(model_dir), "--out", str(tmp_path / "an"), "--n", "4", "--n", "5", "--pairs", "4",
              "--probe-examples", "20", "--knockout-label-layer", "1", "--knockout-window", "1"])  # fmt: skip
    assert done.value.code == 0
    analysis = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert analysis["layers"] == 2 and "labels_delta" in analysis["knockouts"]["windows"][0]
    assert analysis["knockouts"]["label_layer"] == 1  # --knockout-label-layer
    assert analysis["knockouts"]["window"] == 1 and len(analysis["knockouts"]["windows"]) == 6 * 2  # --knockout-window: 2 per set
    assert (tmp_path / "an" / "figures" / "knockouts.png").is_file()
    # N = 5 is above the trained 1..4 (binding.json): said once on stderr and in the report
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert any("--n [5]" in w and "trained on N = 1..4" in w for w in warnings)
    an_report = (tmp_path / "an" / "report.md").read_text()
    assert "--n [5]: the model was trained on N = 1..4" in an_report and "2 layers" in an_report
    knocked = report_table(an_report, "edge set")  # every knocked-out window's accuracy change, in points
    assert [row["edge set"] for row in knocked] == ["K1", "K2", "K3", "K4", "K5", "K6"]
    for w in analysis["knockouts"]["windows"]:
        assert next(r for r in knocked if r["edge set"] == w["set"])[f"L{w['start']}-{w['start']}"] == f"{100 * w['delta']:.1f}"
    rows = {r["N"]: r for r in report_table(an_report, "N")}
    inter = analysis["interventions"]["4"]
    assert rows["4"]["candidates"] == str(inter["candidates"]) and rows["4"]["pairs"] == str(inter["pairs"])
    assert 0 <= inter["accuracy"] <= 1 and rows["4"]["accuracy %"] == f"{100 * inter['accuracy']:.2f}"
    with pytest.raises(SystemExit) as done:  # a layer the model does not have: refused before any output
        main(["binding", "analyze", "--model", str(model_dir), "--out", str(tmp_path / "bad"), "--knockout-label-layer", "9"])
    assert done.value.code == 2 and "--knockout-label-layer 9" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("legacy_text_projector", [False, True])
def test_encoders_of_different_widths_each_run_their_image_branch(tmp_path, vit_encoder, narrow_vit_encoder, monkeypatch, legacy_text_projector):
    """D1: S1, trained first inside the wide encoder's image branch, is shared with the narrow encoder's branch;
    its model carries no projector (or, as runs of results version 1 saved, an untrained one of the wide width,
    which the narrow branch must not load), and every encoder's branch trains, evaluates and analyses; a re-run
    finds everything finished."""
    from stitchkit.binding import experiment
    from stitchkit.config import load_config

    cfg = yaml.safe_load(tiny_config(tmp_path / "two.yaml", vit_encoder).read_text())
    cfg["encoders"] = {"wide": str(vit_encoder), "narrow": str(narrow_vit_encoder)}
    cfg["branches"] = {"image-text": ["S1", "S2", "S3"]}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))  # wide first: it trains S1
    if legacy_text_projector:
        real_save = experiment.save_binding_model
        monkeypatch.setattr(experiment, "save_binding_model", lambda *args, **kwargs: real_save(*args, **{**kwargs, "with_projector": True}))
    out = tmp_path / "run"
    experiment.run_binding(load_config(BindingConfig, tmp_path / "two.yaml"), out)
    results = json.loads((out / "results.json").read_text())
    assert [(r["branch"], r["encoder"]) for r in results["runs"]] == [("image-text", "wide"), ("image-text", "narrow")]
    assert results["table"]["image-text"]["runs"] == 2 and not results["diverged"]
    s1 = out / "train" / "seed0" / "S1" / "model"
    assert (s1 / "projector.safetensors").is_file() == legacy_text_projector
    for name, width in (("wide", 24), ("narrow", 16)):
        meta = json.loads((out / "train" / "seed0" / "S1" / f"S2-{name}" / f"S3-{name}" / "model" / "binding.json").read_text())
        assert meta["encoder_dim"] == width and meta["encoder"] == name
    first, second = (r["stages"][0] for r in results["runs"])
    assert first == second and first["folder"] == "train/seed0/S1"  # one S1 for both encoders
    before = (out / "results.json").read_bytes()
    experiment.run_binding(load_config(BindingConfig, tmp_path / "two.yaml"), out)
    assert (out / "results.json").read_bytes() == before


def test_analyze_says_what_a_model_folder_is_missing_and_which_folder_to_pass(tmp_path, capsys):
    """D5, D6, D11: a binding model folder without its LM weights or its projector, a zoo vision encoder, a run
    folder and a stage folder: each one message (exit 2) that names the folder, the file or the folder to pass."""
    import shutil

    model = tiny_model(encoder_dim=8)
    stage = tmp_path / "run" / "train" / "seed0" / "S1" / "S2-encoder"
    save_binding_model(model, stage / "model")
    (tmp_path / "run" / "manifest.json").write_text("{}")

    def refused(spec: str) -> str:
        with pytest.raises(SystemExit) as done:
            main(["binding", "analyze", "--model", spec, "--out", str(tmp_path / "an")])
        err = capsys.readouterr().err
        assert done.value.code == 2 and "Traceback" not in err and not (tmp_path / "an").exists()
        return err

    no_weights, no_projector = tmp_path / "no_weights", tmp_path / "no_projector"
    shutil.copytree(stage / "model", no_weights)
    (no_weights / "lm" / "model.safetensors").unlink()
    shutil.copytree(stage / "model", no_projector)
    (no_projector / "projector.safetensors").unlink()
    assert f"{no_weights}: the binding model's lm/model.safetensors is missing" in refused(str(no_weights))
    assert f"{no_projector}: the binding model's projector.safetensors is missing" in refused(str(no_projector))
    assert "'zoo:supervised' is a vision encoder of the micro zoo, with no language model" in refused("zoo:supervised")
    assert f"pass its model folder, {stage / 'model'}" in refused(str(stage))
    err = refused(str(tmp_path / "run"))
    assert "is a binding run folder" in err and str(stage / "model") in err


def test_analyze_of_a_model_that_has_not_learned_the_task_reports_no_mechanism(tmp_path, capsys):
    """D2: an untrained model answers few of the 4 x 20 candidate pairs right on both sides: no peak layer, "n/a"
    instead of shares and R in the report, a pair count in the figure, and one warning line on stderr."""
    save_binding_model(tiny_model(seed=0), tmp_path / "model")
    with pytest.raises(SystemExit) as done:
        main(["binding", "analyze", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "an"), "--n", "4", "--pairs", "20",
              "--probe-examples", "20", "--no-knockouts"])  # fmt: skip
    assert done.value.code == 0
    inter = json.loads((tmp_path / "an" / "analysis.json").read_text())["interventions"]["4"]
    assert inter["pairs"] < 20 and inter["candidates"] == 80 and inter["requested"] == 20 and inter["peak_layer"] is None
    row = report_table((tmp_path / "an" / "report.md").read_text(), "N")[0]
    assert row["peak layer"] == f"n/a ({inter['pairs']} of 20 pairs)" and row["R at peak"] == row["symbolic %"] == "n/a"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"answers only {inter['pairs']} of 80 candidate pairs" in warnings[0]
    assert "has not learned the task at that N" in warnings[0]


def test_bad_configs_are_one_message_and_exit_2(tmp_path, vit_encoder, capsys):
    config = tiny_config(tmp_path / "bad.yaml", vit_encoder)
    cfg = yaml.safe_load(config.read_text())
    cfg["branches"]["broken"] = ["S1", "S9"]
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main(["binding", "run", str(config), "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "S9" in err and "Traceback" not in err
    del cfg["branches"]["broken"]
    cfg["optim"]["warmup_steps"] = cfg["stages"]["S2"]["steps"]  # a warm-up as long as a stage never ends
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main(["binding", "run", str(config), "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    assert "stages.S2: warmup_steps" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as done:
        main(["binding", "analyze", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "an")])
    assert done.value.code == 2


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"branches": {"mine": []}}, "branches.mine: lists no stages"),
        ({"branches": {"mine": ["S1", "S9"]}}, "branches.mine: names unknown stages ['S9']"),
        ({"eval": {"max_objects": 13}}, "eval.max_objects: contexts of up to 13 objects"),
        ({"train_objects": [1, 13], "eval": {"max_objects": 12}}, "train_objects: contexts of up to 13 objects"),
        ({"train_objects": [1, 6], "eval": {"max_objects": 12}, "images": {"cells": 2}}, "images.cells: image contexts of up to 6 objects"),
        ({"analysis": {"knockout_label_layer": 5}}, "analysis.knockout_label_layer: 5 is past"),
        ({"images": {"box": [0.5, 0.2]}}, "images.box: must be lo <= hi < 1"),
    ],
)
def test_cross_field_config_errors_name_the_field(tmp_path, capsys, change, expected):
    """D7: a problem between fields is reported at the field to change, without pydantic's 'Value error, '."""
    cfg = {"vocab": {"colours": 12, "shapes": 12, "items": 12}, "eval": {"max_objects": 10}, "model": {"layers": 4}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**cfg, **change}))
    with pytest.raises(SystemExit) as done:
        main(["binding", "run", str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and f"  {expected}" in err and "Value error" not in err and "(top level)" not in err


def save_tiny_vlm(folder: Path) -> Path:
    """A 3-layer Qwen2-VL with a word-level tokenizer that has every prompt word, saved as a hub folder."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from stitchkit.binding.subjects import COLOUR_WORDS, ITEM_WORDS, SHAPE_WORDS
    from stitchkit.vlm.tokenizer import word_tokenizer

    words = [*COLOUR_WORDS, *SHAPE_WORDS, *ITEM_WORDS, "objects", "items", "the", "has", "question", "item", "of", "shape", "that", "is"]
    tokenizer = word_tokenizer(words, ("<pad>", "<unk>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_analyze_runs_a_saved_vlm_on_text_prompts(tmp_path):
    """The LLM -> VLM comparison path: a Qwen2-VL folder (model + tokenizer), analysed text-only through the CLI."""
    save_tiny_vlm(tmp_path / "vlm")
    with pytest.raises(SystemExit) as done:
        main(["binding", "analyze", "--model", str(tmp_path / "vlm"), "--out", str(tmp_path / "an"), "--n", "4", "--pairs", "3", "--probe-examples", "20"])
    assert done.value.code == 0
    analysis = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert analysis["layers"] == 3 and analysis["knockouts"] is None
    assert len(analysis["interventions"]["4"]["layers"]) == 4


def test_trust_remote_code_reaches_every_from_pretrained_and_only_when_asked(tmp_path, monkeypatch):
    """--trust-remote-code (for checkpoints whose classes transformers lacks) goes to the config's, the
    tokenizer's and the model's from_pretrained; without it none of them is told to trust remote code."""
    import transformers

    from stitchkit.binding.subjects import load_subject

    save_tiny_vlm(tmp_path / "vlm")
    calls = []

    def recording(auto_class):
        real = auto_class.from_pretrained

        def from_pretrained(source, *args, **kwargs):
            calls.append((auto_class.__name__, kwargs.get("trust_remote_code", False)))
            return real(source, *args, **kwargs)

        return from_pretrained

    for auto_class in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForImageTextToText):
        monkeypatch.setattr(auto_class, "from_pretrained", recording(auto_class))
    load_subject(str(tmp_path / "vlm"), "cpu")
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForImageTextToText"}
    assert not any(trusted for _, trusted in calls)
    calls.clear()
    with pytest.raises(SystemExit) as done:
        main(["binding", "analyze", "--model", str(tmp_path / "vlm"), "--out", str(tmp_path / "an"), "--n", "4", "--pairs", "3",
              "--probe-examples", "20", "--trust-remote-code"])  # fmt: skip
    assert done.value.code == 0
    assert set(calls) == {("AutoConfig", True), ("AutoTokenizer", True), ("AutoModelForImageTextToText", True)}  # nested loads too


def test_image_contexts_larger_than_the_glyph_set_are_refused_before_anything_is_written(tmp_path, capsys):
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump({"vocab": {"colours": 16, "shapes": 16, "items": 16}, "train_objects": [1, 12],
                                      "eval": {"max_objects": 16}, "images": {"glyphs": "world", "cells": 4}}))  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(["binding", "run", str(config), "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    assert "10 colours x 13 shapes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_summary_groups_context_sizes_by_the_trained_range():
    from stitchkit.binding.evaluate import summarize

    per_n = {1: 1.0, 2: 0.5, 3: 0.25, 4: 0.0, 5: 0.1}
    # trained on N = 2..3: N = 1 was never trained, so it is neither ID nor OOD
    assert summarize(per_n, (2, 3), ood_headline=4) == {"id": 0.375, "ood": 0.0, "ood_far": 0.1}
    assert summarize(per_n, (1, 2), ood_headline=None) == {"id": 0.75, "ood": (0.25 + 0.0 + 0.1) / 3, "ood_far": None}


def test_the_default_ood_average_is_the_specs_headline_range():
    """§6/§10: OOD is averaged over N = 9..16 and far OOD over 17..32, unless a config says otherwise."""
    from stitchkit.binding.evaluate import ood_ranges, summarize

    per_n = {n: 1.0 if n <= 8 else 0.5 if n <= 16 else 0.1 for n in range(1, 33)}
    cfg = BindingConfig()
    assert summarize(per_n, cfg.train_objects, cfg.eval.ood_headline) == {"id": 1.0, "ood": 0.5, "ood_far": 0.1}
    assert ood_ranges(cfg.train_objects, cfg.eval) == {"ood": [9, 16], "ood_far": [17, 32]}  # the report's heading
    one_group = BindingConfig.model_validate({"eval": {"ood_headline": None}})
    assert summarize(per_n, cfg.train_objects, one_group.eval.ood_headline) == {"id": 1.0, "ood": pytest.approx((8 * 0.5 + 16 * 0.1) / 24), "ood_far": None}
    assert ood_ranges(one_group.train_objects, one_group.eval) == {"ood": [9, 32], "ood_far": None}
    small = BindingConfig.model_validate({"eval": {"max_objects": 12}})  # fewer sizes than the headline range
    assert summarize({n: per_n[n] for n in range(1, 13)}, small.train_objects, small.eval.ood_headline) == {"id": 1.0, "ood": 0.5, "ood_far": None}
    assert ood_ranges(small.train_objects, small.eval) == {"ood": [9, 12], "ood_far": None}


def test_analyze_takes_its_defaults_from_the_config_and_reports_a_given_layer(tmp_path, monkeypatch, capsys):
    """`binding analyze` runs as many pairs, probe and knockout examples as a config's analysis defaults (here
    scaled down inside the recording stand-ins), and --peak-layer adds R and the shares at that layer."""
    from stitchkit.binding import analyze, knockouts
    from stitchkit.report import format_cell

    save_binding_model(context_model(), tmp_path / "model")
    asked, real_inter, real_probes, real_knock = {}, analyze.run_interventions, analyze.run_probes, knockouts.run_knockouts

    def interventions(subject, n, pairs, seed):
        asked["pairs"] = pairs
        return real_inter(subject, n, 400, seed)  # ~20 pairs right on both sides

    def probes(subject, n, examples, seed):
        asked["probe_examples"] = examples
        return real_probes(subject, n, 20, seed)

    def knocks(model, n, examples, seed, **kwargs):
        asked["knockout_examples"] = examples
        return real_knock(model, n, 4, seed, **{**kwargs, "pairs": 12})

    monkeypatch.setattr(analyze, "run_interventions", interventions)
    monkeypatch.setattr(analyze, "run_probes", probes)
    monkeypatch.setattr(knockouts, "run_knockouts", knocks)
    with pytest.raises(SystemExit) as done:
        main(["binding", "analyze", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "an"), "--n", "4", "--peak-layer", "2"])
    assert done.value.code == 0
    defaults = BindingConfig().analysis
    assert asked == {"pairs": defaults.pairs, "probe_examples": defaults.probe_examples, "knockout_examples": defaults.knockout_examples}
    assert defaults.probe_examples == 3000
    analysis = json.loads((tmp_path / "an" / "analysis.json").read_text())
    at = analysis["interventions"]["4"]["layers"][2]  # resid_post: every pair reflexive, unlike the peak (layer 1)
    assert analysis["base_peak_layer"] == 2 and analysis["interventions"]["4"]["peak_layer"] == 1
    cells = report_table((tmp_path / "an" / "report.md").read_text(), "N")[0]
    assert cells["R at 2"] == format_cell(at["ratio"], 2) != cells["R at peak"]
    assert cells["positional % at 2"] == format_cell(100 * at["positional"], 2) != cells["positional %"]
    assert cells["symbolic % at 2"] == format_cell(100 * at["symbolic"], 2)
    with pytest.raises(SystemExit) as done:  # the model has layers 0..2
        main(["binding", "analyze", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "bad"), "--peak-layer", "3"])
    assert done.value.code == 2 and "--peak-layer 3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_committed_quickstart_results_follow_the_current_schema():
    """D10: results/binding/quickstart is the output of the current code (results version, its keys), and its
    report carries what the current report says (the OOD range, the noise actually drawn, the pair counts)."""
    from stitchkit.binding.experiment import RESULTS_VERSION
    from stitchkit.paths import REPO_ROOT

    folder = REPO_ROOT / "results" / "binding" / "quickstart"
    results = json.loads((folder / "results.json").read_text())
    assert results["version"] == RESULTS_VERSION
    assert {"train_objects", "vocab", "noise_span", "ood_ranges", "gates", "table", "runs", "diverged"} <= set(results)
    assert all("diverged" in row for row in results["table"].values())
    assert all({"requested", "accuracy"} <= set(inter) for r in results["runs"] for inter in r["analysis"]["interventions"].values())
    report = (folder / "report.md").read_text()
    assert f"OOD (N = {results['ood_ranges']['ood'][0]}..{results['ood_ranges']['ood'][1]})" in report
    assert f"span = {results['noise_span']}" in report
    for link in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (folder / link).is_file(), link


def test_readable_names_and_hop_practice_in_the_report():
    """Sample images are titled with the shapes world's words; a run with hop practice says so by its mechanisms."""
    from stitchkit.binding.report import hop_practice_line

    world = glyph_set("world")
    assert world.name(0, 5) == "red circle" and world.name(8, 10) == "white cross"
    assert glyph_set("parametric").name(3, 7) == "C3 S7"
    plain = BindingConfig()
    assert hop_practice_line(plain) == ""
    practice = BindingConfig.model_validate({"stages": {**{k: v.model_dump() for k, v in plain.stages.items()},
                                                        "S1": {"steps": 200_000, "hop_practice": 0.5}}})  # fmt: skip
    line = hop_practice_line(practice)
    assert "(0.5 in S1)" in line and "not in the paper" in line
    assert all(branch in line for branch in plain.branches)  # every default branch starts with S1
