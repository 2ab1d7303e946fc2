"""MIMIC training data in LLaVA conversation format, for LLaVA-NeXT's trainer (reference mimic.md section 5;
`stitchkit mimic export-training`).

One record per sample of a built benchmark, in a seeded random order (so LLaVA-NeXT's `first:X%` sampling takes a
mix of the four tasks), as LLaVA-NeXT's `LazySupervisedDataset` reads it:

    {"id": "counting-000001", "image": ["images/000068.png", ...],
     "conversations": [{"from": "human", "value": "<image>\\n<image>\\nQuestion: ...\\nAnswer:"},
                       {"from": "gpt", "value": "4"}, ...]}

`image` lists the files relative to the benchmark's images root, which is the trainer's `--image_folder` (it joins
the two). The first human turn holds one `<image>` per image, each on its own line, then the evaluation prompt
(`Sample.prompt()`): with more than one `<image>` LLaVA-NeXT leaves the text as written and splices each image in
at its placeholder. Three kinds of record, the shares per task given by the caller (section 5: 20% each):

    single      the evaluation question and its ground truth
    options     the question, a lettered option list (the ground truth among seeded distractors of its own kind)
                and "Answer with the option's letter and its text."; the answer is the option line, "B. 4"
    multi_turn  the evaluation question, then 1-2 follow-up questions on the same images (no further <image>),
                each answered from the sample's own record (per-image counts), never guessed

A record whose sample does not carry what its kind needs (e.g. the released data, which has no per-image counts)
is left to the other kinds; the summary says how many could not take each kind.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from stitchkit.errors import InputError
from stitchkit.multiimage.benchmark import Benchmark, Sample
from stitchkit.multiimage.protocol import TASKS, counting_gt, plural, prompt_text
from stitchkit.multiimage.templates import TEMPLATES, question_text

FORMAT = "stitchkit-mimic-llava/1"
KINDS = ("single", "multi_turn", "options")
IMAGE_TOKEN = "<image>"
LETTERS = "ABCD"
OPTION_INSTRUCTION = "Answer with the option's letter and its text."
COUNT_SPAN = 3  # counting options lie within this distance of the count
FOLLOWUPS_PER_RECORD = (1, 2)  # multi-turn records have 2-3 turns


@dataclass(frozen=True)
class Turn:
    prompt: str  # the human text after the images (the first turn) or on its own (follow-ups)
    answer: str
    kind: str = "main"  # main | options | one of the follow-up kinds


# -- option lists ------------------------------------------------------------------------------------------------


def counting_totals(sample: Sample) -> Optional[list[int]]:
    """Per queried class, its total over the images: from the per-image counts, or the released data's bare gt."""
    if sample.counts_per_image is not None:
        return [sum(column) for column in zip(*sample.counts_per_image)]
    return [int(sample.gt)] if sample.gt.isdigit() else None


def counting_options(sample: Sample, rng: random.Random) -> Optional[tuple[list[str], str]]:
    """One class: four consecutive counts containing the true one, the window placed at random (so the answer's
    rank is not given away), ascending. Several classes: the true totals with one class's count moved by 1 or 2."""
    totals = counting_totals(sample)
    if totals is None:
        return None
    classes = sample.classes or []
    gt = counting_gt(classes, totals)
    if len(totals) == 1:
        start = rng.randint(max(0, totals[0] - COUNT_SPAN), totals[0])
        return [str(v) for v in range(start, start + len(LETTERS))], gt
    shifted = sorted({counting_gt(classes, [t + delta if j == i else t for j, t in enumerate(totals)])
                      for i in range(len(totals)) for delta in (-2, -1, 1, 2) if totals[i] + delta >= 0})
    options = [gt, *rng.sample(shifted, min(len(LETTERS) - 1, len(shifted)))]
    rng.shuffle(options)
    return options, gt


def class_options(sample: Sample, class_names: list[str], rng: random.Random) -> Optional[tuple[list[str], str]]:
    """Common / odd-one: other classes of the benchmark. Odd-one's majority class -- in most images, so surely not
    the odd one -- is always among them, as the hardest wrong answer."""
    hard = [c for c in (sample.classes or [])[1:] if c != sample.gt]
    others = [c for c in class_names if c != sample.gt and c not in hard]
    wrong = hard + rng.sample(others, min(len(LETTERS) - 1 - len(hard), len(others)))
    if not wrong:
        return None
    options = [sample.gt, *wrong]
    rng.shuffle(options)
    return options, sample.gt


