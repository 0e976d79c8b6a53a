"""The one exception type for user mistakes (bad config, file, key or argument).

Its message names the thing at fault; the CLI prints it as one line and exits with status 2.
"""


class EncdiffError(ValueError):
    """A user mistake: the message says which file, key, field or value is wrong."""


class TrainingInterrupted(EncdiffError):
    """A run stopped by SIGINT/SIGTERM after writing its checkpoint: the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint} written: run the same command again "
                         "to resume")
