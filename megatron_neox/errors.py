"""Exception types shared by the library and the command-line tools.

Every user-facing error names the file, key or line at fault, what was found and what was
expected. Tools catch `MegatronNeoxError` and `OSError`, print `error_message(e)` and exit
with status 2.
"""
import errno


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


def error_message(e: BaseException) -> str:
    """What a tool prints after 'error: ' for `e`: our errors' own message; for an OSError (an
    unwritable output, a full disk) the path and the reason instead of a traceback."""
    if isinstance(e, OSError) and not isinstance(e, MegatronNeoxError):
        reason = e.strerror or str(e)
        paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
        hint = "; choose a location you can write to" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        return f"{paths}: {reason}{hint}" if paths else f"{reason}{hint}"
    return str(e)
