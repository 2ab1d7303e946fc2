"""The errors a user sees.

Anything a user can cause (bad YAML, a corrupt image, a missing model, incompatible shapes) is
raised as a `StitchkitError`; the CLI prints its message and exits with code 2, without a
traceback unless `--debug` is given. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_TIME_LIMIT = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 130  # Ctrl-C outside a checkpointed training (128 + SIGINT, the shell's convention)
# Unix time after which trainings stop (set by `stitchkit --time-limit`); an environment variable, so that worker
# processes (zoo builds, accelerate launch) see the same deadline.
DEADLINE_ENV = "STITCHKIT_DEADLINE"


class StitchkitError(Exception):
    """A problem with the user's input, reported as one clear message (exit code 2)."""

    exit_code = EXIT_USER_ERROR
    label = "error"


class ConfigError(StitchkitError):
    """A config file that is missing, is not valid YAML, or fails validation."""


class InputError(StitchkitError):
    """A data file or image that is missing, corrupt or malformed."""


class ModelNotFoundError(StitchkitError):
    """A hub id or local folder that does not hold a usable model."""


class IncompatibleError(StitchkitError):
    """Two things that cannot be combined (dimensions, grids, architectures)."""


class TimeLimitReached(StitchkitError):
    """A training stopped early at the end of a step, after a checkpoint, because the --time-limit passed or
    SIGTERM / Ctrl-C asked it to (engine.loop): the same command resumes it."""

    exit_code = EXIT_TIME_LIMIT
    label = "stopped"


class TrainingDiverged(StitchkitError):
    """A training's loss became NaN or infinite; nothing after the last finite step was checkpointed."""

    exit_code = EXIT_DIVERGED
    label = "diverged"

    def __init__(self, step: int, loss: float, description: str = "training"):
        self.step, self.loss = step, loss
        super().__init__(f"{description} diverged: the loss is {loss} at step {step}; its last checkpoint is from "
                         "before that. Lower the learning rate, or try another seed")
