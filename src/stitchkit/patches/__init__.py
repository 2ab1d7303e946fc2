"""Visual stitching: can a VLM reassemble an image it only saw as scattered patches? (visual_stitching.md, seed 000)

    ids.py         IDs (two letters + three digits) with distinct first tokens under the model's tokenizer
    dataset.py     cut images into f x f patches (floor division, as the official code); HF dataset builder
    stitch.py      the stitch tool: rebuild images from patch files, missing cells black, optional seeded shuffle
    shapes.py      source sets from the shapes world: one large object per image; the moderation set with markers
    filters.py     moderation filters: the built-in marker filter, any HF image classifier, plug-ins (module:callable)
    evaluate.py    mean rank by first-token logit and by full log-probability; random baseline (K-1)/2
    train.py       fine-tuning on (patch, ID) with loss on the ID tokens only, evaluation curves, resume
    analyses.py    §5: patch localization (rank of the true name given one patch) and Threshold-x
    moderation.py  pass rates and the adversarial-label experiment
    experiment.py  `stitchkit patches run`: everything above into one run folder
    report.py      the paper-style table, curves, moderation tables and figures
"""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.patches.dataset import Patch, SourceImage, Templates, build_patch_dataset, cut_patches, load_patch_dataset, read_names
    from stitchkit.patches.evaluate import EvalItem, gold_probability, random_baseline, rank_of, score_items, summarize
    from stitchkit.patches.filters import HFClassifierFilter, MarkerFilter, ModerationFilter, Verdict
    from stitchkit.patches.ids import check_first_tokens, first_token_clashes, first_tokens, generate_ids

__all__ = [
    "EvalItem",
    "HFClassifierFilter",
    "MarkerFilter",
    "ModerationFilter",
    "Patch",
    "SourceImage",
    "Templates",
    "Verdict",
    "build_patch_dataset",
    "check_first_tokens",
    "cut_patches",
    "first_token_clashes",
    "first_tokens",
    "generate_ids",
    "gold_probability",
    "load_patch_dataset",
    "random_baseline",
    "rank_of",
    "read_names",
    "score_items",
    "summarize",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "dataset": [
            "Patch",
            "SourceImage",
            "Templates",
            "build_patch_dataset",
            "cut_patches",
            "load_patch_dataset",
            "read_names",
        ],
        "evaluate": ["EvalItem", "gold_probability", "random_baseline", "rank_of", "score_items", "summarize"],
        "filters": ["HFClassifierFilter", "MarkerFilter", "ModerationFilter", "Verdict"],
        "ids": ["check_first_tokens", "first_token_clashes", "first_tokens", "generate_ids"],
    },
)
