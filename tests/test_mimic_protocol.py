"""MIMIC prompts, parsers and metrics: the official scorer's quirks (legacy_official) and the clean default."""

from __future__ import annotations

import pytest

from stitchkit.multiimage.protocol import (
    Vocabulary,
    aggregate,
    clean_counts,
    clean_list_items,
    find_numbers,
    legacy_filter,
    legacy_parse_count,
    legacy_word_to_num,
    mimic_average,
    normalize,
    plural,
    prompt_text,
    score_sample,
)

COCO_NAMES = ["person", "dog", "cat", "horse", "zebra", "giraffe", "hot dog", "wine glass", "cup", "tv", "mouse",
              "dining table", "sports ball"]
VOCAB = Vocabulary(COCO_NAMES)


# -- reference mimic.md section 13: the acceptance tests for the legacy scorer --------------------------------

def test_acceptance_listing_first_item_carries_the_leading_space():
    sample = {"task": "listing", "gt": "cat, dog"}
    legacy = aggregate("listing", [score_sample(sample, "cat, dog", "legacy_official")], "legacy_official")
    assert legacy["precision"] == legacy["recall"] == 0.5
    clean = aggregate("listing", [score_sample(sample, "cat, dog", "clean", VOCAB)], "clean")
    assert clean["precision"] == clean["recall"] == clean["f1"] == 1.0


def test_acceptance_counting_parses_punctuation_and_number_words():
    assert legacy_parse_count(" 4.") == "4"
    assert legacy_parse_count(" four zebras") == "4"
    assert legacy_parse_count(legacy_filter("4.")) == "4"


def test_acceptance_common_substring_vs_strict():
    sample = {"task": "common", "gt": "dog"}
    assert score_sample(sample, "hot dog", "legacy_official")["correct"] is True
    assert score_sample(sample, "hot dog", "clean", VOCAB)["correct"] is False
    assert score_sample(sample, "Dogs.", "clean", VOCAB)["correct"] is True


# -- legacy details -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, value",
    [  # documented outputs of word2number 1.1 (its README and unit tests)
        ("two million three thousand nine hundred and eighty four", 2003984),
        ("two point three", 2.3),
        ("112", 112),
        ("point one", 0.1),
        ("one hundred thirty-five", 135),
        ("nine hundred ninety nine", 999),
        ("eleven", 11),
        ("four zebras", 4),
        ("point", 0),  # "point" alone: no integer part, no decimals
        # a trailing "thousand" after "million": word2number 1.1 adds the group after "million" a second time
        # (checked against the real library on random word strings; no arithmetic oracle for a bug)
        ("two million three thousand", 2004003),
        ("five million five thousand", 5006005),
    ],
)
def test_word_to_num_matches_word2number(text, value):
    assert legacy_word_to_num(text) == value


@pytest.mark.parametrize("text, error", [("blah", ValueError), ("million million", ValueError),
                                          ("thousand four", IndexError), ("thousand million", ValueError)])
def test_word_to_num_fails_where_word2number_fails(text, error):
    with pytest.raises(error):
        legacy_word_to_num(text)


@pytest.mark.parametrize(
    "generation, parsed",
    [
        ("4", "4"), ("4!.", "4"), ("Four.", "4"), ("There are 3 dogs", "3"), ("three or 5", "3"),
        ("thousand four", "wrong answer"),  # word2number raises IndexError; no digit to fall back on
        ("4.0", "4"), ("four point five", "4.5"), ("I cannot tell", "wrong answer"), ("'7'", "7"),
        ("2,3", "2"),  # int() and word2number fail; the first digit run wins
    ],
)
def test_legacy_counting_parser(generation, parsed):
    assert legacy_parse_count(legacy_filter(generation)) == parsed


def test_legacy_listing_quirks_and_micro_pooling():
    samples = [({"task": "listing", "gt": "cat, dog"}, "dog, cat"),  # " dog" misses, "cat" hits
               ({"task": "listing", "gt": "horse"}, "horse"),  # a one-item answer never matches
               ({"task": "listing", "gt": "cat, dog"}, "x, cat., dog")]  # "cat." never matches
    scores = [score_sample(s, g, "legacy_official") for s, g in samples]
    assert [(s["matched"], s["n_pred"], s["n_gt"]) for s in scores] == [(1, 2, 2), (0, 1, 1), (1, 3, 2)]
    metrics = aggregate("listing", scores, "legacy_official")
    assert metrics["precision"] == pytest.approx(2 / 6) and metrics["recall"] == pytest.approx(2 / 5)