def listing_options(sample: Sample, groups: dict[str, list[str]], rng: random.Random) -> Optional[tuple[list[str], str]]:
    """Listing: the true set of member classes and sets one edit away from it -- a member added, one dropped, or
    one swapped for an absent member -- each alphabetical, as the ground truth is."""
    members = groups.get(sample.category or "")
    if not members or sample.classes is None:
        return None
    present = set(sample.classes)
    absent = [m for m in members if m not in present]
    edits = [present | {m} for m in absent]
    if len(present) > 1:
        edits += [present - {c} for c in sorted(present)]
    edits += [(present - {c}) | {m} for c in sorted(present) for m in absent]
    texts = sorted({", ".join(sorted(s)) for s in edits})
    if not texts:
        return None
    gt = ", ".join(sorted(present))
    options = [gt, *rng.sample(texts, min(len(LETTERS) - 1, len(texts)))]
    rng.shuffle(options)
    return options, gt


def option_turn(sample: Sample, meta: dict, rng: random.Random) -> Optional[Turn]:
    """The sample's question with a lettered option list; None when its record lacks what the options need."""
    if sample.task == "counting":
        made = counting_options(sample, rng)
    elif sample.task == "listing":
        made = listing_options(sample, meta.get("supercategories") or {}, rng)
    else:
        made = class_options(sample, meta.get("class_names") or [], rng)
    if made is None:
        return None
    options, gt = made
    question = sample.question
    if sample.task == "listing":  # listing templates have no end punctuation (the eval prompt appends a sentence)
        question = question.rstrip("?.!") + ("?" if question.startswith("Which") else ".")
    lines = [f"{letter}. {text}" for letter, text in zip(LETTERS, options)]
    prompt = "\n".join([f"Question: {question}", *lines, OPTION_INSTRUCTION, "Answer:"])
    return Turn(prompt, lines[options.index(gt)], "options")


# -- follow-up questions -----------------------------------------------------------------------------------------


def exact_classes(sample: Sample) -> list[int]:
    """Positions in `sample.classes` whose per-image counts are complete: no image of the sample holds a crowd
    region of them (the generator draws targets only where a class is eligible, and distractors free of it), so
    "present" is "count > 0". Odd-one's majority class is not among them: an odd image may show it, crowd included
    (`pure: false`), and the record does not say."""
    if not sample.classes or sample.counts_per_image is None:
        return []
    if sample.task in ("counting", "listing"):
        return list(range(len(sample.classes)))
    return [0]  # common: the common class; odd-one: the odd class


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def followup(sample: Sample, kind: str, j: int, rng: random.Random) -> Turn:
    """One follow-up about class `sample.classes[j]`, answered from the per-image counts."""
    name, counts = sample.classes[j], [row[j] for row in sample.counts_per_image]
    if kind == "class_total":
        template = rng.randrange(len(TEMPLATES["counting"]))
        question, answer = question_text("counting", template, classes=[name]), sum(counts)
    elif kind == "images_with_class":
        question, answer = f"How many of these images contain at least one {name}?", sum(c > 0 for c in counts)
    else:  # count_in_image
        position = rng.randrange(len(counts))
        question, answer = f"How many {plural(name)} are there in the {ordinal(position + 1)} image?", counts[position]
    return Turn(prompt_text("counting", question), str(answer), kind)


def followup_turns(sample: Sample, rng: random.Random) -> list[Turn]:
    """1-2 distinct follow-ups, each a different (question kind, class); none when the record has no exact counts.
    A one-class counting query already asks for the total, so it gets no total follow-up."""
    choices = []
    for j in exact_classes(sample):
        if not (sample.task == "counting" and len(sample.classes) == 1):
            choices.append(("class_total", j))
        choices += [("images_with_class", j), ("count_in_image", j)]
    if not choices:
        return []
    picked = rng.sample(choices, min(rng.choice(FOLLOWUPS_PER_RECORD), len(choices)))
    return [followup(sample, kind, j, rng) for kind, j in picked]


# -- records -----------------------------------------------------------------------------------------------------


def sample_rng(seed: int, sample: Sample, purpose: str) -> random.Random:
    """A record's own stream (string seeds hash with SHA-512: stable), so its content does not depend on the
    others; one per purpose, so the option list and the follow-ups do not shift each other."""
    return random.Random(f"mimic-llava:{seed}:{sample.id}:{purpose}")


def share(fraction: float, n: int) -> int:
    return math.floor(fraction * n + 0.5)


