"""The one training loop (accelerate: CPU, one GPU, several GPUs), checkpoint and resume, seeding."""

from stitchkit.engine.loop import TrainConfig, TrainResult, train
from stitchkit.engine.seeding import seed_everything

__all__ = ["TrainConfig", "TrainResult", "train", "seed_everything"]
