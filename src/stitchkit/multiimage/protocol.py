"""The MIMIC evaluation protocol: prompt text, answer parsers and metrics, in two modes.

    legacy_official  bit-for-bit the released scorer (anurag-198/MIMIC, lmms-eval fork, commit dc19c82),
                     quirks included (reference mimic.md section 4.1)
    clean            the library default (section 4.2): normalised text, a class vocabulary with aliases,
                     exact-set matching for Common / Odd-One, real list splitting for Listing

This file uses the standard library only and is copied verbatim into the lmms-eval and VLMEvalKit exports
(as `mimic_protocol.py`), so all three consumers (stitchkit, lmms-eval, VLMEvalKit) score with the same code.
Per-sample functions return plain dicts; the aggregations turn lists of them into task scores in [0, 1].
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

TASKS = ("counting", "listing", "common", "oddone")
MODES = ("clean", "legacy_official")

# --------------------------------------------------------------------------------------------------------------
# prompts (reference section 3)
# --------------------------------------------------------------------------------------------------------------

LISTING_SUFFIX = ". Please provide the list of category names directly."
GENERATION_MAX_NEW_TOKENS = {"counting": 16, "common": 16, "oddone": 16, "listing": 32}


def prompt_text(task: str, question: str, legacy: bool = False) -> str:
    """The text turn after the images: "Question: {q}\\nAnswer:" (Listing adds the list instruction).

    The official Listing prompt appends ". Please ..." even after a question mark ("?."); legacy mode keeps
    that, clean mode drops the question's own final punctuation first.
    """
    if task == "listing":
        if not legacy:
            question = question.rstrip().rstrip("?.!")
        return f"Question: {question}{LISTING_SUFFIX}\nAnswer:"
    return f"Question: {question}\nAnswer:"


# --------------------------------------------------------------------------------------------------------------
# legacy_official parsers (reference section 4.1)
# --------------------------------------------------------------------------------------------------------------

_LEGACY_STRIP_CHARS = (",", ".", "!", "?", ";", ":", "'")

_W2N_WORDS = {
    **{w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )},
    **{w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())},
    "hundred": 100,
    "thousand": 1000,
    "million": 1000000,
    "billion": 1000000000,
}
_W2N_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _w2n_group(words: list[str]) -> int:
    """word2number 1.1's `number_formation`: how it combines the words before a scale word.

    Its rules are positional, not grammatical: 4 words -> a*b + c + d, 3 -> a*b + c, 2 -> a*b if one of them is
    "hundred" else a + b, anything else -> the first value. An empty group raises IndexError.
    """
    values = [_W2N_WORDS[w] for w in words]
    if len(values) == 4:
        return values[0] * values[1] + values[2] + values[3]
    if len(values) == 3:
        return values[0] * values[1] + values[2]
    if len(values) == 2:
        return values[0] * values[1] if 100 in values else values[0] + values[1]
    return values[0]


def legacy_word_to_num(text: str) -> int | float:
    """Behaviour-equivalent re-implementation of `word2number.w2n.word_to_num` (PyPI word2number 1.1).

    The official counting parser calls it; we re-implement it (rather than depend on the package) and keep
    every quirk: non-number words are silently dropped ("four zebras" -> 4), "point" starts a decimal part,
    a repeated scale word is an error. Raises ValueError / IndexError exactly where the original raises.
    """
    if not isinstance(text, str):
        raise ValueError("input is not a string")
    text = text.replace("-", " ").lower()
    if text.isdigit():
        return int(text)  # "²".isdigit() is True but int() raises ValueError, as in the original
    words = [w for w in text.strip().split() if w in _W2N_WORDS or w == "point"]
    if not words:
        raise ValueError("no valid number words found")
    if any(words.count(w) > 1 for w in ("thousand", "million", "billion", "point")):
        raise ValueError("redundant number word")
    decimals: list[str] = []
    if "point" in words:
        at = words.index("point")
        words, decimals = words[:at], words[at + 1 :]
    billion = words.index("billion") if "billion" in words else -1
    million = words.index("million") if "million" in words else -1
    thousand = words.index("thousand") if "thousand" in words else -1
    if (thousand > -1 and (thousand < million or thousand < billion)) or (million > -1 and million < billion):
        raise ValueError("malformed number")

    total: int | float = 0
    if len(words) == 1:
        total += _W2N_WORDS[words[0]]
    elif len(words) > 1:
        if billion > -1:
            total += _w2n_group(words[:billion]) * 1000000000
        if million > -1:
            total += _w2n_group(words[billion + 1 : million] if billion > -1 else words[:million]) * 1000000
        if thousand > -1:
            if million > -1:
                group = words[million + 1 : thousand]
            elif billion > -1:
                group = words[billion + 1 : thousand]
            else:
                group = words[:thousand]
            total += _w2n_group(group) * 1000
        last = len(words) - 1
        if thousand > -1 and thousand != last:
            total += _w2n_group(words[thousand + 1 :])
        elif million > -1 and million != last:  # also when 'thousand' is last: w2n 1.1 counts that group twice
            total += _w2n_group(words[million + 1 :])
        elif billion > -1 and billion != last:
            total += _w2n_group(words[billion + 1 :])
        elif thousand == million == billion == -1:
            total += _w2n_group(words)
    if decimals:
        if all(w in _W2N_DIGIT_WORDS for w in decimals):
            total += float("0." + "".join(str(_W2N_WORDS[w]) for w in decimals))
    return total


def legacy_filter(generation: str) -> str:
    """The official filter joins the generations of one document as ' ' + g: the scored text starts with a space."""
    return " " + generation


def legacy_parse_count(response: str) -> str:
    """The official counting parser: strip edge punctuation, then int(), word2number, the first digit run, or
    'wrong answer'.

    `response` is the filtered text (leading space included). Each character is stripped from both ends in
    turn (all repeats of it, whitespace untouched), so " 4." -> " 4" -> "4" and " four zebras" -> "4".
    """
    for char in _LEGACY_STRIP_CHARS:
        response = response.strip(char)
    try:
        return str(int(response))
    except ValueError:
        pass
    try:
        return str(legacy_word_to_num(response))
    except (ValueError, IndexError):
        pass
    digits = re.findall(r"\d+", response)
    return digits[0] if digits else "wrong answer"


def legacy_score_counting(generation: str, gt: str) -> dict:
    parsed = legacy_parse_count(legacy_filter(generation))
    return {"parsed": parsed, "correct": parsed.lower().strip() == str(gt).lower().strip()}


def legacy_score_choice(generation: str, gt: str) -> dict:
    """Common and Odd-One: the ground truth is a substring of the prediction ("dog" matches "hot dog")."""
    return {"correct": gt.lower().strip() in legacy_filter(generation).lower().strip()}


def legacy_score_listing(generation: str, gt: str) -> dict:
    """Split on the exact ", " with no strip: the first predicted item keeps the filter's leading space."""
    pred_items = [item.lower() for item in legacy_filter(generation).split(", ")]
    gt_items = [item.lower() for item in gt.split(", ")]
    matched = sum(1 for item in gt_items if item in pred_items)
    return {"matched": matched, "n_pred": len(pred_items), "n_gt": len(gt_items)}


