"""Errors users see: each says what was wrong and what to do, never a deep MLX traceback."""


class MoshiMlxError(Exception):
    """Base class; the CLI prints these as one line and exits with status 2."""


class InputError(MoshiMlxError, ValueError):
    """Bad arrays or arguments passed to the API (shape, range, NaN, …)."""


class CheckpointError(MoshiMlxError, ValueError):
    """A weights file or directory that cannot be loaded (missing/extra/mis-shaped keys, …)."""
