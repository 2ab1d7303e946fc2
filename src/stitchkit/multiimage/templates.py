"""The question bank: several open-ended templates per task, one picked per query by the seeded RNG.

The official templates exist only inside the released dataset's `question` field, so these are ours
(reference section 2.1: at least three per task, `template_id` stored with every sample). Templates never
mention how many images there are or where the evidence is, so the question text carries no control variable.
Listing templates end without punctuation because the prompt appends ". Please provide the list ...".
"""

from __future__ import annotations

import re

from stitchkit.multiimage.protocol import plural, prompt_text

TEMPLATES: dict[str, tuple[str, ...]] = {
    "counting": (
        "How many {things} are there in total across all the images?",
        "Count the {things} in these images. How many are there altogether?",
        "What is the total number of {things} in all of these images?",
        "Looking at every image, how many {things} can you count in total?",
    ),
    "listing": (
        "List all the {group} categories that appear in these images",
        "Which {group} categories can be seen across these images",
        "Name every {group} category present in any of these images",
    ),
    "common": (
        "Which object category is present in every one of these images?",
        "What kind of object appears in all of the images?",
        "Name the object category that all of these images have in common.",
    ),
    "oddone": (
        "Which object category appears in only a minority of these images?",
        "One object category is present in fewer than half of these images. Which one is it?",
        "Name the object category that only a few of these images contain, unlike the others.",
    ),
}

MULTI_CLASS_INSTRUCTION = " Answer with one count per category, in the form 'category: number'."


def join_names(names: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def question_text(task: str, template_id: int, classes: list[str] | None = None, group: str | None = None) -> str:
    """Fill template `template_id` of `task`: counting needs the queried classes, listing the supercategory."""
    template = TEMPLATES[task][template_id]
    if task == "counting":
        text = template.format(things=join_names([plural(c) for c in classes or []]))
        return text + MULTI_CLASS_INSTRUCTION if len(classes or []) > 1 else text
    if task == "listing":
        return template.format(group=group)
    return template


def template_words() -> list[str]:
    """Every word MIMIC's prompts use besides the class and group names filled in: the templates, the multi-class
    instruction and the prompt wrapper ("Question: ... Answer:", Listing's list instruction). A word-level
    tokenizer that knows these reads a MIMIC prompt word by word (the micro VLM's vocabulary includes them)."""
    text = " ".join(prompt_text(task, template + MULTI_CLASS_INSTRUCTION)
                    for task, templates in TEMPLATES.items() for template in templates)
    return sorted(set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text).lower())))