# --------------------------------------------------------------------------------------------------------------
# clean mode (reference section 4.2)
# --------------------------------------------------------------------------------------------------------------

# Synonyms a model plausibly uses for COCO classes; plurals are generated. Matched longest-first, so
# "hot dog" wins over "dog" and "wine glass" over "glass".
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("people", "persons", "man", "men", "woman", "women", "child", "children", "kid", "kids", "boy",
               "boys", "girl", "girls", "human", "humans", "player", "players"),
    "bicycle": ("bike", "bikes", "cycle"),
    "car": ("automobile", "automobiles"),
    "motorcycle": ("motorbike", "motorbikes"),
    "airplane": ("plane", "planes", "aeroplane", "aeroplanes", "aircraft", "jet", "jets"),
    "tv": ("television", "televisions", "tv set", "tvs"),
    "couch": ("sofa", "sofas"),
    "cell phone": ("phone", "phones", "mobile phone", "mobile phones", "smartphone", "smartphones", "cellphone",
                   "cellphones"),
    "dining table": ("table", "tables"),
    "hair drier": ("hair dryer", "hair dryers", "hairdryer", "hairdryers"),
    "donut": ("doughnut", "doughnuts"),
    "sports ball": ("ball", "balls"),
    "potted plant": ("plant", "plants", "houseplant", "houseplants"),
    "mouse": ("computer mouse",),
    "laptop": ("notebook computer",),
}

_IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "sheep": "sheep", "knife": "knives", "skis": "skis",
                      "scissors": "scissors", "shelf": "shelves", "leaf": "leaves", "child": "children"}


def plural(name: str) -> str:
    """English plural of a class name ("bus" -> "buses", "wine glass" -> "wine glasses", "person" -> "people")."""
    head, _, last = name.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        word = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


_LEADING_ANSWER = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*")


def normalize(text: str) -> str:
    """NFKC, lowercase, collapse spaces, drop a leading "answer:" / "the answer is", trim edge punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"\s+", " ", text).strip()
    text = _LEADING_ANSWER.sub("", text)
    return text.strip(" \t\n.,;:!?\"'`*()[]{}-")


class Vocabulary:
    """Class names plus aliases (plurals, synonyms), found in free text longest-first on word boundaries."""

    def __init__(self, class_names: Iterable[str], synonyms: dict[str, Sequence[str]] | None = None):
        synonyms = COCO_SYNONYMS if synonyms is None else synonyms
        self.class_names = list(dict.fromkeys(class_names))
        alias_to_class: dict[str, str] = {}
        # class names and their plurals first, so a synonym never steals a real class name ("table" vs a
        # hypothetical class "table")
        for name in self.class_names:
            for alias in (name.lower(), plural(name.lower())):
                alias_to_class.setdefault(alias, name)
        for name in self.class_names:
            for alias in synonyms.get(name, ()):
                alias_to_class.setdefault(alias.lower(), name)
        self.alias_to_class = alias_to_class
        aliases = sorted(alias_to_class, key=lambda a: (-len(a), a))
        self._pattern = re.compile(r"(?<![\w])(" + "|".join(re.escape(a) for a in aliases) + r")(?![\w])")

    def mentions(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, class name) of every class mention in normalised `text`, left to right."""
        return [(m.start(), m.end(), self.alias_to_class[m.group(1)]) for m in self._pattern.finditer(text)]

    def classes_in(self, text: str) -> list[str]:
        return list(dict.fromkeys(name for _, _, name in self.mentions(normalize(text))))

    def map_item(self, item: str) -> str:
        """One list item -> the class it names (its first mention), or the normalised item if it names none."""
        item = normalize(item)
        found = self.mentions(item)
        return found[0][2] if found else item


_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_TOKEN = re.compile(r"\d+|[a-z]+")


def find_numbers(text: str) -> list[tuple[int, int, int]]:
    """(start, end, value) of every integer in normalised `text`: digit runs and number words, compounds included.

    "twenty-one", "twenty one", "one hundred and five" are one number each; "none" is 0.
    """
    numbers: list[tuple[int, int, int]] = []
    current: list = []  # [start, end, value] of the number being read

    def close() -> None:
        if current:
            numbers.append((current[0], current[1], current[2]))
            current.clear()

    tokens = list(_TOKEN.finditer(text.replace("-", " ")))
    for i, match in enumerate(tokens):
        word = match.group()
        if word.isdigit():
            close()
            numbers.append((match.start(), match.end(), int(word)))
        elif word in _UNITS or word in _TENS:
            value = _UNITS.get(word, _TENS.get(word))
            # "twenty one" continues a tens word; "hundred and five" continues a hundred
            if current and (current[2] % 10 == 0 and current[2] % 100 != 0 and word in _UNITS and value < 10
                            or current[2] % 100 == 0 and current[2] >= 100):
                current[1], current[2] = match.end(), current[2] + value
            else:
                close()
                current.extend([match.start(), match.end(), value])
        elif word == "hundred" and current and 0 < current[2] < 10:
            current[1], current[2] = match.end(), current[2] * 100
        elif word == "and" and current and current[2] >= 100 and i + 1 < len(tokens) and (
            tokens[i + 1].group() in _UNITS or tokens[i + 1].group() in _TENS
        ):
            continue
        elif word == "none":
            close()
            numbers.append((match.start(), match.end(), 0))
        else:
            close()
    close()
    return numbers


