"""Exception types shared by the library and the command-line tools.

Every user-facing error names the file, key or line at fault, what was found and what was
expected. Tools catch `MegatronNeoxError`, print its message and exit with status 2.
"""


class MegatronNeoxError(Exception):
    """Base class for errors caused by user input (configs, data files, checkpoints)."""


class ConfigError(MegatronNeoxError, ValueError):
    """A configuration file, override or derived layout is invalid."""


class DataError(MegatronNeoxError, ValueError):
    """An input document, dataset file or index is malformed."""


class CheckpointError(MegatronNeoxError, RuntimeError):
    """A checkpoint is missing, partial, corrupt or does not match the model."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that belongs to another model or layout: resuming falls back to no
    older checkpoint (they would not match either); the user must point elsewhere or reshard."""
