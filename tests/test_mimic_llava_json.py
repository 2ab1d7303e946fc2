"""`stitchkit mimic export-training`: MIMIC training data in LLaVA conversation JSON (reference mimic.md section 5).

The oracle reads the raw COCO annotations the benchmark was built from (not the generator's index, not the
sample's recorded counts): every answer in the export -- the single-turn ground truth, the correct option, every
follow-up -- is recomputed from the boxes of the record's images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from stitchkit import cli
from stitchkit.errors import InputError
from stitchkit.multiimage import MimicConfig, build_benchmark, load_benchmark
from stitchkit.multiimage.llava_json import export_training, option_turn, sample_rng, training_records
from stitchkit.multiimage.protocol import plural
from stitchkit.multiimage.templates import TEMPLATES, question_text
from stitchkit.world import WorldConfig, render_coco

CONFIG = {
    "seed": 1,
    "filter": {"min_box_area_frac": 0.02},
    "min_images_per_class": 3,
    "max_image_reuse": 6,
    "counting": {"n_samples": 40, "k": [1, 2], "spread": [1, 2, 3], "distractors": [0, 2], "totals": [2, 4],
                 "max_count": 6},
    "listing": {"n_samples": 20, "spread": [1, 2], "distractors": [0, 2]},
    "common": {"n_samples": 20, "n_images": [2, 3]},
    "oddone": {"n_samples": 20, "n_images": [3, 4]},
}
OPTION_LINE = re.compile(r"^([A-D])\. (.+)$")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic_llava")
    render_coco(root / "world", n_images=300, size=48, seed=0, cfg=WorldConfig(max_objects=6))
    build_benchmark(root / "world" / "annotations.json", root / "world", root / "bench",
                    MimicConfig.model_validate(CONFIG))
    return root


class Annotations:
    """The raw COCO file: per image, every annotation's class name and crowd flag."""

    def __init__(self, path: Path):
        coco = json.loads(path.read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        self.members = defaultdict(set)
        for c in coco["categories"]:
            self.members[c["supercategory"]].add(c["name"])
        self.boxes = defaultdict(list)
        for a in coco["annotations"]:
            self.boxes[a["image_id"]].append((names[a["category_id"]], bool(a.get("iscrowd"))))
        self.class_names = set(names.values())

    def present(self, image_id: int) -> set[str]:
        return {name for name, _ in self.boxes[image_id]}

    def count(self, image_id: int, name: str) -> int:
        return sum(n == name and not crowd for n, crowd in self.boxes[image_id])

    def answer(self, sample) -> str:
        """The ground truth of `sample`'s own question, from the boxes alone."""
        ids = sample.image_ids
        if sample.task == "counting":
            totals = [sum(self.count(i, name) for i in ids) for name in sample.classes]
            return str(totals[0]) if len(totals) == 1 else ", ".join(f"{n}: {t}" for n, t in zip(sample.classes, totals))
        if sample.task == "listing":
            return ", ".join(sorted(set().union(*map(self.present, ids)) & self.members[sample.category]))
        if sample.task == "common":
            (common,) = set.intersection(*map(self.present, ids))
            return common
        in_images = Counter(name for i in ids for name in self.present(i))
        (odd,) = [name for name, n in in_images.items() if n < len(ids) / 2]
        return odd

    def followup(self, question: str, ids: list[int]) -> tuple[str, str, str]:
        """A follow-up's (kind, class, answer): the question is parsed, its class and image looked up in the boxes."""
        singular = {plural(name): name for name in self.class_names}
        if m := re.fullmatch(r"How many of these images contain at least one (.+)\?", question):
            name = m.group(1)
            return "images", name, str(sum(name in self.present(i) for i in ids))  # raw presence, crowd included
        if m := re.fullmatch(r"How many (.+) are there in the (\d+)(?:st|nd|rd|th) image\?", question):
            name = singular[m.group(1)]
            return "one image", name, str(self.count(ids[int(m.group(2)) - 1], name))
        (name,) = [n for n in self.class_names for t in range(len(TEMPLATES["counting"]))
                   if question_text("counting", t, classes=[n]) == question]
        return "total", name, str(sum(self.count(i, name) for i in ids))


def check_options(sample, prompt: str, answer: str, coco: Annotations) -> None:
    """The recomputed truth is exactly one option; the answer is its letter and text; the wrong options are of the
    truth's own kind; the question is the sample's (listing's gets an end mark, the eval prompt's sentence does not
    fit an option list)."""
    truth = coco.answer(sample)
    question, options = split_prompt(prompt)
    if sample.task == "listing":
        assert question[:-1] == sample.question and question[-1] in "?."
    else:
        assert question == sample.question
    texts = [text for _, text in options]
    assert [letter for letter, _ in options] == list("ABCD"[:len(options)]) and len(options) >= 2
    assert texts.count(truth) == 1 and len(set(texts)) == len(texts)
    assert answer == f"{options[texts.index(truth)][0]}. {truth}"
    wrong = [t for t in texts if t != truth]
    if sample.task == "counting" and sample.k == 1:  # four consecutive numbers near the count, ascending
        assert len(texts) == 4 and [int(t) for t in texts] == list(range(int(texts[0]), int(texts[0]) + 4))
    elif sample.task == "counting":  # the same classes, other counts
        assert all([p.split(": ")[0] for p in t.split(", ")] == sample.classes for t in wrong)
    elif sample.task == "listing":  # other alphabetical sets of the same supercategory's members
        assert all(set(t.split(", ")) <= coco.members[sample.category] for t in wrong)
        assert all(t.split(", ") == sorted(t.split(", ")) for t in wrong)
    else:  # other class names of the benchmark; odd-one's majority class among them
        assert set(wrong) <= coco.class_names and len(texts) == 4
        if sample.task == "oddone":
            assert sample.classes[1] in wrong


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli.main(["mimic", *args])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def split_prompt(value: str) -> tuple[str, list[tuple[str, str]]]:
    """A "Question: ...\\nAnswer:" turn -> (question, [(letter, option text)])."""
    lines = value.split("\n")
    assert lines[0].startswith("Question: ") and lines[-1] == "Answer:", value
    options = [OPTION_LINE.match(line).groups() for line in lines[1:-1] if OPTION_LINE.match(line)]
    return lines[0][len("Question: "):], options


@pytest.fixture(scope="module")
def exported(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "train.json"
    export_training(load_benchmark(shapes / "bench"), out, multi_turn=0.2, options=0.2, seed=0)
    return out


def test_every_record_holds_its_images_and_its_question(shapes, exported):
    bench = load_benchmark(shapes / "bench")
    samples, records = bench.by_id(), json.loads(exported.read_text())
    assert sorted(r["id"] for r in records) == sorted(samples)
    assert [r["id"] for r in records] != [s.id for s in bench.samples]  # shuffled: `first:X%` takes a mix
    for r in records:
        sample = samples[r["id"]]
        assert r["image"] == sample.images and all((bench.images_root / p).is_file() for p in r["image"])
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and 2 <= len(turns) <= 6
        first = turns[0]["value"]
        assert first.startswith("<image>\n" * sample.n_images) and "".join(t["value"] for t in turns).count(
            "<image>") == sample.n_images  # one per image, all in the first turn
        text = first[len("<image>\n") * sample.n_images:]
        question, options = split_prompt(text)
        if options:
            assert question.rstrip("?.") == sample.question.rstrip("?.")
        else:
            assert text == sample.prompt()


def test_every_answer_recomputed_from_the_annotations(shapes, exported):
    bench = load_benchmark(shapes / "bench")
    coco = Annotations(shapes / "world" / "annotations.json")
    samples, records = bench.by_id(), json.loads(exported.read_text())
    followup_kinds, option_tasks = Counter(), Counter()
    for r in records:
        sample = samples[r["id"]]
        truth = coco.answer(sample)
        human = [t["value"] for t in r["conversations"][::2]]
        gpt = [t["value"] for t in r["conversations"][1::2]]
        question, options = split_prompt(human[0].split("<image>\n")[-1])
        if not options:
            assert gpt[0] == truth, r["id"]
        else:
            option_tasks[sample.task] += 1
            check_options(sample, human[0].split("<image>\n")[-1], gpt[0], coco)
        assert len(human) == 1 or not options  # option records are single-turn
        asked = [split_prompt(h)[0] for h in human[1:]]
        assert len(set(asked)) == len(asked) and question not in asked
        for follow_up, answer in zip(asked, gpt[1:]):
            kind, name, truth = coco.followup(follow_up, sample.image_ids)
            assert answer == truth, (r["id"], follow_up)
            followup_kinds[kind] += 1
            # odd-one: only the odd class is asked about (the majority's counts may miss crowd-only presence)
            assert sample.task != "oddone" or name == sample.classes[0]
    assert set(option_tasks) == {"counting", "listing", "common", "oddone"}
    assert len(followup_kinds) == 3  # totals, images holding a class, one image's count


def test_shares_of_each_kind_match_the_requested_fractions(shapes, tmp_path, capsys):
    bench = load_benchmark(shapes / "bench")
    per_task = Counter(s.task for s in bench.samples)
    rounded = lambda f, n: math.floor(f * n + 0.5)
    for multi_turn, options in ((0.2, 0.2), (0.33, 0.48), (1.0, 0.0), (0.0, 0.0)):
        code, out, _ = run_cli(["export-training", "--data", str(shapes / "bench"), "--out", str(tmp_path / "t.json"),
                                "--multi-turn", str(multi_turn), "--options", str(options)], capsys)
        assert code == 0 and "counts in" in out
        records = json.loads((tmp_path / "t.json").read_text())
        summary = json.loads((tmp_path / "t.summary.json").read_text())
        kinds = Counter()
        for r in records:
            task, human = r["id"].split("-")[0], r["conversations"][0]["value"]
            kind = "multi_turn" if len(r["conversations"]) > 2 else "options" if "\nA. " in human else "single"
            kinds[task, kind] += 1
        for task, n in per_task.items():
            assert kinds[task, "options"] == rounded(options, n) == summary["by_task"][task]["options"]
            assert kinds[task, "multi_turn"] == rounded(multi_turn, n) == summary["by_task"][task]["multi_turn"]
        n_multi = sum(v for (_, kind), v in kinds.items() if kind == "multi_turn")
        assert abs(n_multi - multi_turn * len(records)) <= len(per_task) / 2
        assert summary["kinds"]["multi_turn"] == n_multi and summary["records"] == len(records)
        turns = Counter(str(len(r["conversations"]) // 2) for r in records)
        assert summary["turns"] == dict(sorted(turns.items())) and set(turns) <= {"1", "2", "3"}
        assert f"multi-turn {n_multi}" in out and summary["image_folder"] in out
        assert {"2", "3"} <= set(summary["turns"]) or multi_turn == 0


def test_option_lists_over_many_seeds(shapes):
    """Every sample's option list under 25 seeds: the truth exactly once, distractors of its kind, no repeats."""
    bench = load_benchmark(shapes / "bench")
    coco = Annotations(shapes / "world" / "annotations.json")
    letters = Counter()
    for seed in range(25):
        for sample in bench.samples:
            turn = option_turn(sample, bench.meta, sample_rng(seed, sample, "options"))
            check_options(sample, turn.prompt, turn.answer, coco)
            one_count = sample.task == "counting" and sample.k == 1
            letters["counting, 3 or more" if one_count and int(sample.gt) >= 3 else sample.task, turn.answer[0]] += 1
    # the truth takes every letter: shuffled, or (counts) a window placed at random, where counts >= 3 allow it
    for task in ("counting, 3 or more", "listing", "common", "oddone"):
        assert all(letters[task, letter] > 25 for letter in "ABCD"), letters


def test_same_seed_same_bytes(shapes, tmp_path):
    bench = load_benchmark(shapes / "bench")
    for name in ("a", "b"):
        export_training(bench, tmp_path / name / "train.json", seed=7)
    for file in ("train.json", "train.summary.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    export_training(bench, tmp_path / "c" / "train.json", seed=8)
    assert (tmp_path / "c" / "train.json").read_bytes() != (tmp_path / "a" / "train.json").read_bytes()
    export_training(bench, tmp_path / "train.jsonl", seed=7)  # the line format holds the same records
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert lines == json.loads((tmp_path / "a" / "train.json").read_text())


def test_records_without_per_image_counts_stay_single_turn(shapes):
    """The released data carries no per-image counts or classes: no follow-up can be answered, so none is made."""
    bench = load_benchmark(shapes / "bench")
    bare = dataclasses.replace(bench, samples=[dataclasses.replace(s, counts_per_image=None, classes=None, k=None)
                                               if s.task == "counting" else s for s in bench.samples])
    records, summary = training_records(bare, multi_turn=0.4, options=0.4)
    assert summary["not_possible"]["multi_turn"] == 40 and summary["by_task"]["counting"]["multi_turn"] == 0
    assert summary["by_task"]["common"]["multi_turn"] == 8
    counting = [r for r in records if r["id"].startswith("counting")]
    assert all(len(r["conversations"]) == 2 for r in counting)
    # options need only a bare count: the one-class queries can take them, "a: 2, b: 1" cannot
    one_class = sum(s.gt.isdigit() for s in bare.samples if s.task == "counting")
    assert sum("\nA. " in r["conversations"][0]["value"] for r in counting) == min(16, one_class)
    assert summary["not_possible"]["options"] == 40 - one_class


def test_user_errors_are_one_message_and_exit_code_2(shapes, tmp_path, capsys):
    code, _, err = run_cli(["export-training", "--out", str(tmp_path / "t.json")], capsys)
    assert code == 2 and "--data" in err
    code, _, err = run_cli(["export-training", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "t.json")],
                           capsys)
    assert code == 2 and "is not a MIMIC benchmark folder" in err and "Traceback" not in err
    code, _, err = run_cli(["export-training", "--data", str(shapes / "bench"), "--out", str(tmp_path / "t.json"),
                            "--multi-turn", "0.7", "--options", "0.5"], capsys)
    assert code == 2 and "add up to more than 1" in err
    code, _, err = run_cli(["export-training", "--data", str(shapes / "bench"), "--out", str(tmp_path / "t.json"),
                            "--options", "1.5"], capsys)
    assert code == 2 and "Invalid value for '--options'" in err
    code, _, err = run_cli(["export-training", "--data", str(shapes / "bench"), "--out", str(tmp_path / "t.txt")],
                           capsys)
    assert code == 2 and ".json" in err
    assert not list(tmp_path.glob("t.*"))
    with pytest.raises(InputError, match="holds no samples"):
        training_records(dataclasses.replace(load_benchmark(shapes / "bench"), samples=[]))