def _no_class_zeros(text: str, vocab: Vocabulary) -> list[tuple[int, int, int, str]]:
    """ "no zebras" / "no zebra" -> (start, end, 0, class): an explicit zero count for that class."""
    found = []
    for start, end, name in vocab.mentions(text):
        if re.search(r"(?<![\w])no\s+$", text[:start]):
            found.append((text[:start].rstrip().rfind("no"), end, 0, name))
    return found


def clean_counts(generation: str, classes: Sequence[str], vocab: Vocabulary) -> dict:
    """Parse a counting answer. k = 1: the first number (or "no <class>"). k > 1: one "class: n" / "n class" pair
    per queried class; a class without a pair stays unparsed (None)."""
    text = normalize(generation)
    numbers = find_numbers(text)
    zeros = _no_class_zeros(text, vocab)
    distinct = {value for _, _, value in numbers} | {0 for _ in zeros}
    if len(classes) == 1:
        candidates = sorted([(s, v) for s, _, v in numbers] + [(s, 0) for s, _, _, _ in zeros])
        return {"counts": [candidates[0][1] if candidates else None], "multi_number": len(distinct) > 1}
    counts: dict[str, int] = {}
    for _, _, value, name in zeros:
        counts.setdefault(name, value)
    pairs = []  # (class, the number right after its mention, the number right before it)
    for start, end, name in vocab.mentions(text):
        after = next((n for n in numbers if n[0] >= end and re.fullmatch(r"\s*(?:[:=]|is|are|x)?\s*",
                                                                          text[end:n[0]])), None)
        before = next((n for n in numbers if n[1] <= start and re.fullmatch(r"\s+", text[n[1]:start])), None)
        pairs.append((name, after, before))
    # One style per answer, read off its first mention: "4 zebras 2 giraffes" counts before each class,
    # "zebras 4 giraffes 2" / "zebra: 4, giraffe: 2" after it.
    number_first = bool(pairs) and pairs[0][2] is not None
    for name, after, before in pairs:
        pick = (before or after) if number_first else (after or before)
        if name not in counts and pick is not None:
            counts[name] = pick[2]
    return {"counts": [counts.get(c) for c in classes], "multi_number": len(distinct) > 1}


def clean_score_counting(generation: str, classes: Sequence[str], gt_counts: Sequence[int], vocab: Vocabulary) -> dict:
    parsed = clean_counts(generation, classes, vocab)
    per_class = [p is not None and p == g for p, g in zip(parsed["counts"], gt_counts)]
    errors = [abs(p - g) for p, g in zip(parsed["counts"], gt_counts) if p is not None]
    return {
        "parsed": parsed["counts"],
        "correct": all(per_class),
        "class_correct": per_class,
        "abs_errors": errors,
        "unparsed": sum(p is None for p in parsed["counts"]),
        "multi_number": parsed["multi_number"],
    }


def clean_score_choice(generation: str, gt: str, vocab: Vocabulary) -> dict:
    """Common / Odd-One: `strict` (headline) needs the mentioned classes to be exactly {gt}; `contains` needs gt
    among them; `legacy_substring` is the official rule, for comparison."""
    mentioned = vocab.classes_in(generation)
    return {
        "mentioned": mentioned,
        "correct": mentioned == [gt],
        "contains": gt in mentioned,
        "legacy_substring": legacy_score_choice(generation, gt)["correct"],
    }


_LIST_SPLIT = re.compile(r"\s*(?:[,;\n]|\band\b|&)\s*")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


def clean_list_items(generation: str, vocab: Vocabulary) -> list[str]:
    """Split a free-text list on , ; newlines "and" "&", strip bullets and numbering, map items to the
    vocabulary, drop empties, dedup (first occurrence order)."""
    text = unicodedata.normalize("NFKC", generation).lower()
    text = _LEADING_ANSWER.sub("", text.strip())
    items = []
    for line in text.splitlines() or [""]:
        for raw in _LIST_SPLIT.split(_BULLET.sub("", line)):
            item = vocab.map_item(raw) if raw.strip() else ""
            if item:
                items.append(item)
    return list(dict.fromkeys(items))


