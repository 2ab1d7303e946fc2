"""Binding shortcuts: does visual training replace positional binding with symbolic binding? (binding.md, seed 003)

    task.py           the indirect-retrieval task: vocabulary, examples, text / image / grounding encodings, noise gaps
    render.py         contexts drawn as coloured shapes (shapes-world glyphs, or the paper's parametric 216 x 216)
    data.py           image bank through a frozen encoder; deterministic example streams per stage; collate
    model.py          the decoder-only HF LM (Llama / Qwen2 classes) + projector; image tokens via inputs_embeds
    evaluate.py       accuracy per context size; ID and OOD averages
    subjects.py       what analysis runs on (our model, or a pretrained LM / VLM with word prompts); residual hooks
    interventions.py  interchange interventions: q, q', r, s counterfactuals, outcome labels, symbolic/positional ratio
    probes.py         linear probes per layer and the binding signature
    knockouts.py      windowed attention knockouts of edge sets K1..K6
    config.py         BindingConfig: stages, branches (curricula), analysis
    experiment.py     `stitchkit binding run`; analyze.py: `stitchkit binding analyze`; report.py: tables, figures
"""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.binding.config import BindingConfig
    from stitchkit.binding.experiment import run_binding
    from stitchkit.binding.interventions import make_pair, run_interventions
    from stitchkit.binding.model import BindingModel, load_binding_model
    from stitchkit.binding.probes import run_probes
    from stitchkit.binding.task import Example, Vocabulary, encode_text, sample_example

__all__ = [
    "BindingConfig",
    "BindingModel",
    "Example",
    "Vocabulary",
    "encode_text",
    "load_binding_model",
    "make_pair",
    "run_binding",
    "run_interventions",
    "run_probes",
    "sample_example",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "config": ["BindingConfig"],
        "experiment": ["run_binding"],
        "interventions": ["make_pair", "run_interventions"],
        "model": ["BindingModel", "load_binding_model"],
        "probes": ["run_probes"],
        "task": ["Example", "Vocabulary", "encode_text", "sample_example"],
    },
)
