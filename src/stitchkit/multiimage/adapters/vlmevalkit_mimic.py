"""VLMEvalKit dataset class for a MIMIC benchmark exported by stitchkit (`stitchkit mimic export`).

Copied as `mimic.py` (with this export's facts filled in below); put it, `mimic_protocol.py` and
`mimic_vocabulary.json` in `vlmeval/dataset/`, register the class (see README.md of the export), and put MIMIC.tsv
in $LMUData. Scoring uses the same `mimic_protocol` module as stitchkit and the lmms-eval adapter; no judge model
is needed.

Two families of dataset names read the same TSV, like lmms-eval's groups `mimic` and `mimic_legacy`: MIMIC,
MIMIC_Counting, ... send the clean prompt and score in clean mode (legacy_official=True in the judge kwargs scores
their predictions with the official scorer); MIMIC_Legacy, MIMIC_Legacy_Counting, ... send the official prompt
(a Listing question ending in "?" keeps it before ". Please ...") and score with the official scorer.
"""

import json
import os.path as osp
from collections import defaultdict

import pandas as pd

from ..smp import LMUDataRoot, dump, load, toliststr
from . import mimic_protocol as protocol
from .image_base import ImageBaseDataset

# Filled in at export: the MD5 of MIMIC.tsv, and the scoring modes the exported benchmark supports (the released
# MIMIC data: legacy_official only, as its rows lack the classes, per-image counts and vocabulary clean scoring needs).
TSV_MD5 = None
SCORING_MODES = ("clean", "legacy_official")

CONTROLS = ("n_images", "spread", "n_distractors", "k", "balanced", "total_count", "category", "template_id",
            "odd_images")
CLEAN_DATASETS = {"MIMIC": None, "MIMIC_Counting": "counting", "MIMIC_Common": "common", "MIMIC_OddOne": "oddone",
                  "MIMIC_Listing": "listing"}  # dataset name -> the task it keeps (None: all)
LEGACY_NAME = {name: name.replace("MIMIC", "MIMIC_Legacy", 1) for name in CLEAN_DATASETS}
TASK_OF_DATASET = {**CLEAN_DATASETS, **{LEGACY_NAME[name]: task for name, task in CLEAN_DATASETS.items()}}


def _json_cell(value):
    """A JSON column of the TSV; an empty cell (pandas reads it, and `null`, as NaN) is None."""
    return json.loads(value) if isinstance(value, str) else None


class MIMICDataset(ImageBaseDataset):
    TYPE = "VQA"
    # One local file, $LMUData/MIMIC.tsv, for every name; the per-task names keep that task's rows.
    DATASET_URL = dict.fromkeys(TASK_OF_DATASET, "MIMIC.tsv")
    DATASET_MD5 = dict.fromkeys(TASK_OF_DATASET, TSV_MD5) if TSV_MD5 else {}

    @classmethod
    def supported_datasets(cls):
        return list(cls.DATASET_URL)

    @property
    def legacy_official(self):
        """Whether this name sends the official prompt and scores with the official scorer (MIMIC_Legacy...)."""
        return self.dataset_name not in CLEAN_DATASETS

    def load_data(self, dataset):
        path = osp.join(LMUDataRoot(), self.DATASET_URL[dataset])
        if not osp.exists(path):
            raise FileNotFoundError(f"{path} not found: copy MIMIC.tsv written by `stitchkit mimic export` to $LMUData")
        data = load(path)
        if TASK_OF_DATASET[dataset] is not None:
            data = data[data["task"] == TASK_OF_DATASET[dataset]].reset_index(drop=True)
        return data

    def build_prompt(self, line):
        """One image message per image, in order, then the exact MIMIC prompt text (the official one for the
        legacy names)."""
        if isinstance(line, int):
            line = self.data.iloc[line]
        paths = toliststr(line["image_path"]) if self.meta_only else self.dump_image(line)
        messages = [dict(type="image", value=p) for p in paths]
        text = protocol.prompt_text(line["task"], line["question"], legacy=self.legacy_official)
        messages.append(dict(type="text", value=text))
        return messages

    def evaluate(self, eval_file, **judge_kwargs):
        """Per-task scores (clean mode; the official scorer for the legacy names or with legacy_official=True) and
        breakdowns by every control variable, written beside `eval_file` as <name>_score.csv."""
        mode = "legacy_official" if self.legacy_official or judge_kwargs.get("legacy_official") else "clean"
        if mode not in SCORING_MODES:
            raise ValueError(
                f"this MIMIC export cannot be scored in {mode} mode, only in {' or '.join(SCORING_MODES)}: its "
                "rows (the released MIMIC data) lack the classes, per-image counts and class vocabulary clean "
                f"scoring needs. Evaluate the dataset {LEGACY_NAME.get(self.dataset_name, 'MIMIC_Legacy')} (the "
                "official prompt and scorer), or pass legacy_official=True to score these predictions with the "
                "official scorer."
            )
        with open(osp.join(osp.dirname(osp.abspath(__file__)), "mimic_vocabulary.json")) as f:
            vocab = protocol.Vocabulary(json.load(f))
        data = load(eval_file)
        scored = defaultdict(list)
        for _, row in data.iterrows():
            sample = {"task": row["task"], "gt": str(row["answer"]), "classes": _json_cell(row["classes"]),
                      "counts_per_image": _json_cell(row["counts_per_image"])}
            prediction = "" if pd.isna(row["prediction"]) else str(row["prediction"])
            scored[row["task"]].append((row, protocol.score_sample(sample, prediction, mode, vocab)))
        rows = []
        for task, items in scored.items():
            rows.append({"task": task, "variable": "all", "value": "all", "n": len(items),
                         "score": protocol.aggregate(task, [s for _, s in items], mode)["score"]})
            for variable in CONTROLS:
                groups = defaultdict(list)
                for row, score in items:
                    groups[str(row[variable])].append(score)
                if len(groups) > 1:
                    for value, scores in sorted(groups.items()):
                        rows.append({"task": task, "variable": variable, "value": value, "n": len(scores),
                                     "score": protocol.aggregate(task, scores, mode)["score"]})
        average = protocol.mimic_average({r["task"]: r["score"] for r in rows if r["variable"] == "all"})
        if average is not None:
            rows.append({"task": "MIMIC Avg", "variable": "all", "value": "all", "n": len(data), "score": average})
        result = pd.DataFrame(rows)
        result.insert(0, "mode", mode)
        dump(result, eval_file.rsplit(".", 1)[0] + "_score.csv")
        return result
