"""MIMIC ("More Images, More Problems?", seed 001): a controlled multi-image benchmark built from any COCO-format
annotation file, its scorers and its exports.

    config.py      MimicConfig: tasks, sample counts, control-variable grids, area filter (pydantic)
    index.py       MimicIndex: per-image class presence and counts, eligibility pools, built once
    templates.py   the question bank (several templates per task)
    generator.py   the four task samplers, answer recomputation, build_benchmark (`stitchkit mimic build`)
    benchmark.py   the Sample record and the benchmark folder (samples.jsonl + benchmark.json)
    official.py    the released data (anurag4446/mimic) as a benchmark folder (`stitchkit mimic import-official`)
    protocol.py    prompts, the legacy_official and clean parsers, metrics (stdlib only; copied into exports)
    scoring.py     predictions -> results.json, report.md, breakdowns, figures (`stitchkit mimic score`)
    exports.py     HF datasets / parquet, lmms-eval task folder, VLMEvalKit TSVs (`stitchkit mimic export`)
    llava_json.py  training data in LLaVA conversation JSON, options and multi-turn (`stitchkit mimic export-training`)
    adapters/      the lmms-eval utils.py and VLMEvalKit dataset class, copied into exports
    evaluate.py    a VLM on a benchmark: batched, resumable generation, then the scorer (`stitchkit mimic eval`)
    imageops.py    the pixel down/up-sampling control and the image-stitching canvas
    studies.py     the paper's experiments: FLOPs, pooling, stitching, attention, masked fine-tuning
    experiment.py  one config -> every study, resumable, results.json + report.md (`stitchkit mimic run`)
    quickstart.py  MIMIC's section of `stitchkit quickstart` (configs/mimic/quickstart.yaml)
"""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.multiimage.benchmark import CONTROLS, Benchmark, Sample, load_benchmark
    from stitchkit.multiimage.config import MimicConfig
    from stitchkit.multiimage.generator import build_benchmark, generate
    from stitchkit.multiimage.index import MimicIndex
    from stitchkit.multiimage.protocol import TASKS, Vocabulary, prompt_text, score_sample

__all__ = [
    "CONTROLS",
    "TASKS",
    "Benchmark",
    "MimicConfig",
    "MimicIndex",
    "Sample",
    "Vocabulary",
    "build_benchmark",
    "generate",
    "load_benchmark",
    "prompt_text",
    "score_sample",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "benchmark": ["CONTROLS", "Benchmark", "Sample", "load_benchmark"],
        "config": ["MimicConfig"],
        "generator": ["build_benchmark", "generate"],
        "index": ["MimicIndex"],
        "protocol": ["TASKS", "Vocabulary", "prompt_text", "score_sample"],
    },
)
