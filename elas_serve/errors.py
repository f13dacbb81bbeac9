"""Errors a client caused (the server maps them to HTTP 400 with `param`)."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request that cannot be served as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
