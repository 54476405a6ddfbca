"""Errors of the serving layer: each knows the HTTP status it is answered with."""
from __future__ import annotations

from ..errors import VtcompileError


class ServeError(VtcompileError):
    """A request the server refuses: HTTP `status` and OpenAI's error fields."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class QueueFullError(VtcompileError):
    """The engine's waiting queue is full (HTTP 429)."""


class EngineStoppedError(VtcompileError):
    """The engine was stopped; no request is taken."""