def assign_kinds(candidates: dict[str, dict[str, object]], samples: list[Sample], multi_turn: float,
                 options: float, seed: int) -> dict[str, str]:
    """Per task, a seeded permutation of its samples: the first round(options * n) that can take an option list get
    one, the next round(multi_turn * n) that have follow-ups get them, the rest stay single."""
    kinds = {}
    for task in TASKS:
        ids = [s.id for s in samples if s.task == task]
        random.Random(f"mimic-llava:{seed}:{task}").shuffle(ids)
        wanted = {"options": share(options, len(ids)), "multi_turn": share(multi_turn, len(ids))}
        for sample_id in ids:
            kind = next((k for k in ("options", "multi_turn") if wanted[k] and candidates[sample_id][k]), "single")
            if kind != "single":
                wanted[kind] -= 1
            kinds[sample_id] = kind
    return kinds


def record(sample: Sample, turns: list[Turn]) -> dict:
    images = "\n".join([IMAGE_TOKEN] * len(sample.images))
    conversations = []
    for number, turn in enumerate(turns):
        human = f"{images}\n{turn.prompt}" if number == 0 else turn.prompt
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": turn.answer}]
    return {"id": sample.id, "image": list(sample.images), "conversations": conversations}


def training_records(bench: Benchmark, multi_turn: float = 0.2, options: float = 0.2,
                     seed: int = 0) -> tuple[list[dict], dict]:
    """The LLaVA records of every sample of `bench` (in a seeded order) and the counts of what was emitted."""
    for name, value in (("multi-turn", multi_turn), ("options", options)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"the {name} share must lie in [0, 1], not {value}")
    if multi_turn + options > 1.0:
        raise InputError(f"the multi-turn and option shares ({multi_turn} + {options}) add up to more than 1: a record "
                         "is either multi-turn or carries an option list")
    if not bench.samples:
        raise InputError(f"{bench.root} holds no samples to export")
    candidates = {s.id: {"options": option_turn(s, bench.meta, sample_rng(seed, s, "options")),
                         "multi_turn": followup_turns(s, sample_rng(seed, s, "multi_turn"))} for s in bench.samples}
    kinds = assign_kinds(candidates, bench.samples, multi_turn, options, seed)
    records, turn_counts, followups = [], Counter(), Counter()
    by_task = {t: Counter() for t in bench.tasks()}
    for sample in bench.samples:
        kind = kinds[sample.id]
        main = Turn(sample.prompt(), sample.gt)
        turns = {"single": [main], "options": [candidates[sample.id]["options"]],
                 "multi_turn": [main, *candidates[sample.id]["multi_turn"]]}[kind]
        records.append(record(sample, turns))
        by_task[sample.task][kind] += 1
        turn_counts[len(turns)] += 1
        followups.update(t.kind for t in turns[1:])
    random.Random(f"mimic-llava:{seed}:order").shuffle(records)
    summary = {
        "format": FORMAT,
        "benchmark": str(bench.root.resolve()),
        "image_folder": str(bench.images_root.resolve()),
        "seed": seed,
        "requested": {"multi_turn": multi_turn, "options": options},
        "records": len(records),
        "kinds": {k: sum(c[k] for c in by_task.values()) for k in KINDS},
        "turns": {str(n): turn_counts[n] for n in sorted(turn_counts)},
        "followups": dict(sorted(followups.items())),
        "by_task": {t: {k: c[k] for k in KINDS} for t, c in by_task.items()},
        "not_possible": {k: sum(not c[k] for c in candidates.values()) for k in ("options", "multi_turn")},
    }
    return records, summary


def summary_path(out: Path) -> Path:
    """FILE.json -> FILE.summary.json, beside it."""
    return out.with_name(f"{out.stem}.summary.json")


def export_training(bench: Benchmark, out: str | os.PathLike, multi_turn: float = 0.2, options: float = 0.2,
                    seed: int = 0) -> dict:
    """Write the records to `out` (.json: a list, one record per line; .jsonl: one per line, both of which
    LLaVA-NeXT reads) and the counts to FILE.summary.json, each atomically; returns the counts."""
    from stitchkit.runs import atomic_write_json, atomic_write_text

    out = Path(out)
    if out.suffix not in (".json", ".jsonl"):
        raise InputError(f"--out {out}: LLaVA-NeXT reads .json or .jsonl files; name the output FILE.json")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name (FILE.json)")
    records, summary = training_records(bench, multi_turn, options, seed)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    text = "\n".join(lines) + "\n" if out.suffix == ".jsonl" else "[\n" + ",\n".join(lines) + "\n]\n"
    atomic_write_text(out, text)
    atomic_write_json(summary_path(out), {**summary, "records_file": out.name})
    return summary
