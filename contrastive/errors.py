"""The errors a user can fix: the family every command-line entry point reports as one line.

`ConfigError` subclasses ValueError, so callers that catch ValueError keep working. A CLI catches only this
family: any other exception is a bug of ours (or a broken environment) and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting cannot be used: a config key's value, a command-line argument, a combination of them, or the
    environment a setting asks for (dist.device=cuda without a GPU, logger=online without a connection)."""

    def __init__(self, *args: object) -> None:
        # Raised in a DataLoader worker (too many bad samples or lost shards), the error reaches the main process
        # re-made by torch from "Caught InputError in DataLoader worker process 0.\nOriginal Traceback ...": keep
        # the original one-line message (the traceback's last line) and say where it came from.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "\nOriginal Traceback" in args[0]:
            where = args[0].split("\n", 1)[0].split(" in ", 1)[-1].rstrip(".")
            message = args[0].rstrip().rsplit("\n", 1)[-1].partition(": ")[2]
            args = (f"{message} ({where})",)
        super().__init__(*args)


class InputError(ConfigError):
    """A file or data set the run was pointed at cannot be used: a missing or corrupt checkpoint, shards that do
    not exist or hold too many bad samples, a directory of the wrong kind."""


class TrainingDiverged(ConfigError):
    """The loss or the gradients stayed non-finite for trainer.max_nonfinite_steps steps in a row; the message
    names the last good checkpoint. A user fixes it with the recipe (learning rate, warmup, precision)."""
