"""Build zoo recipe files, as a script under `accelerate launch` (tests/test_zoo.py's two-process test).

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... zoo_ddp_build.py A.yaml B.yaml

Every launched process calls stitchkit.zoo.build on each recipe in turn, as `stitchkit zoo train` would; the
builds land under $STITCHKIT_HOME/zoo like any other.
"""

from __future__ import annotations

import sys

import torch

from stitchkit.zoo import build, load_recipe


def main(recipe_files: list[str]) -> None:
    for path in recipe_files:
        build(load_recipe(path))
    if torch.distributed.is_initialized():
        # Tear gloo down before the interpreter exits (as tests/engine_tiny_train.py does): left to exit-time
        # destructors, its threads have aborted a rank on a heavily loaded machine.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
