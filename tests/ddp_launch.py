"""Running a test script on two CPU processes under DDP (gloo), for the tests that compare them with one process.

`accelerate launch --cpu` starts only one process (accelerate issue #2741), so CPU processes go through its
torchrun path (--multi_gpu) with ACCELERATE_USE_CPU=1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(script: Path, args: list[str], extra_env: dict | None = None, timeout: float = 120):
    """`accelerate launch` `script` with `args` on two gloo processes, one thread each; the finished process."""
    launcher = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
                "--main_process_port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.update(STITCHKIT_PROGRESS="0", ACCELERATE_USE_CPU="1", **(extra_env or {}))
    return subprocess.run([*launcher, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)
