"""The one training loop (accelerate: CPU, one GPU, several GPUs), checkpoint and resume, seeding."""

from typing import TYPE_CHECKING

from stitchkit._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name is imported on first use
    from stitchkit.engine.loop import EarlyStopping, TrainConfig, TrainResult, train
    from stitchkit.engine.seeding import seed_everything

__all__ = ["EarlyStopping", "TrainConfig", "TrainResult", "seed_everything", "train"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "loop": ["EarlyStopping", "TrainConfig", "TrainResult", "train"],
        "seeding": ["seed_everything"],
    },
)