def clean_score_listing(generation: str, gt_items: Sequence[str], vocab: Vocabulary) -> dict:
    pred = clean_list_items(generation, vocab)
    gt = list(dict.fromkeys(gt_items))
    matched = len(set(pred) & set(gt))
    p = matched / len(pred) if pred else 0.0
    r = matched / len(gt) if gt else 0.0
    return {"items": pred, "matched": matched, "n_pred": len(pred), "n_gt": len(gt), "f1": f1(p, r)}


# --------------------------------------------------------------------------------------------------------------
# one entry point per sample, and the aggregations
# --------------------------------------------------------------------------------------------------------------


def f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def split_gt_list(gt: str) -> list[str]:
    return [item for item in gt.split(", ") if item]


def counting_gt(names: Sequence[str], totals: Sequence[int]) -> str:
    """A counting ground truth: "4" for one class, "zebra: 4, giraffe: 2" for several."""
    return str(totals[0]) if len(totals) == 1 else ", ".join(f"{n}: {t}" for n, t in zip(names, totals))


def score_sample(sample: dict, generation: str, mode: str = "clean", vocab: Vocabulary | None = None) -> dict:
    """Score one generation against one sample record ({"task", "gt", "classes", "counts_per_image", ...}).

    Counting in clean mode needs the per-class ground truth, which is the column sums of counts_per_image.
    """
    task, gt = sample["task"], str(sample["gt"])
    if mode == "legacy_official":
        if task == "counting":
            return legacy_score_counting(generation, gt)
        if task == "listing":
            return legacy_score_listing(generation, gt)
        return legacy_score_choice(generation, gt)
    if mode != "clean":
        raise ValueError(f"unknown scoring mode {mode!r}; choose from {', '.join(MODES)}")
    if vocab is None:
        raise ValueError("clean scoring needs a Vocabulary of the benchmark's class names")
    if task == "counting":
        gt_counts = [sum(col) for col in zip(*sample["counts_per_image"])]
        return clean_score_counting(generation, sample["classes"], gt_counts, vocab)
    if task == "listing":
        return clean_score_listing(generation, split_gt_list(gt), vocab)
    return clean_score_choice(generation, gt, vocab)


def listing_micro(scores: Sequence[dict]) -> dict:
    """Micro-pooled precision, recall, F1 over samples: sum(matched) / sum(|pred|), sum(matched) / sum(|gt|)."""
    matched = sum(s["matched"] for s in scores)
    n_pred = sum(s["n_pred"] for s in scores)
    n_gt = sum(s["n_gt"] for s in scores)
    precision = matched / n_pred if n_pred else 0.0
    recall = matched / n_gt if n_gt else 0.0
    return {"precision": precision, "recall": recall, "f1": f1(precision, recall)}


def aggregate(task: str, scores: Sequence[dict], mode: str = "clean") -> dict:
    """Task-level metrics from per-sample scores; `score` is the headline (accuracy, or micro F1 for Listing)."""
    n = len(scores)
    if n == 0:
        return {"score": None, "n": 0}
    if task == "listing":
        micro = listing_micro(scores)
        out = {"score": micro["f1"], **micro, "n": n}
        if mode == "clean":
            out["macro_f1"] = sum(s["f1"] for s in scores) / n
        return out
    out = {"score": sum(bool(s["correct"]) for s in scores) / n, "n": n}
    if mode == "clean" and task == "counting":
        class_hits = [hit for s in scores for hit in s["class_correct"]]
        errors = [e for s in scores for e in s["abs_errors"]]
        out["class_accuracy"] = sum(class_hits) / len(class_hits) if class_hits else None
        out["mae"] = sum(errors) / len(errors) if errors else None
        out["unparsed_rate"] = sum(s["unparsed"] for s in scores) / len(class_hits) if class_hits else None
        out["multi_number_rate"] = sum(s["multi_number"] for s in scores) / n
    if mode == "clean" and task in ("common", "oddone"):
        out["contains"] = sum(s["contains"] for s in scores) / n
        out["legacy_substring"] = sum(s["legacy_substring"] for s in scores) / n
    return out


def mimic_average(task_scores: dict[str, float | None]) -> float | None:
    """The paper's MIMIC Avg: the unweighted mean of Common, Counting, Odd-One accuracy and Listing F1."""
    values = [task_scores.get(t) for t in TASKS]
    return sum(values) / len(values) if all(v is not None for v in values) else None
