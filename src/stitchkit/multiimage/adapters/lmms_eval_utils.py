"""lmms-eval callbacks for a MIMIC benchmark exported by stitchkit (`stitchkit mimic export`).

Copied verbatim as `utils.py` into the exported task folder, next to `mimic_protocol.py` (the scorer shared
with stitchkit and the VLMEvalKit adapter) and `mimic_vocabulary.json` (the benchmark's class names). Run:

    lmms-eval --model ... --include_path <export>/lmms_eval/mimic --tasks mimic --batch_size 1

Group `mimic` scores in clean mode, group `mimic_legacy` with the official scorer's quirks; they differ only in
the callbacks. Parsing happens in process_results (no lmms-eval filters), and every record carries the sample's
control variables, so lmms-eval's sample logs can be broken down afterwards.
"""

import importlib.util
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("mimic_protocol", os.path.join(_HERE, "mimic_protocol.py"))
protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol)

with open(os.path.join(_HERE, "mimic_vocabulary.json")) as _f:
    VOCABULARY = protocol.Vocabulary(json.load(_f))

CONTROLS = ("id", "task", "cell", "n_images", "spread", "n_distractors", "k", "balanced", "total_count", "category",
            "template_id", "odd_images")


def doc_to_visual(doc):
    """The sample's images, in order, as RGB PIL images."""
    return [image.convert("RGB") for image in doc["images"]]


def _text(doc, lmms_eval_specific_kwargs, legacy):
    kwargs = lmms_eval_specific_kwargs or {}
    prompt = protocol.prompt_text(doc["task"], doc["question"], legacy=legacy)
    return kwargs.get("pre_prompt", "") + prompt + kwargs.get("post_prompt", "")


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The text turn without image tokens (the model wrapper puts the images first, as the official runs did)."""
    return _text(doc, lmms_eval_specific_kwargs, legacy=False)


def doc_to_text_legacy(doc, lmms_eval_specific_kwargs=None):
    return _text(doc, lmms_eval_specific_kwargs, legacy=True)


def doc_to_target(doc):
    return doc["gt"]


def _records(doc, results, mode):
    generation = results[0] if results else ""
    record = {key: doc[key] for key in CONTROLS}
    record.update(mode=mode, pred=generation, gt=doc["gt"],
                  score=protocol.score_sample(doc, generation, mode, VOCABULARY))
    metrics = {f"{doc['task']}_score_overall": record, "mimic_score": record}
    if doc["task"] == "listing":
        metrics.update(listing_precision=record, listing_recall=record)
    return metrics


def process_results(doc, results):
    return _records(doc, results, "clean")


def process_results_legacy(doc, results):
    return _records(doc, results, "legacy_official")


def _aggregate(records):
    return protocol.aggregate(records[0]["task"], [r["score"] for r in records], records[0]["mode"])


def aggregate_score(records):
    """Accuracy (counting, common, odd-one) or micro F1 (listing), in [0, 1]."""
    return _aggregate(records)["score"]


def aggregate_precision(records):
    return _aggregate(records)["precision"]


def aggregate_recall(records):
    return _aggregate(records)["recall"]