def test_legacy_prompt_keeps_question_mark_period():
    assert prompt_text("listing", "Which animals are there?", legacy=True).startswith(
        "Question: Which animals are there?. Please provide the list of category names directly.\nAnswer:")
    assert prompt_text("listing", "Which animals are there?").startswith("Question: Which animals are there. Please")
    assert prompt_text("counting", "How many dogs?") == "Question: How many dogs?\nAnswer:"


# -- clean mode ----------------------------------------------------------------------------------------------

def test_normalize_and_plurals():
    assert normalize("  The answer is:  Four Dogs. ") == "four dogs"
    assert [plural(n) for n in ("bus", "person", "wine glass", "cross", "sheep", "knife", "toothbrush")] == [
        "buses", "people", "wine glasses", "crosses", "sheep", "knives", "toothbrushes"]


def test_numbers_in_text():
    assert [v for _, _, v in find_numbers("twenty-one dogs, 3 cats and one hundred and five birds")] == [21, 3, 105]
    assert [v for _, _, v in find_numbers("none")] == [0]


@pytest.mark.parametrize(
    "generation, classes, counts",
    [
        ("There are 4 zebras.", ["zebra"], [4]),
        ("Answer: four", ["zebra"], [4]),
        ("I see no zebras.", ["zebra"], [0]),
        ("zebra: 4, giraffe: two", ["zebra", "giraffe"], [4, 2]),
        ("3 zebras and 2 giraffes", ["zebra", "giraffe"], [3, 2]),
        ("giraffes = 5", ["zebra", "giraffe"], [None, 5]),
        ("4 zebras 2 giraffes", ["zebra", "giraffe"], [4, 2]),  # number first: each class takes the number before it
        ("zebras 4 giraffes 2", ["zebra", "giraffe"], [4, 2]),  # class first: the number after it
        ("I see zebras: 4 and 2 giraffes", ["zebra", "giraffe"], [4, 2]),
    ],
)
def test_clean_counting_parser(generation, classes, counts):
    assert clean_counts(generation, classes, VOCAB)["counts"] == counts


def test_clean_counting_scores_all_classes_and_flags_multiple_numbers():
    sample = {"task": "counting", "gt": "zebra: 4, giraffe: 2", "classes": ["zebra", "giraffe"],
              "counts_per_image": [[2, 0], [2, 0], [0, 2], [0, 0]]}
    right = score_sample(sample, "4 zebras and 2 giraffes", "clean", VOCAB)
    half = score_sample(sample, "zebra: 4, giraffe: 3", "clean", VOCAB)
    assert right["correct"] and not half["correct"] and half["class_correct"] == [True, False]
    assert half["abs_errors"] == [0, 1] and half["multi_number"]
    assert score_sample(sample, "4 zebras and 2 giraffes", "legacy_official")["correct"] is False  # one number only
    metrics = aggregate("counting", [right, half], "clean")
    assert metrics["score"] == 0.5 and metrics["class_accuracy"] == 0.75 and metrics["mae"] == 0.25


def test_clean_listing_items():
    assert clean_list_items("1. Cats\n2. dogs and a horse\n- Cats", VOCAB) == ["cat", "dog", "horse"]
    assert clean_list_items("The answer is: hot dog; wine glasses & TV", VOCAB) == ["hot dog", "wine glass", "tv"]
    scored = score_sample({"task": "listing", "gt": "cat, dog"}, "cat, lion", "clean", VOCAB)
    assert (scored["matched"], scored["n_pred"], scored["n_gt"], scored["f1"]) == (1, 2, 2, 0.5)


def test_clean_choice_modes():
    sample = {"task": "oddone", "gt": "person"}
    assert score_sample(sample, "People", "clean", VOCAB)["correct"]
    assert score_sample(sample, "People", "legacy_official")["correct"] is False  # "people" lacks "person"
    both = score_sample({"task": "common", "gt": "dog"}, "a dog and a cat", "clean", VOCAB)
    assert both["contains"] and not both["correct"] and both["legacy_substring"]
    assert VOCAB.classes_in("the dining table and a table") == ["dining table"]


def test_mimic_average_is_the_unweighted_task_mean():
    # reference section 10: the 0.5B base row 44.7 / 29.7 / 8.3 / 22.8 averages to 26.4
    avg = mimic_average({"common": 0.447, "counting": 0.297, "oddone": 0.083, "listing": 0.228})
    assert round(100 * avg, 1) == 26.4
    assert mimic_average({"common": 0.5}) is None
