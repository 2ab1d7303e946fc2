"""VLMEvalKit dataset class for a MIMIC benchmark exported by stitchkit (`stitchkit mimic export`).

Copied verbatim as `mimic.py`; put it, `mimic_protocol.py` and `mimic_vocabulary.json` in `vlmeval/dataset/`,
register the class (see README.md of the export), and put MIMIC.tsv in $LMUData. Scoring uses the same
`mimic_protocol` module as stitchkit and the lmms-eval adapter; no judge model is needed.
"""

import json
import os.path as osp
from collections import defaultdict

import pandas as pd

from ..smp import LMUDataRoot, dump, load, toliststr
from . import mimic_protocol as protocol
from .image_base import ImageBaseDataset

CONTROLS = ("n_images", "spread", "n_distractors", "k", "balanced", "category", "template_id")
TASK_OF_DATASET = {"MIMIC_Counting": "counting", "MIMIC_Common": "common", "MIMIC_OddOne": "oddone",
                   "MIMIC_Listing": "listing"}


class MIMICDataset(ImageBaseDataset):
    TYPE = "VQA"
    # One local file, $LMUData/MIMIC.tsv, for every name; the per-task names keep that task's rows.
    # The MD5 is that of the exported file (filled in at export).
    DATASET_URL = {name: "MIMIC.tsv" for name in ("MIMIC", *TASK_OF_DATASET)}
    DATASET_MD5 = {}

    @classmethod
    def supported_datasets(cls):
        return list(cls.DATASET_URL)

    def load_data(self, dataset):
        path = osp.join(LMUDataRoot(), self.DATASET_URL[dataset])
        if not osp.exists(path):
            raise FileNotFoundError(f"{path} not found: copy MIMIC.tsv written by `stitchkit mimic export` to $LMUData")
        data = load(path)
        if dataset in TASK_OF_DATASET:
            data = data[data["task"] == TASK_OF_DATASET[dataset]].reset_index(drop=True)
        return data

    def build_prompt(self, line):
        """One image message per image, in order, then the exact MIMIC prompt text."""
        if isinstance(line, int):
            line = self.data.iloc[line]
        paths = toliststr(line["image_path"]) if self.meta_only else self.dump_image(line)
        messages = [dict(type="image", value=p) for p in paths]
        messages.append(dict(type="text", value=protocol.prompt_text(line["task"], line["question"])))
        return messages

    def evaluate(self, eval_file, **judge_kwargs):
        """Per-task scores (clean mode; legacy_official=True for the official scorer) and breakdowns by every
        control variable, written beside `eval_file` as <name>_score.csv."""
        mode = "legacy_official" if judge_kwargs.get("legacy_official") else "clean"
        with open(osp.join(osp.dirname(osp.abspath(__file__)), "mimic_vocabulary.json")) as f:
            vocab = protocol.Vocabulary(json.load(f))
        data = load(eval_file)
        scored = defaultdict(list)
        for _, row in data.iterrows():
            sample = {"task": row["task"], "gt": str(row["answer"]), "classes": json.loads(row["classes"]),
                      "counts_per_image": json.loads(row["counts_per_image"])}
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
