"""The errors users see: a request that cannot be served (HTTP 400) and a checkpoint that cannot be
loaded (exit code 2). Kept free of heavy imports so entry points can catch them cheaply."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request that cannot be served as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as is; the message names the file and tensor."""
